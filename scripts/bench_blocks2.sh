#!/bin/sh
# The second part of the block-kernel benchmarks (after scripts/bench_blocks.sh), one after another on a quiet
# machine: prefill on 36/128/512-token prompts, resident memory, and the speculative and early-exit benchmarks
# re-run on the default (GGUF block) path:  sh scripts/bench_blocks2.sh
set -e
m2r2 bench decode --prompt-ids benchmarks/results/prefill-prompt-ids.jsonl --max-new-tokens 1 --threads 2 --no-progress --arms m2r2-gguf,m2r2-plain,hf-generate,llamacpp --out prefill
python scripts/probe_rss.py
m2r2 bench spec --per-category 1 --max-new-tokens 64 --threads 2 --no-progress --out spec --arms m2r2-plain,m2r2,m2r2-full-vocab,m2r2-confstop,m2r2-int8,m2r2-r3,m2r2-r4,early-exit,early-exit-adapter,quant-draft,quant-draft-fp16,prompt-lookup,lookahead,medusa,draft-model,hf-pld,hf-assist,llamacpp
m2r2 bench exit --prompts benchmarks/results/exit-mtbench-prompts.jsonl --threads 2 --thresholds 0.9,0.7 --methods calm,m2r2-exit,skipdecode,mod --skip-min-layers 24,18 --mod-skip 0.05,0.1 --no-progress --out exit-mtbench
