#!/usr/bin/env bash
# The architecture check on a first merge and a cached one, with a bytecode cache as a pip install has, beside torchrun
# (device machine, issue 15). Usage: benchmarks/arch_first_merge.sh PRESET ROUNDS DEADLINE_S EST_S RESULTS
set -e; export PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/var/tmp/pyc PYTHONDONTWRITEBYTECODE= STREAMMERGE_CACHE=/var/tmp/smcache
t=$SECONDS; python3 benchmarks/make_checkpoint.py /var/tmp/ck --preset $1 --world-size 8 >/dev/null; echo "made in $((SECONDS-t)) s"
A=/var/tmp/ck/global_step_1/actor
python3 -m streammerge $A /var/tmp/w --dtype bfloat16 --no-optimizer --no-progress 2>&1 | tail -1; rm -rf /var/tmp/w
torchrun --standalone --nproc-per-node 4 --no-python true; echo "warm at $SECONDS s"
TR="torchrun --standalone --nproc-per-node 4"
python3 benchmarks/io_matrix.py --workdir /var/tmp/iom --checkpoint $A --dtypes bfloat16 --rounds $2 --no-read-only \
 --variant "uncached=STREAMMERGE_CACHE=/dev/null/x" --variant "cached=" --variant "off=STREAMMERGE_ARCH_CHECK=0" \
 --command "torchrun=$TR -m streammerge {actor} {out} --dtype bfloat16 --no-optimizer --no-progress" \
 --command "torchrun_noop=$TR --no-python true" \
 --results $5 --deadline $(($3-SECONDS)) --est $4 | grep -v "^\[" ; echo "done at $SECONDS s"
