#!/usr/bin/env bash
# The exact commands that produced the adapters shipped in src/m2r2/adapters/ for the embedded
# SmolLM2-135M-Instruct (each adapter.json records its own command, data size, steps and wall time).
# On 2 CPU cores: data ~20 min, training ~1 h per rate. Everything resumes if interrupted: re-run.
set -euo pipefail
RATE=${RATE:-2}
pip install -e ".[train]"
m2r2 data --n 768 --max-new-tokens 160 --batch-size 16 --out data/distill-smollm2-135m
m2r2 train --data data/distill-smollm2-135m --out "runs/adapter-r$RATE" --rate "$RATE" --steps "${STEPS:-400}"
mkdir -p "src/m2r2/adapters/smollm2-135m-instruct-r$RATE"
cp "runs/adapter-r$RATE/adapter.json" "runs/adapter-r$RATE/adapter.safetensors" \
   "src/m2r2/adapters/smollm2-135m-instruct-r$RATE/"
m2r2 analyze --rate "$RATE" --out "analyze-r$RATE"
