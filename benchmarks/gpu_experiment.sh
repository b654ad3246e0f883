#!/usr/bin/env bash
# Issue 6 §5 on the GPU machine, in one device call: the balance experiment (3 recipes x 3 seeds),
# both schedules scaled by one factor to fit BUDGET_MIN minutes (benchmarks/experiment_balance.py
# --time-budget), stopping after seed 0 if every model still predicts a single class.
#   device tool:  bash benchmarks/gpu_experiment.sh      (BUDGET_MIN=6 by default: with the build and
#                 the data set it fits a 10-minute call; a warm machine after gpu_check.sh rebuilds nothing)
# Checkpoints stay in runs/ (too big to send back); $OUT gets experiment.json, the logs and metrics.
set -uo pipefail
OUT_DEFAULT=runs/gpu_experiment
source "$(dirname "$0")/_gpu_env.sh"
BUDGET_MIN=${BUDGET_MIN:-6}
RUNS=${RUNS:-runs/experiment_gpu}
WORKERS=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))}

step "balance experiment: budget ${BUDGET_MIN} min, ${WORKERS} loader workers"
timeout $(( BUDGET_MIN * 60 + 120 )) $PY benchmarks/experiment_balance.py --out "$RUNS" --seeds 0 1 2 \
    --pretrain-epochs 8 --finetune-epochs 12 --time-budget "$BUDGET_MIN" --stop-at-prior \
    --workers "$WORKERS" --cache-images 2>&1 | tee "$OUT/experiment.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "collect results"
# Whatever finished, also after a timeout: experiment.json is rewritten after every evaluated run.
( cd "$RUNS" && find . \( -name experiment.json -o -name log.jsonl -o -name config.json -o -name metrics.json \
    -o -name '*.png' \) -print0 | xargs -0 -r cp --parents -t "$OUT" )
[ -s "$OUT/experiment.json" ] && $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({k: d[k] for k in ('pretrain_epochs','finetune_epochs')})); [print(r) for r in d['runs']]" "$OUT/experiment.json"
exit $status
