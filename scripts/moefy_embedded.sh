#!/usr/bin/env bash
# The exact commands that produced the MoEfied embedded model shipped in src/m2r2/moe/shipped/ (neuron
# groups + routers, ~0.7 MB; the experts themselves are rebuilt from the dense weights at load time) and the
# MoE offloading benchmark. Single-threaded; on a shared 2-core machine the MoEfication with its quality
# sweep took ~30 min, the benchmark ~20 min.
#   scripts/moefy_embedded.sh                # MoEfy (8 experts/layer), quality at k=2,3,4,6, then the benchmark
#   EXPERTS=16 KS=4,8,12 scripts/moefy_embedded.sh   # another granularity (not shipped)
set -euo pipefail
EXPERTS=${EXPERTS:-8}
KS=${KS:-2,3,4,6}
OUT=src/m2r2/moe/shipped/smollm2-135m-e$EXPERTS
# self-distillation data (ShareGPT prompts + the model's own answers); see scripts/train_embedded.sh
[ -d data/distill-smollm2-135m ] || m2r2 data --n 768 --max-new-tokens 160 --batch-size 16 --out data/distill-smollm2-135m
m2r2 moefy --experts "$EXPERTS" --top-k 2 --out "$OUT" --eval-top-k "$KS" \
  --quality-out "benchmarks/results/moe-quality-e$EXPERTS.json" --threads 1
# the shipped default top-k (6 of 8) was then set from the quality numbers (see moe.json: default_top_k_reason)
python - "$OUT" <<'PY'
import dataclasses, sys
from m2r2.moe.moefy import MoEfyArtifacts
a = MoEfyArtifacts.load(sys.argv[1])
a.spec = dataclasses.replace(a.spec, top_k=6)
a.save(sys.argv[1])
PY
# offloading: modelled flash-class (2 GB/s) and faster (8 GB/s) links, 50 us per transfer, three budgets
m2r2 bench moe --limit 3 --max-new-tokens 24 --budget 0.125,0.25,0.5 --bandwidth 2,8 --threads 1 --out moe
# real storage reads with O_DIRECT (slow on this VM's disk: fewer tokens)
m2r2 bench moe --limit 2 --max-new-tokens 12 --budget 0.25 --bandwidth none --storage --threads 1 --out moe-storage
