#!/usr/bin/env bash
# The exact commands that produced the speculative peers shipped in src/m2r2/adapters/ for the embedded
# SmolLM2-135M-Instruct, on the data and budget of the shipped R=3/R=4 M2R2 adapters (40 steps of 4
# sequences, max 320 tokens, seed 0: the same batches and scored tokens; 1 thread). Each artifact's json
# records its command, scored tokens and wall time. Resumable: re-run the same command.
#   scripts/train_peers.sh
set -euo pipefail
# the Kangaroo/DEED-style exit adapter (the early-exit-adapter arm): depth ceil(30/2) = 15
m2r2 train --data data/distill-smollm2-135m --out runs/exit-r2 --kind exit --rate 2 --steps 40 --warmup-steps 8 \
  --threads 1 --no-progress
python -c "from m2r2.stream.accelerator import ship; ship('runs/exit-r2', 'src/m2r2/adapters/smollm2-135m-instruct-exit-r2')"
# Medusa heads (3) and the 2-model draft (layers 0-3 of the target + LoRA rank 32), one teacher forward per batch
# shipped: started with --steps 40, stopped at the step-30 checkpoint for time (17,061 of 22,566 tokens); the
# same command with --stop-at 30 resumes at step 30 and exports (drop it to train all 40 steps)
python -m m2r2.training.peers --data data/distill-smollm2-135m --out runs/peers --steps 40 --warmup-steps 8 --stop-at 30 \
  --threads 1 --draft-layers 0,1,2,3 --no-progress
python -c "from m2r2.training.peers import ship; ship('runs/peers/medusa', 'src/m2r2/adapters/smollm2-135m-instruct-medusa'); ship('runs/peers/draft', 'src/m2r2/adapters/smollm2-135m-instruct-draft')"
# the benchmark with every arm (run at 64 new tokens for time; the setting is --max-new-tokens 128)
m2r2 bench spec --per-category 1 --max-new-tokens 64 --threads 1
# the EAGLE-style draft head (strategy eagle): 1800 steps of 4 sequences (max 320 tokens) on the 2048-prompt
# distillation data, 2 threads; then shipped as float16 with its draft vocabulary
python -m m2r2.training.eagle --data data/distill-smollm2-135m-2048 --out runs/eagle-1800 --steps 1800 --warmup-steps 20 \
  --threads 2 --no-progress
python -c "from m2r2.training.eagle import ship; ship('runs/eagle-1800', 'src/m2r2/adapters/smollm2-135m-instruct-eagle')"
