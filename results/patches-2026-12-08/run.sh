#!/bin/bash
# usage: run.sh SNAP LABEL SEED [extra simulate args...]   (SNAP: a copy of the tree under /work/snaps)
snap=/work/snaps/$1; label=$2; seed=$3; shift 3
cd $snap
export PYTHONPATH=$snap
py=/work/main/.venv/bin/python
key=$($py -c "from simulations.bench import validation_key; print(validation_key($seed))")
out=/work/exp/runs/$label-s$seed
rm -rf $out
start=$(date +%s)
$py -m common.cli simulate --seed $seed --validation-key $key --out $out --ledger-dir $out/sites "$@" > /work/exp/logs-$label-s$seed.log 2>&1
echo "$label seed $seed rc $? $(( $(date +%s) - start )) s" >> /work/exp/done.txt
