#!/usr/bin/env bash
# The exact commands that produced the adapters shipped in src/m2r2/adapters/ for the embedded
# SmolLM2-135M-Instruct (each adapter.json records its own command, data size, steps and wall time).
# On 2 CPU cores: data ~21 min; training ~45 min for R=2 (500 steps), less for R=3/R=4 and the exit adapter.
# Everything resumes if interrupted: re-run the same command.
#   RATE=2 scripts/train_embedded.sh               # the M2R2 fast stream, rate 2 (default settings)
#   RATE=3 STEPS=40 WARMUP=8 THREADS=1 scripts/train_embedded.sh   # the shipped R=3 / R=4 (short budget)
#   KIND=exit STEPS=250 scripts/train_embedded.sh  # the early-exit peer's single exit adapter (depth 15)
set -euo pipefail
RATE=${RATE:-2}
KIND=${KIND:-m2r2}
STEPS=${STEPS:-500}
WARMUP=${WARMUP:-20}
THREADS=${THREADS:-2}
if [ "$KIND" = exit ]; then NAME="smollm2-135m-instruct-exit-r$RATE"; RUN="runs/exit-r$RATE"
else NAME="smollm2-135m-instruct-r$RATE"; RUN="runs/adapter-r$RATE"; fi
pip install -e ".[train]"
m2r2 data --n 768 --max-new-tokens 160 --batch-size 16 --out data/distill-smollm2-135m
m2r2 train --data data/distill-smollm2-135m --out "$RUN" --kind "$KIND" --rate "$RATE" --steps "$STEPS" \
  --warmup-steps "$WARMUP" --threads "$THREADS"
python -c "from m2r2.stream.accelerator import ship; ship('$RUN', 'src/m2r2/adapters/$NAME')"   # float16 copy
if [ "$KIND" = m2r2 ] && [ "$RATE" = 2 ]; then   # ARLA, the exit router, for the R=2 adapter
  m2r2 train-router --data data/distill-smollm2-135m --adapter "$RUN" --sequences 200 --threads "$THREADS"
  python -c "from m2r2.stream.accelerator import ship; ship('$RUN', 'src/m2r2/adapters/$NAME')"
fi
# after all rates: m2r2 analyze --rate 2,3,4 --max-new-tokens 48 --out analyze-r234
