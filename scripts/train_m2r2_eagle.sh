#!/bin/bash
# The m2r2-eagle adapter and its equal-budget comparison (issue 20): the shipped R=2 fast stream continued 120 steps
# on the 2,048-prompt distillation data, once plain and once seeing the slow stream's previous final state, on the
# same batches; the seeing one ships as smollm2-135m-instruct-r2-eagle. Then the held-out comparison.
set -euo pipefail
for v in plain sees; do
  extra=""; [ "$v" = sees ] && extra="--sees-slow"
  m2r2 train --data data/distill-smollm2-135m-2048 --init-from src/m2r2/adapters/smollm2-135m-instruct-r2 \
    --out "runs/r2-ft120-$v" --rate 2 --steps 120 --lr 1e-3 --warmup-steps 10 --threads 2 --no-progress $extra
done
python -c "from m2r2.stream.accelerator import ship; ship('runs/r2-ft120-sees', 'src/m2r2/adapters/smollm2-135m-instruct-r2-eagle')"
python scripts/compare_training_logs.py runs/r2-ft120-plain runs/r2-ft120-sees --out benchmarks/results/m2r2-eagle-training.json
# each on a quiet machine, one after another:
m2r2 bench spec --per-category 10 --max-new-tokens 128 --threads 2 --no-progress --out spec-m2r2-ft120 \
  --adapter runs/r2-ft120-plain --arms m2r2-plain,m2r2
