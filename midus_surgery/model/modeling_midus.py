"""The emitted MIDUS model: the base architecture with Memory blocks made by submodule swaps.

This file is copied beside emitted weights (with configuration_midus.py and hml.py) and loaded
with ``trust_remote_code=True``, so it imports only torch, transformers and its two siblings.

A Memory block is the architecture's own decoder layer with three kinds of swap (MIDUS.md
section 2), so generation, KV cache, gradient checkpointing and FSDP wrapping by decoder-layer
class keep working unchanged:
- the attention output projection becomes an ``AttentionTap``: it keeps its input (the
  concatenated per-head outputs, [..., H*d_h]) and returns zeros, so attention adds nothing to
  the residual;
- the last FFN module becomes a ``MemoryReadout``: it returns HML(tapped heads) shaped like its
  input, which the layer adds to the residual; other FFN modules (OPT's fc1) become identities;
- the FFN-branch norms become identities.
With ``query_source: hidden`` (the generic variant) the attention keeps its output projection
and the readout queries the memory with the FFN branch's input instead.

``MidusForCausalLM(config)`` returns an instance of a subclass of both ``MidusForCausalLM`` and
the base causal LM class (e.g. ``LlamaForCausalLM``), created once per base architecture, so
the model *is* a LlamaForCausalLM to every tool that checks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_midus import MidusConfig
from .hml import HeadwiseMemory, HMLConfig, LatentBank
from .midus_names import SHARED_BANK


class AttentionTap(nn.Module):
    """Stands in for the attention output projection: keeps the per-head outputs, adds nothing."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.heads: torch.Tensor | None = None  # [..., H*d_h], read once by the readout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.heads = x
        return x.new_zeros(*x.shape[:-1], self.out_features)


class MemoryReadout(nn.Module):
    """Stands in for the FFN: returns the Head-wise Memory Layer's output, shaped like the FFN input,
    in the FFN's own calling convention: a tensor, or (mixtures of experts that also return router
    scores) a tuple of ``returns[0]`` entries with the output at ``returns[1]`` and None elsewhere."""

    def __init__(self, hml: HeadwiseMemory, tap: AttentionTap | None, num_heads: int, head_dim: int,
                 returns: tuple[int, int] | None = None):
        super().__init__()
        self.hml = hml
        # A plain attribute, not a submodule: the tap belongs to the attention module.
        object.__setattr__(self, "_tap", tap)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.returns = tuple(returns) if returns else None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self._read(x)
        if self.returns is None:
            return out
        length, at = self.returns
        return tuple(out if i == at else None for i in range(length))

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        tap = self._tap
        if tap is None:  # generic variant: query with the FFN branch's input, [..., hidden]
            return self.hml(x)
        heads, tap.heads = tap.heads, None
        if heads is None:
            raise RuntimeError("the memory readout ran before its attention: this architecture's block order is not sequential-attention-first")
        # [..., H*d_h] -> [..., H, d_h] -> HML -> [..., hidden]; reshaped like the FFN input
        # (OPT flattens tokens before its FFN).
        queries = heads.reshape(*heads.shape[:-1], self.num_heads, self.head_dim)
        out = self.hml(queries)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _out_features(module: nn.Module) -> int:
    """Output width of a linear layer (nn.Linear, or GPT-2's Conv1D which calls it ``nf``)."""
    for name in ("out_features", "nf"):
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    raise ValueError(f"cannot tell the output width of {type(module).__name__}")


def _swap(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def attention_shape(config) -> tuple[int, int]:
    """(heads, head width) as the config states them (configs without ``midus.memory_blocks``)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, head_dim


def _memory_blocks(config) -> dict[int, tuple[dict, int, int]]:
    """Output layer -> (the anatomy of its source layer, heads, head width) for every memory block.

    Configs written before hybrid stacks were planned per kind of layer have one anatomy for all
    and the heads from the config."""
    midus = config.midus
    if midus.get("memory_blocks"):
        return {int(i): (b["anatomy"], b["heads"], b["head_dim"]) for i, b in midus["memory_blocks"].items()}
    heads, head_dim = attention_shape(config)
    return {index: (midus["anatomy"], heads, head_dim) for index in midus["memory_layers"]}


def install_memory_blocks(model: nn.Module, config) -> None:
    """Turn the layers listed in ``config.midus['memory_layers']`` into Memory blocks, in place."""
    midus = config.midus
    hml_config = HMLConfig.from_dict(midus["hml"])
    blocks = _memory_blocks(config)
    bank = None
    if midus.get("share_bank"):
        bank = LatentBank(hml_config.n_subkeys, hml_config.latent_dim)
        model.add_module(SHARED_BANK, bank)
    for index in midus["memory_layers"]:
        anatomy, heads, head_dim = blocks[index]
        layer = model.get_submodule(anatomy["layers_path"])[index]
        hml = HeadwiseMemory(heads, head_dim, config.hidden_size, hml_config, bank=bank)
        tap = None
        if hml_config.query_source == "heads":
            tap = AttentionTap(_out_features(layer.get_submodule(anatomy["attn_out_proj"])))
            _swap(layer, anatomy["attn_out_proj"], tap)
        _swap(layer, anatomy["ffn"][-1], MemoryReadout(hml, tap, heads, head_dim, anatomy.get("ffn_tuple")))
        for path in list(anatomy["ffn"][:-1]) + list(anatomy["ffn_norms"]):
            _swap(layer, path, nn.Identity())


_CLASSES: dict[str, type] = {}


def midus_class_for(base_model_type: str) -> type:
    """The subclass of (MidusForCausalLM, <base causal LM class>) for one base architecture."""
    if base_model_type not in _CLASSES:
        import transformers

        name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(base_model_type)
        if name is None:
            raise ValueError(f"transformers has no causal LM class for model type {base_model_type!r}")
        base_cls = getattr(transformers, name)
        body = {"__module__": __name__, **_kernel_checks_of(base_cls)}
        _CLASSES[base_model_type] = type(f"Midus{name}", (MidusForCausalLM, base_cls), body)
    return _CLASSES[base_model_type]


def _kernel_checks_of(base_cls: type) -> dict:
    """The base class's answers to transformers' "which kernels can this class use?" checks.

    transformers answers them by reading the source file of the class's module, which for our
    classes is this file: a MoE base would fall back from ``grouped_mm`` experts to ``eager``
    ones (its logits then differ from the base's by float rounding, ~1e-8).
    """
    names = ("_can_set_attn_implementation", "_can_set_experts_implementation")
    return {name: classmethod(lambda cls, name=name: getattr(base_cls, name)()) for name in names if hasattr(base_cls, name)}


class MidusForCausalLM(PreTrainedModel):
    """A base causal LM up-scaled with MIDUS Memory blocks. See the module docstring."""

    config_class = MidusConfig

    def __new__(cls, config, *args, **kwargs):
        if cls is MidusForCausalLM:
            cls = midus_class_for(config.base_model_type)
        return super().__new__(cls)

    def __init__(self, config: MidusConfig, *args, **kwargs):
        base_cls = type(self).__mro__[type(self).__mro__.index(MidusForCausalLM) + 1]
        base_cls.__init__(self, config, *args, **kwargs)
        install_memory_blocks(self, config)
        self.reset_memory_parameters(seed=0)

    def reset_memory_parameters(self, seed: int = 0) -> None:
        """Initialise every memory tensor deterministically (from ``seed`` and its own name)."""
        zero_bank = self.config.midus["hml"].get("init") == "zero_bank"
        for name, module in self.named_modules():
            if any(p.is_meta for p in module.parameters()):
                continue  # being loaded: the checkpoint provides the values
            if isinstance(module, HeadwiseMemory):
                module.reset_parameters(seed=_name_seed(seed, name))
            elif isinstance(module, LatentBank) and name == SHARED_BANK:
                module.reset_parameters(seed=_name_seed(seed, name), zero=zero_bank)

    @classmethod
    def _base_dispatch(cls, config) -> type:
        return midus_class_for(config.base_model_type) if cls is MidusForCausalLM else cls

    @classmethod
    def _from_config(cls, config, **kwargs):
        target = cls._base_dispatch(config)
        if target is cls:
            return super()._from_config(config, **kwargs)
        return target._from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        # Compare by model type, not class: trust_remote_code may load this module twice.
        if getattr(config, "model_type", None) != MidusConfig.model_type:
            config_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "revision", "cache_dir", "local_files_only", "token") if k in kwargs}
            config = MidusConfig.from_pretrained(config or pretrained_model_name_or_path, **config_kwargs)
        target = cls._base_dispatch(config)
        if target is not cls:
            return target.from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, config=config, output_loading_info=True, **kwargs)
        missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
        if missing or unexpected:
            # Never run with silently re-initialised weights.
            raise ValueError(
                f"{pretrained_model_name_or_path}: the checkpoint does not match the MIDUS architecture "
                f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]})"
            )
        return (model, info) if want_info else model


def _name_seed(seed: int, name: str) -> int:
    import hashlib

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
