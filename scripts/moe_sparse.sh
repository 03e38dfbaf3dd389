#!/usr/bin/env bash
# The exact commands behind the shipped sparse MoE (src/m2r2/moe/shipped/smollm2-135m-e16: 16 experts of 96
# neurons per layer, top-4 = a quarter of the FFN per token, recovered by a short fine-tune) and its benchmarks.
# On 2 cores: MoEfication ~1 min, recovery ~35 min, each quality run ~5 min, the benchmark ~40 min (run it alone).
set -euo pipefail
# self-distillation data (ShareGPT prompts + the model's own answers); see scripts/train_embedded.sh
[ -d data/distill-smollm2-135m ] || m2r2 data --n 768 --max-new-tokens 160 --batch-size 16 --out data/distill-smollm2-135m
[ -d data/distill-smollm2-135m-2048 ] || m2r2 data --n 2048 --max-new-tokens 160 --batch-size 16 --out data/distill-smollm2-135m-2048
# 1. MoEfication: 16 co-activation clusters of 96 neurons per layer, ridge routers, top-4
m2r2 moefy --experts 16 --top-k 4 --out runs/moefy-e16 --threads 2
# 2. recovery: rank-16 deltas on every layer's gate/up/down, trained so that the top-4 MoE matches the dense
#    model's next-token distribution (KL), 300 steps x 4 records x <= 256 tokens
python -m m2r2.moe.recover --moe runs/moefy-e16 --data data/distill-smollm2-135m-2048 --out runs/moe-e16-rec \
  --steps 300 --threads 2 --batch-size 4 --max-len 256
# 3. quality against the dense model, before and after recovery, on the same held-out records (none trained on);
#    the recovered one with its experts as Q8_0 (the benchmark's format) and as Q4_1
m2r2 moefy --artifacts runs/moe-e16-rec --eval-top-k 4 --expert-format q8_0 \
  --quality-out benchmarks/results/moe-quality-e16.json --threads 2
m2r2 moefy --artifacts runs/moe-e16-rec --eval-top-k 4 --expert-format q4_1 \
  --quality-out benchmarks/results/moe-quality-e16-q4_1.json --threads 2
m2r2 moefy --artifacts runs/moefy-e16 --heldout-unseen-by runs/moe-e16-rec --eval-top-k 4 --expert-format q4_1 \
  --quality-out benchmarks/results/moe-quality-e16-plain.json --threads 2
# 4. ship (perm + routers + float16 deltas, ~6 MB; the experts are rebuilt from the GGUF's weights at load)
mkdir -p src/m2r2/moe/shipped/smollm2-135m-e16
cp runs/moe-e16-rec/moe.json runs/moe-e16-rec/moe.safetensors src/m2r2/moe/shipped/smollm2-135m-e16/
# 5. offloading benchmark (quiet machine, clean tree): 20 MT-Bench prompts x 64 tokens, 3 budgets x 3 links
m2r2 bench moe --no-progress --out moe
# real storage: one file per expert read with O_DIRECT (fewer runs: this VM's disk is slow)
m2r2 bench moe --bandwidth none --storage --budget 0.25 --limit 6 --no-progress --out moe-storage
