#!/usr/bin/env bash
# The architecture check's child from a cold page cache (device machine, issue 15): alone, beside `cat` of the
# rank files, and the uncached merge it belongs to. Usage: benchmarks/arch_child_cold.sh ACTOR_DIR CONFIG_JSON
set -u
A=$1; C=$2
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
child() { python3 -c "import json,sys,time; t=time.perf_counter(); from streammerge.architecture import describe; \
d=describe(json.load(open('$C')), []); print('child', round(time.perf_counter()-t,2), 's', d['models'][0]['class'])"; }
for i in 1 2 3; do drop; /usr/bin/time -f "alone %e s %M KB" bash -c "$(declare -f child); C=$C; child"; done
for i in 1 2; do drop; (cat "$A"/model_world_size_*_rank_*.pt > /dev/null; echo "cat done at $SECONDS") & s=$SECONDS
  /usr/bin/time -f "beside cat %e s" bash -c "$(declare -f child); C=$C; child"; wait; done
