"""`midus-surgery verify`: load an emitted model and check that it is what the recipe promised.

Every transformers call passes an explicit ``trust_remote_code`` (the recipe's, recorded in
midus_plan.json; False for any other directory): with None, transformers asks on the terminal
whether to run a model's own code, and verify must never stop at a prompt.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from midus_surgery.compiler.plan import read_plan_file
from midus_surgery.errors import MidusError, one_line

SAMPLE_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, "
    "including both the natural and social sciences. Science is a body of empirical, theoretical, and "
    "practical knowledge about the natural world, produced by scientists who emphasize the observation, "
    "explanation, and prediction of real-world phenomena."
)
PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _load(path: Path, gguf_file: str | None = None, *, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM  # MIDUS classes: registered by this package's __init__

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                       trust_remote_code=trust_remote_code, **kwargs)
    return model.eval(), info


def _tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from midus_surgery.emit.emitter import TOKENIZER_FILES

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None  # checked on fixed random token ids instead
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is not the model's fault
        return None
    return tokenizer if len(tokenizer(PROMPT).input_ids) else None


def _file_tensor_names(path: Path) -> set[str]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    names: set[str] = set()
    for file in files:
        with safe_open(str(path / file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def _batch(model, tokenizer) -> torch.Tensor:
    if tokenizer is not None:
        ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids
        return ids[:, :64]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (2, 32), generator=generator)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    return float(torch.exp(model(input_ids=ids, labels=ids, use_cache=False).loss))


def function_preserving(plan: dict) -> bool:
    """True when every inserted block starts as the identity (so logits must equal the base's).
    ``plan``: as ``read_plan_file`` gives it, in today's layout whatever layout it was written in."""
    init = (plan.get("midus") or {}).get("hml", {}).get("init")
    for layer in plan["layers"]:
        if layer["kind"] == "copy":
            return False
        if layer["kind"] == "memory" and init == "random":
            return False
    return True


def verify(out: Path, base: Path | None = None, *, report=print) -> list[Check]:
    """Run every check, reporting each as it completes; returns them all."""
    out = Path(out)
    if not (out / "config.json").is_file():
        raise MidusError(f"{out} is not a model directory (no config.json)")
    plan = read_plan_file(out)  # None: not made by `apply`
    trust = bool(plan.get("trust_remote_code")) if plan is not None else False
    checks: list[Check] = []

    def record(check: Check) -> None:
        checks.append(check)
        report(check)

    try:
        model, info = _load(out, trust_remote_code=trust)
    except Exception as exc:  # noqa: BLE001 - any load failure is the check's result
        record(Check("load", False, f"{type(exc).__name__}: {exc}"))
        return checks
    on_disk = _file_tensor_names(out)
    in_model = set(model.state_dict().keys())
    missing = sorted(set(info.get("missing_keys", [])) | (in_model - on_disk - _tied_names(model)))
    unexpected = sorted(set(info.get("unexpected_keys", [])) | (on_disk - in_model))
    record(Check("tensors", not missing and not unexpected,
                 f"{len(on_disk)} tensors on disk, all loaded" if not missing and not unexpected else f"missing {missing[:5]}, unexpected {unexpected[:5]}"))

    tokenizer = _tokenizer(out, trust)
    ids = _batch(model, tokenizer)
    try:
        logits = _logits(model, ids)
    except Exception as exc:  # noqa: BLE001 - a model that cannot run is the check's result
        record(Check("forward", False, f"the model fails to run a forward pass: {one_line(exc, 300)}"))
        return checks

    base_path = base or (Path(plan["base_path"]) if plan and plan.get("base_path") else None)
    if base_path is not None:
        base_dir, gguf = (base_path.parent, base_path.name) if base_path.suffix == ".gguf" else (base_path, None)
        base_model, _ = _load(base_dir, gguf, trust_remote_code=trust)
        try:
            base_logits = _logits(base_model, ids)
        except Exception as exc:  # noqa: BLE001
            record(Check("identity", False, f"the base model {base_dir} fails to run a forward pass: {one_line(exc, 300)}"))
            return checks
        diff = float((logits - base_logits).abs().max())
        trained = (out / "midus_train.json").is_file()  # written by `midus-surgery train` on export
        if not trained and (plan is None or function_preserving(plan)):
            record(Check("identity", diff == 0.0, f"max |logit difference| against the base: {diff:g} (every inserted block starts as the identity, so it must be 0)"))
        else:
            ppl_out, ppl_base = perplexity(model, ids), perplexity(base_model, ids)
            why = "trained since apply" if trained else "plain copies change the function"
            record(Check("logits", True, f"max |logit difference| against the base: {diff:.4g} ({why}); perplexity on the sample: base {ppl_base:.2f}, output {ppl_out:.2f}"))
        del base_model
    else:
        record(Check("identity", True, "skipped: no base given (--base) and none recorded"))

    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids if tokenizer is not None else ids[:1, :8]
    try:
        with torch.no_grad():
            kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else None)
            cached = model.generate(prompt, use_cache=True, **kwargs)
            uncached = model.generate(prompt, use_cache=False, **kwargs)
    except Exception as exc:  # noqa: BLE001
        record(Check("kv-cache", False, f"generation fails: {one_line(exc, 300)}"))
    else:
        text = tokenizer.decode(cached[0, prompt.shape[1]:]) if tokenizer is not None else cached[0].tolist()
        record(Check("kv-cache", torch.equal(cached, uncached), f"greedy generation with and without KV cache {'agree' if torch.equal(cached, uncached) else 'DIFFER'}: {text!r}"))

    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            reloaded, _ = _load(Path(tmp), trust_remote_code=trust)
            again = _logits(reloaded, ids)
    except Exception as exc:  # noqa: BLE001
        record(Check("round-trip", False, f"save_pretrained + reload fails: {one_line(exc, 300)}"))
    else:
        record(_round_trip_check(model.state_dict(), reloaded.state_dict(), logits, again))
    return checks


def _round_trip_check(before: dict, after: dict, logits: torch.Tensor, again: torch.Tensor) -> Check:
    """save_pretrained + reload must give back every tensor bit for bit, and the same function.

    The logits may differ by float rounding alone: transformers saves a MoE's stacked experts one
    tensor per expert and stacks them again on load, at other memory alignments, and the CPU
    kernels round differently on differently aligned data (~1e-7 in fp32).
    """
    changed = sorted(set(before) ^ set(after)) or [k for k in before if not torch.equal(before[k], after[k])]
    if changed:
        return Check("round-trip", False, f"save_pretrained + reload changed {len(changed)} tensors, e.g. {changed[0]}")
    diff = float((logits - again).abs().max())
    if diff == 0.0:
        return Check("round-trip", True, "save_pretrained + reload gives identical tensors and logits")
    close = torch.allclose(logits, again, rtol=1e-5, atol=1e-5)
    return Check("round-trip", close, f"save_pretrained + reload gives identical tensors; logits {'within float rounding' if close else 'DIFFER'}: max difference {diff:g}")


def _tied_names(model) -> set[str]:
    """State-dict names that alias another tensor (tied embeddings), not written separately."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            tied.add(name)
        seen[key] = name
    return tied
