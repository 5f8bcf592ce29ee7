#!/usr/bin/env bash
# A model's first merge (no cached architecture answer) with the merge stepping aside on the disk while the child
# imports transformers (opt-in: STREAMMERGE_ARCH_IO=idle), and not; bytecode cache
# as a pip install has (device machine, issue 15). Usage: benchmarks/arch_ioprio.sh PRESET ROUNDS DEADLINE_S EST_S RESULTS
set -e; export PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/var/tmp/pyc PYTHONDONTWRITEBYTECODE= STREAMMERGE_CACHE=/var/tmp/smcache
t=$SECONDS; python3 benchmarks/make_checkpoint.py /var/tmp/ck --preset $1 --world-size 8 >/dev/null; echo "made in $((SECONDS-t)) s"
A=/var/tmp/ck/global_step_1/actor
cat /sys/block/*/queue/scheduler | sort | uniq -c
python3 -m streammerge $A /var/tmp/w --dtype bfloat16 --no-optimizer --no-progress 2>&1 | tail -1; rm -rf /var/tmp/w
U=STREAMMERGE_CACHE=/dev/null/x
python3 benchmarks/io_matrix.py --workdir /var/tmp/iom --checkpoint $A --dtypes bfloat16 --rounds $2 --no-read-only \
 --variant "first_idle=$U STREAMMERGE_ARCH_IO=idle" --variant "first=$U" \
 --variant "off=STREAMMERGE_ARCH_CHECK=0" \
 --results $5 --deadline $(($3-SECONDS)) --est $4 | grep -v "^\[" ; echo "done at $SECONDS s"
