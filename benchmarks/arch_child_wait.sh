#!/usr/bin/env bash
# Where the architecture check's child sleeps beside a merge after its imports were read ahead (issue 15): the child
# (as in arch_child_ahead.sh) beside a merge with the check off, its kernel stacks sampled (wait_sampler.py), after
# drop_caches=3 and a read-ahead of its list; after drop_caches=1 (file pages only: inodes and directories kept)
# and the read-ahead; after drop_caches=3 and the read-ahead with a stat of every entry of each listed folder and
# its parents (meta=True); and with all its pages cached.
# Usage: benchmarks/arch_child_wait.sh PRESET ROUNDS OUTDIR   (root: it drops the page cache; device machine)
set -e; export PYTHONPATH=$PWD PYTHONPYCACHEPREFIX=/var/tmp/pyc PYTHONDONTWRITEBYTECODE= STREAMMERGE_CACHE=/var/tmp/smcache
[ -d /var/tmp/ck ] || python3 benchmarks/make_checkpoint.py /var/tmp/ck --preset $1 --world-size 8 >/dev/null
A=/var/tmp/ck/global_step_1/actor; C=$A/huggingface/config.json; OUT=/var/tmp/ahead_out; R=$3; mkdir -p $R
python3 -m streammerge $A $OUT --dtype bfloat16 --no-optimizer --no-progress >/dev/null 2>&1; sleep 5; rm -rf $OUT
L=$(ls $STREAMMERGE_CACHE/imports/*.json)
PROBE="import json,time; t=time.perf_counter()
from streammerge.architecture import describe
describe(json.load(open('$C')), [])
w=time.perf_counter()-t
cpu,rq,_=map(int,open('/proc/self/schedstat').read().split())
io=dict(l.split(': ') for l in open('/proc/self/io').read().splitlines())
st=open('/proc/self/stat').read().rsplit(')',1)[1].split()
print(json.dumps({'child_wall_s':round(w,2),'cpu_s':round(cpu/1e9,2),'runq_s':round(rq/1e9,2),
 'blocked_s':round(w-cpu/1e9-rq/1e9,2),'majflt':int(st[9]),'read_mb':int(io['read_bytes'])//10**6,
 'syscr':int(io['syscr'])}))"
AHEAD="from streammerge import imports_ahead as i; from pathlib import Path; import json; a=i.read_ahead(Path('$L'),meta=False); print(json.dumps({'ahead_mb':a.bytes//10**6,'ahead_s':round(a.seconds,2)}))"
META="from streammerge import imports_ahead as i; from pathlib import Path; import json; a=i.read_ahead(Path('$L')); print(json.dumps({'ahead_mb':a.bytes//10**6,'ahead_s':round(a.seconds,2)}))"
EVICT="import os,glob
for f in glob.glob('$A/*.pt'):
    fd=os.open(f,os.O_RDONLY); os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.close(fd)"
cold() { rm -rf $OUT; sync; echo $1 > /proc/sys/vm/drop_caches; }
for r in $(seq $2); do
  for mode in ahead ahead_drop1 ahead_meta warm; do
    X=""; Y=""
    case $mode in
      ahead) cold 3; X=$(python3 -c "$AHEAD");;
      ahead_drop1) cold 1; X=$(python3 -c "$AHEAD");;
      ahead_meta) cold 3; X=$(python3 -c "$META");;
      warm) rm -rf $OUT; python3 -c "$PROBE" >/dev/null 2>&1; sync; python3 -c "$EVICT";;
    esac
    s=$(date +%s.%N)
    STREAMMERGE_ARCH_CHECK=0 python3 -m streammerge $A $OUT --dtype bfloat16 --no-optimizer --no-progress \
      >/dev/null 2>&1 & M=$!
    sleep 0.3; python3 -c "$PROBE" > $R/child.json 2>/dev/null & P=$!
    python3 benchmarks/wait_sampler.py $P > $R/stacks_${mode}_$r.json; wait $P; wait $M; e=$(date +%s.%N)
    echo "{\"round\": $r, \"mode\": \"$mode\", \"child\": $(cat $R/child.json), \"merge_wall_s\": $(python3 -c "print(round($e - $s, 2))"), \"ahead\": ${X:-null}, \"meta\": ${Y:-null}}"
  done
done
rm -rf $OUT
