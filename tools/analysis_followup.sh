#!/usr/bin/env bash
# The follow-up run of docs/analysis.md (after tools/demo.sh and tools/demo_eval.sh): slot usage of the
# untrained MIDUS output, then the demo's training run with one knob changed (memory.query_norm:
# layer instead of rms: centred queries), its slot usage, and held-out perplexity beside the demo's.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
variant=work/runs/demo-smollm2-midus-qn-layer

step "1/4 slot usage of the untrained MIDUS output (the retrieval before any training)"
midus-surgery analyze work/out/smollm2-135m-midus --data work/corpora/git-doc --out work/analysis/smollm2-135m-midus-untrained --overwrite \
  --block-size 256 --max-blocks 8 --slots-only --quiet

step "2/4 the MIDUS recipe with query_norm: layer, trained as the demo trains (same data, budget, seed)"
midus-surgery apply recipes/ablation/smollm2-135m-midus-qn-layer.yaml --overwrite
python tools/remove_own_dir.py "$variant"  # the previous run of this script only
midus-surgery train recipes/train/smollm2-midus.yaml \
  init_from=../../work/out/smollm2-135m-midus-qn-layer run_dir=../../$variant resume=null \
  "data.train=[../../work/corpora/python3.11-doc]" data.held_out_fraction=0.01 data.block_size=256 \
  tokens=24576 micro_batch_size=4 grad_accum=1 optim.warmup=2 \
  eval.every=12 eval.max_blocks=8 log.every=4 checkpoint.every=12 --quiet

step "3/4 its slot usage (git docs)"
midus-surgery analyze "$variant/final" --data work/corpora/git-doc --out work/analysis/demo-smollm2-midus-qn-layer --overwrite \
  --block-size 256 --max-blocks 8 --slots-only --quiet

step "4/4 held-out perplexity: base, the demo's MIDUS (rms) and the layer-norm variant"
for corpus in python3.11-doc git-doc; do
  midus-surgery eval work/smollm2-135m work/runs/demo-smollm2-midus/final "$variant/final" \
    --data "work/corpora/$corpus" --block-size 256 --max-blocks 8 --quiet
done
