#!/usr/bin/env bash
# This code against an older commit's, side by side (device machine, issue 15): did correctness work cost speed?
# Cold cache before every run, bytecode cache and cached architecture answers (as a pip install's second merge has):
# keep and bfloat16 merges (io_matrix.py, on a checkpoint made first), then verify (device_rounds.py --old, which
# makes its own checkpoint and removes it).
# Usage: benchmarks/regression_ab.sh OLD_DIR PRESET ROUNDS DEADLINE_S RESULTS_DIR [STEPS]   (STEPS: merge,verify)
#   OLD_DIR holds the older package: mkdir .old && git archive COMMIT streammerge | tar -x -C .old
set -e; export PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/var/tmp/pyc PYTHONDONTWRITEBYTECODE= STREAMMERGE_CACHE=/var/tmp/smcache
OLD=$(cd "$1" && pwd); STEPS=${6:-merge,verify}; mkdir -p "$5"; t0=$SECONDS
if [[ $STEPS == *merge* ]]; then
  python3 benchmarks/make_checkpoint.py /var/tmp/ck --preset "$2" --world-size 8 >/dev/null
  A=/var/tmp/ck/global_step_1/actor; M="{actor} {out} --no-optimizer --no-progress --dtype"
  echo "made in $((SECONDS - t0)) s"
  for d in keep bfloat16; do  # warm-up: each code's bytecode and its cached answer
    python3 -m streammerge "$A" /var/tmp/w --no-optimizer --no-progress --dtype $d | tail -1; rm -rf /var/tmp/w
    (cd "$OLD" && PYTHONPATH="$OLD" python3 -m streammerge "$A" /var/tmp/w --no-optimizer --no-progress --dtype $d |
     tail -1); rm -rf /var/tmp/w
  done
  share=$([[ $STEPS == *verify* ]] && echo 55 || echo 100)
  python3 benchmarks/io_matrix.py --workdir /var/tmp/iom --checkpoint "$A" --dtypes keep,bfloat16 --rounds "$3" \
    --no-read-only --variant "new=" --command "old_keep=cd $OLD && PYTHONPATH=$OLD {python} -m streammerge $M keep" \
    --command "old_bfloat16=cd $OLD && PYTHONPATH=$OLD {python} -m streammerge $M bfloat16" \
    --results "$5/regression_merge.json" --deadline $(($4 * share / 100 - SECONDS + t0)) --est 60 | grep -v "^\[" || true
  rm -rf /var/tmp/ck
fi
if [[ $STEPS == *verify* ]]; then
  python3 benchmarks/device_rounds.py --workdir /var/tmp/dr --preset "$2" --rounds "$3" --steps verify --old "$OLD" \
    --no-import-test --deadline $(($4 - SECONDS + t0)) --est 25 --results "$5/regression_verify.json" | grep -v "^\[" || true
fi
echo "done at $((SECONDS - t0)) s"
