"""dtype names (torch's spelling, as config.json and recipes write them) and safetensors tags.

Torch-free, so that a copy-only ``apply`` plans and writes without importing torch.
"""

from __future__ import annotations

# dtype name -> safetensors dtype tag
TAGS = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
DTYPE_OF_TAG = {tag: name for name, tag in TAGS.items()}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Every dtype tag a base's safetensors file may hold that torch reads (safetensors.torch's own table):
# the ones the tool writes, and those it only converts from.
STORED_ITEMSIZE = {**ITEMSIZE, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "U16": 2, "U32": 4, "U64": 8,
                   "C64": 8}
FLOATS = ("float64", "float32", "float16", "bfloat16")


def dtype_name(value) -> str | None:
    """'bfloat16' for torch.bfloat16, 'bfloat16' or 'torch.bfloat16'; None for anything else."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    return name if name in TAGS else None


def auto_dtype(config_dtype) -> str:
    """The output dtype of ``output.dtype: auto``: the base config's dtype, float32 when it has none."""
    return dtype_name(config_dtype) or "float32"


def torch_dtype(name: str):
    """The torch dtype of a dtype name (imports torch: only for tensors that are materialised)."""
    import torch

    return getattr(torch, name)


def tag_of(tensor_dtype) -> str | None:
    """The safetensors tag of a torch dtype."""
    name = dtype_name(tensor_dtype)
    return TAGS[name] if name else None
