#!/usr/bin/env bash
# Downstream tasks and the memory's analysis for the README's SmolLM2 models, offline, on CPU
# (run tools/demo.sh first: it fetches SmolLM2-135M and the corpora and trains the MIDUS output).
#   1. the DUS and LLaMA-Pro outputs of the same base (recipes/smollm2-135m-{dus,llama-pro}.yaml)
#   2. the offline task suite from the git docs (held out: the demo trains on the Python docs)
#   3. base, DUS, LLaMA-Pro and the demo's trained MIDUS model side by side on it, one table
#   4. the demo's training run again with the memory's retrieval frozen (only the values train)
#   5. analyze the trained MIDUS model: head importance, slot usage, fixed vs learned retrieval (JSON + PNG)
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${LIMIT:-100}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step "1/5 the DUS and LLaMA-Pro outputs"
midus-surgery apply recipes/smollm2-135m-dus.yaml --overwrite
midus-surgery apply recipes/smollm2-135m-llama-pro.yaml --overwrite

step "2/5 the offline task suite (git docs)"
python tools/make_task_suite.py work/corpora/git-doc --out work/tasks

step "3/5 four models, two tasks, $limit items each"
midus-surgery eval work/smollm2-135m work/out/smollm2-135m-dus work/out/smollm2-135m-llama-pro work/runs/demo-smollm2-midus/final \
  --tasks midus_next_sentence midus_cloze --include-path work/tasks --limit "$limit" --batch-size 8 --quiet

step "4/5 the demo's training run with memory.retrieval: frozen (same data, budget and seed)"
frozen=work/runs/demo-smollm2-midus-frozen-retrieval
python tools/remove_own_dir.py "$frozen"  # the previous run of this script only
midus-surgery train recipes/train/smollm2-midus.yaml \
  init_from=../../work/out/smollm2-135m-midus run_dir=../../$frozen resume=null memory.retrieval=frozen \
  "data.train=[../../work/corpora/python3.11-doc]" data.held_out_fraction=0.01 data.block_size=256 \
  tokens=24576 micro_batch_size=4 grad_accum=1 optim.warmup=2 \
  eval.every=12 eval.max_blocks=8 log.every=4 checkpoint.every=12 --quiet

step "5/5 what the trained memory does, on text it did not train on (the git docs)"
midus-surgery analyze work/runs/demo-smollm2-midus/final --data work/corpora/git-doc --out work/analysis/demo-smollm2-midus --overwrite \
  --block-size 256 --max-blocks 8 --fixed-retrieval "$frozen/final" --cache-dir work/cache/tokens --quiet
