#!/bin/bash
# A/B of the house restructure: the same two benchmark commands at the commit before (1b9b32e) and after.
set -x
ARMS_SPEC=m2r2-plain,m2r2,m2r2-full-vocab,m2r2-confstop,m2r2-int8,m2r2-r3,m2r2-r4,early-exit,early-exit-adapter,quant-draft,quant-draft-fp16,prompt-lookup,lookahead,medusa,draft-model,hf-pld,hf-assist,llamacpp
cd /work/wt-before
PYTHONPATH=/work/wt-before/src python -m m2r2.cli bench decode --limit 10 --max-new-tokens 128 --threads 2 --no-progress --arms m2r2-plain,m2r2-fp16,hf-generate,llamacpp --out house-before-decode > /tmp/ab/before-decode.log 2>&1
cd /work/main
m2r2 bench decode --limit 10 --max-new-tokens 128 --threads 2 --no-progress --arms m2r2-plain,m2r2-fp16,hf-generate,llamacpp --out house-after-decode > /tmp/ab/after-decode.log 2>&1
cd /work/wt-before
PYTHONPATH=/work/wt-before/src python -m m2r2.cli bench spec --per-category 1 --max-new-tokens 64 --threads 2 --no-progress --out house-before-spec --arms $ARMS_SPEC > /tmp/ab/before-spec.log 2>&1
cd /work/main
m2r2 bench spec --per-category 1 --max-new-tokens 64 --threads 2 --no-progress --out house-after-spec --arms $ARMS_SPEC > /tmp/ab/after-spec.log 2>&1
echo done > /tmp/ab/DONE
