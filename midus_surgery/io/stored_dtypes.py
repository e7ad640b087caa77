"""Floating-point tensors stored as integers or booleans in safetensors files.

transformers' load casts such a tensor into the model's float parameter without a word (an up_proj stored as
int32 loads as its integer values, trial61), so every reader of weights asks here: eval's and train's header
checks, the strict load, and verify. A model's own integer tensors (buffers) are not asked about: only the
tensors the model holds as floating point.
"""

from __future__ import annotations

from pathlib import Path


def is_float_tag(tag: str) -> bool:
    """Whether a safetensors dtype tag ("F32", "BF16", "F8_E4M3", "I32", "BOOL"...) is a floating-point one."""
    return tag.startswith(("F", "BF"))


def floats_stored_as_integers(tags: dict[str, str], model) -> str | None:
    """What is wrong when floating-point tensors of ``model`` are stored as integers or booleans (``tags``: module
    name -> safetensors dtype tag), in one phrase naming up to three; None when there are none, or the model is
    quantized (its checkpoint's dtypes follow the quantizer's rules)."""
    if getattr(getattr(model, "config", None), "quantization_config", None):
        return None
    floats = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    wrong = sorted(f"{name} ({tags[name]})" for name in floats & tags.keys() if not is_float_tag(tags[name]))
    if not wrong:
        return None
    more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
    return (f"{len(wrong)} floating-point tensor(s) stored as integers or booleans, which the load would cast without a word: "
            f"{', '.join(wrong[:3])}{more}")


def stored_dtype_problem(path, model, renames) -> str | None:
    """``floats_stored_as_integers`` for ``model`` against the safetensors headers in ``path``, their names mapped by
    ``renames`` (transformers' load renames, ``compiler.plan.load_renames``; None: none). None without safetensors
    files (pickle weights are not read here) or when the headers do not read (the load said what it could not)."""
    from midus_surgery.errors import MidusError
    from midus_surgery.io.tensor_source import stored_by_module_name

    d = Path(path)
    if not (d / "model.safetensors.index.json").is_file() and not any(d.glob("*.safetensors")):
        return None
    try:
        held = stored_by_module_name(d, renames)
    except MidusError:
        return None
    return floats_stored_as_integers({name: tag for name, (tag, _) in held.items()}, model)
