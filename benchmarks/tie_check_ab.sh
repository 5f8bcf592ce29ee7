#!/bin/bash
# What the tied-embedding byte check costs: keep-dtype merges of one DCP checkpoint whose tied lm_head is stored
# twice, by three checkouts of streammerge, cold cache before every run, the order rotated every round.
#
#   benchmarks/tie_check_ab.sh DCP_DIR ROUNDS NAME=PYTHONPATH [NAME=PYTHONPATH ...]
#   e.g. python -c "from streammerge.testing.presets import make_dcp_checkpoint as m; m('/tmp/dcp05', world_size=4)"
#        benchmarks/tie_check_ab.sh /tmp/dcp05 5 pre=/tmp/pre drop=/tmp/drop cached=$PWD
#
# Each line: name, wall s, user s, sys s, peak RSS (GNU time). Needs root (drop_caches).
set -eu
ck=$1; rounds=$2; shift 2
variants=("$@"); n=${#variants[@]}
out=$(mktemp -d)
for i in $(seq "$rounds"); do
  for j in $(seq 0 $((n - 1))); do
    v=${variants[$(( (i + j) % n ))]}
    rm -rf "$out/o"; sync; echo 3 > /proc/sys/vm/drop_caches; sleep 1
    PYTHONPATH=${v#*=} /usr/bin/time -f "${v%%=*} %e %U %S %MkB" -o "$out/t" \
      python -m streammerge "$ck" "$out/o" --dtype keep --no-optimizer --no-progress > /dev/null
    cat "$out/t"
  done
done
rm -rf "$out"
