#!/usr/bin/env bash
# A model's first merge (no cached architecture answer) on a machine where a child has listed its imports before
# (its read-ahead: imports_ahead.py), against one with no list (a machine's first child) and the check switched off;
# bytecode cache as a pip install has (device machine, issue 15).
# Usage: benchmarks/arch_ahead.sh PRESET ROUNDS DEADLINE_S EST_S RESULTS
set -e; export PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/var/tmp/pyc PYTHONDONTWRITEBYTECODE=
C=/var/tmp/smcache
t=$SECONDS; [ -d /var/tmp/ck ] || python3 benchmarks/make_checkpoint.py /var/tmp/ck --preset $1 --world-size 8 >/dev/null; echo "made in $((SECONDS-t)) s"
A=/var/tmp/ck/global_step_1/actor
cat /sys/block/*/queue/scheduler | sort | uniq -c
# the warm-up fills the bytecode cache; its child lists its imports (after it answered: give it a moment)
STREAMMERGE_CACHE=$C python3 -m streammerge $A /var/tmp/w --dtype bfloat16 --no-optimizer --no-progress 2>&1 | tail -1
sleep 5; rm -rf /var/tmp/w; ls -la $C/imports
python3 benchmarks/io_matrix.py --workdir /var/tmp/iom --checkpoint $A --dtypes bfloat16 --rounds $2 --no-read-only \
 --variant "first=STREAMMERGE_CACHE=/dev/null/x" --variant "off=STREAMMERGE_ARCH_CHECK=0" \
 --command "first_listed=rm -rf $C/architecture; STREAMMERGE_CACHE=$C {python} -m streammerge {actor} {out} --dtype bfloat16 --no-optimizer --no-progress" \
 --results $5 --deadline $(($3-SECONDS)) --est $4 | grep -v "^\[" ; echo "done at $SECONDS s"
