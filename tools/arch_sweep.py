"""Apply + verify DUS, LLaMA-Pro and MIDUS recipes on tiny random models of many architectures.

For each model type: a 4-layer random model built from its config (hidden 64, as transformers
builds any architecture), saved the way transformers saves it (so MoE experts are stored one
tensor per expert), then for each recipe kind: `compile` (validate + plan), `emit` (apply) and
`verify`, in this process. Prints one line per architecture and a summary; the outcome per
kind is `ok`, or the stage that refused or failed and its message's first line. A refusal by
`validate` with a clear message is a valid outcome for a layout the architecture cannot take.

    python tools/arch_sweep.py                      # the default list (a few minutes on 2 cores)
    python tools/arch_sweep.py mixtral qwen3_moe    # chosen model types
    python tools/arch_sweep.py --json               # one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from midus_surgery.errors import one_line  # light (no torch); the rest is imported where used
from midus_surgery.io.output_dir import remove_own_directory, use_workspace

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "work" / "arch-sweep"

# Sizes every config takes; EXTRA adds or drops ("DROP") what one architecture needs.
GENERIC = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=128, max_position_embeddings=128, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
EXTRA = {
    "falcon": dict(num_kv_heads=2, new_decoder_architecture=True, head_dim="DROP"),
    "gpt_bigcode": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128),
    "gptj": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128, rotary_dim=8),
    "codegen": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128, rotary_dim=8, n_ctx=128),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
DEFAULT_TYPES = ("llama mistral qwen2 qwen3 gemma gemma2 gemma3_text olmo olmo2 cohere cohere2 phi phi3 stablelm starcoder2 "
                 "granite falcon gpt2 gpt_neox gptj codegen gpt_bigcode opt glm4 smollm3 "
                 "mixtral qwen2_moe qwen3_moe olmoe granitemoe").split()
KINDS = {"dus": "transformer", "llama-pro": "identity", "midus": "memory"}
MEMORY = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n"


def build_base(model_type: str, directory: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in {**GENERIC, **EXTRA.get(model_type, {})}.items() if v != "DROP"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs))
    remove_own_directory(directory)  # inside the sweep's workspace
    model.save_pretrained(directory)


def try_kind(base: Path, kind: str, work: Path) -> str:
    """'ok', or '<stage>: <first line of the message>'."""
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import emit
    from midus_surgery.emit.verify import verify
    from midus_surgery.errors import MidusError, RecipeError

    out = work / f"{base.name}-{kind}"
    remove_own_directory(out)
    recipe = work / f"{base.name}-{kind}.yaml"
    recipe.write_text(f"base:\n  path: {base}\nlayout:\n  interleave:\n    after_every: 2\n    kind: {KINDS[kind]}\n"
                      f"{MEMORY if kind == 'midus' else ''}output:\n  dir: {out}\n  dtype: float32\n")
    try:
        planned = plan_recipe(recipe)
    except RecipeError as exc:
        return f"validate refused: {str(exc).strip().splitlines()[-1].strip()[:200]}"
    try:
        emit(planned, progress=False)
    except MidusError as exc:
        return f"apply failed: {one_line(exc)}"
    failed = [c for c in verify(out, report=lambda c: None) if not c.ok]
    remove_own_directory(out)
    return "ok" if not failed else f"verify failed: {failed[0].name}: {failed[0].detail[:200]}"


def sweep(model_types: list[str], work: Path, log) -> dict[str, dict[str, str]]:
    import midus_surgery  # noqa: F401 - registers the MIDUS classes

    use_workspace(work)  # a new folder or the sweep's own: what it builds inside is removed on a rerun
    results: dict[str, dict[str, str]] = {}
    for model_type in model_types:
        base = work / model_type
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_base(model_type, base)
        except Exception as exc:  # noqa: BLE001 - a config this script cannot build is reported, not fatal
            results[model_type] = {"build": one_line(exc)}
        else:
            results[model_type] = {kind: try_kind(base, kind, work) for kind in KINDS}
        log(f"{model_type:18s} " + "; ".join(f"{k}: {v}" for k, v in results[model_type].items()))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_types", nargs="*", help=f"model types (default: {len(DEFAULT_TYPES)} of them)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the tiny bases and recipes go")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = ap.parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    results = sweep(args.model_types or list(DEFAULT_TYPES), args.out, log)
    passing = [t for t, r in results.items() if all(v == "ok" for v in r.values())]
    if args.json:
        print(json.dumps({"results": results, "all_ok": passing}, indent=2))
    else:
        print(f"\nall three kinds ok: {len(passing)} of {len(results)} ({', '.join(passing)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
