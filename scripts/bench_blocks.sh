#!/bin/sh
# The issue-17 benchmarks, one after another on a quiet machine (each arm in its own process):
#   sh scripts/bench_blocks.sh
set -e
m2r2 bench products --no-progress
m2r2 bench decode --max-new-tokens 128 --threads 2 --no-progress --arms m2r2-gguf,m2r2-plain,m2r2-fp16,hf-generate,llamacpp --out decode
m2r2 bench decode --max-new-tokens 128 --threads 2 --no-progress --arms m2r2-gguf,m2r2-plain,hf-generate,llamacpp --prompts benchmarks/results/specbench-60-prompts.jsonl --out decode-specbench
m2r2 bench serve --concurrency 1,4,8,16 --max-new-tokens 128 --threads 2 --no-progress --m2r2-weights gguf --out serve-gguf
