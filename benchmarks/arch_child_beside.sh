#!/usr/bin/env bash
# Where the architecture check's child waits when a merge runs beside it (issue 15): the child alone from a cold page
# cache, then beside a merge (check off) at its own I/O priority, in the idle I/O class (ionice -c3), with a small
# --buffer-size (fewer reads queued ahead), pinned to other cores than the merge (taskset), and with torch's device
# backend autoload off in the child (TORCH_DEVICE_BACKEND_AUTOLOAD=0: no scan of every installed package's
# entry_points.txt); MODES="beside noautoload" picks some. Each line: the child's
# wall, CPU, run-queue wait (schedstat), the rest (blocked: I/O), bytes it read; then the merge's own wall.
# Usage: benchmarks/arch_child_beside.sh ACTOR_DIR ROUNDS > OUT.jsonl   (root: it drops the page cache)
A=$1; C=$A/huggingface/config.json; OUT=${TMPDIR:-/tmp}/arch_child_beside_out
PROBE="import json,time; t=time.perf_counter()
from streammerge.architecture import describe
describe(json.load(open('$C')), [])
w=time.perf_counter()-t
cpu,rq,_=map(int,open('/proc/self/schedstat').read().split())
io=dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())
print(json.dumps({'child_wall_s':round(w,2),'cpu_s':round(cpu/1e9,2),'runq_s':round(rq/1e9,2),
 'blocked_s':round(w-cpu/1e9-rq/1e9,2),'read_mb':int(io['read_bytes'])//10**6}))"
cold() { rm -rf $OUT; sync; echo 3 > /proc/sys/vm/drop_caches; }
for r in $(seq $2); do
  cold; echo "{\"round\": $r, \"mode\": \"alone\", \"child\": $(python3 -c "$PROBE" 2>/dev/null)}"
  case " ${MODES:-noautoload} " in *" noautoload "*)
    cold; echo "{\"round\": $r, \"mode\": \"alone_noautoload\", \"child\": $(TORCH_DEVICE_BACKEND_AUTOLOAD=0 python3 -c "$PROBE" 2>/dev/null)}";; esac
  for mode in ${MODES:-beside idle small pinned noautoload}; do
    cold; P=""; X=""; Q=""
    case $mode in idle) P="ionice -c3";; small) X="--buffer-size 2MiB";; pinned) P="taskset -c 0"; Q="taskset -c 1";;
      noautoload) Q="env TORCH_DEVICE_BACKEND_AUTOLOAD=0";; esac
    s=$(date +%s.%N)
    STREAMMERGE_ARCH_CHECK=0 $P python3 -m streammerge $A $OUT --dtype bfloat16 --no-optimizer --no-progress $X \
      >/dev/null 2>&1 & M=$!
    sleep 0.3; child=$($Q python3 -c "$PROBE" 2>/dev/null); wait $M; e=$(date +%s.%N)
    echo "{\"round\": $r, \"mode\": \"$mode\", \"child\": $child, \"merge_wall_s\": $(echo "$e - $s" | bc)}"
  done
done
rm -rf $OUT
