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
- the FFN-branch norms become identities, and so do the attention's post-norms (Gemma-2's
  post_attention_layernorm), which would only normalise the tap's zeros.
A block with no FFN (its one residual branch is its attention: Nemotron-H) computes the same thing with
one swap: a ``HeadsReadout`` stands in for the attention's output projection and returns HML(heads).
With ``query_source: hidden`` (the generic variant) the attention keeps its output projection
and the readout queries the memory with the FFN branch's input instead.

The tap and the FFN identities have no parameters and are registered under ``midus_<name>``
(``self_attn.midus_o_proj``) while the layer still calls them by their own name: LoRA target
lists naming the usual projections (``o_proj``, ``fc1``) then skip them instead of failing on a
module that is not a linear layer.

``MidusForCausalLM(config)`` returns an instance of a subclass of both ``MidusForCausalLM`` and
the base causal LM class (e.g. ``LlamaForCausalLM``), created once per base class, so the model
*is* a LlamaForCausalLM to every tool that checks. The same holds for the task heads
transformers has for the base (``MidusForSequenceClassification``...). Those runtime classes are
attributes of this module by name (built on first lookup), so pickle and ``auto_map`` find them.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto import modeling_auto

from .configuration_midus import MidusConfig, split_runtime_name
from .hml import HeadwiseMemory, HMLConfig, LatentBank
from .midus_names import MODELING_FILES, PLAN_FILE, SHARED_BANK, STAND_IN_PREFIX, TASK_CLASSES, is_memory_parameter


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
                 returns: tuple[int, int] | None = None, residual: int | str | None = None, flat: bool = False):
        super().__init__()
        self.hml = hml
        # A plain attribute, not a submodule: the tap belongs to the attention module.
        object.__setattr__(self, "_tap", tap)
        self.num_heads, self.head_dim = num_heads, head_dim
        self.returns = tuple(returns) if returns else None
        self.residual = residual  # the argument handing in the residual stream, when the FFN added it itself (0: x)
        self.flat = flat  # the FFN returned [tokens, hidden] (Llama-4's MoE), the layer reshapes it back

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self._read(x)
        if self.flat:
            out = out.reshape(-1, out.shape[-1])
        if self.residual == 0:  # CPM-Ant's FFN block returns x + FFN(norm(x))
            out = out + x
        elif self.residual is not None:  # BLOOM's and MPT's MLP return FFN(x) + residual
            out = out + (args[self.residual - 1] if isinstance(self.residual, int) else kwargs[self.residual])
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


class HeadsReadout(nn.Module):
    """Stands in for the attention's output projection in a block with no FFN (its one residual branch is its
    attention: Nemotron-H's attention layers). It returns HML(per-head outputs) where the projection returned the
    attention's output, so the block computes x + HML(heads(norm(x))): what a Memory block with an FFN computes, its
    tap adding zeros and its readout the memory."""

    def __init__(self, hml: HeadwiseMemory, num_heads: int, head_dim: int):
        super().__init__()
        self.hml = hml
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., H*d_h] -> [..., H, d_h] -> HML -> [..., hidden]
        out = self.hml(x.reshape(*x.shape[:-1], self.num_heads, self.head_dim))
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _out_features(module: nn.Module) -> int:
    """Output width of a linear layer (nn.Linear, or GPT-2's Conv1D which calls it ``nf``)."""
    for name in ("out_features", "nf"):
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    raise ValueError(f"cannot tell the output width of {type(module).__name__}")


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def _swap(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, name = _parent(root, path)
    setattr(parent, name, new)


def _stand_in(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where ``path`` was (parameterless, or a ``HeadsReadout`` holding the memory's tables, then named
    ``midus_<name>.hml.*``): the parent still calls it by its name
    (an instance attribute, found before nn.Module's own lookup), but it is registered as
    ``midus_<name>``, so name-matching tools (PEFT target lists) do not take it for the module it
    replaces. ``get_submodule(path)`` still finds it."""
    parent, name = _parent(root, path)
    del parent._modules[name]
    parent.add_module(STAND_IN_PREFIX + name, new)
    object.__setattr__(parent, name, new)


def attention_shape(config) -> tuple[int, int]:
    """(heads, head width) as the config states them (configs without ``midus.memory_blocks``)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, head_dim


def memory_blocks(config) -> dict[int, tuple[dict, int, int]]:
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
    blocks = memory_blocks(config)
    bank = None
    if midus.get("share_bank"):
        bank = LatentBank(hml_config.n_subkeys, hml_config.latent_dim)
        model.add_module(SHARED_BANK, bank)
    for index in midus["memory_layers"]:
        anatomy, heads, head_dim = blocks[index]
        try:
            layer = model.get_submodule(anatomy["layers_path"])[index]
        except AttributeError:
            raise ValueError(f"{type(model).__name__} keeps its decoder layers elsewhere than the causal LM's {anatomy['layers_path']} "
                             f"(its body is {getattr(model, 'base_model_prefix', '?')!r}): a MIDUS model's weights cannot load into it") from None
        _check_block_parts(layer, index, anatomy, midus["memory_layers"])
        hml = HeadwiseMemory(heads, head_dim, config.hidden_size, hml_config, bank=bank)
        if not anatomy["ffn"]:  # no FFN to stand in for: the readout takes the attention's output projection's place
            _stand_in(layer, anatomy["attn_out_proj"], HeadsReadout(hml, heads, head_dim))
            for path in anatomy.get("attn_post_norms", ()):  # as a Memory block with an FFN adds its readout un-normalised
                _stand_in(layer, path, nn.Identity())
            continue
        tap = None
        if hml_config.query_source == "heads":
            tap = AttentionTap(_out_features(layer.get_submodule(anatomy["attn_out_proj"])))
            _stand_in(layer, anatomy["attn_out_proj"], tap)
            for path in anatomy.get("attn_post_norms", ()):  # they would normalise the tap's zeros (absent: older outputs)
                _stand_in(layer, path, nn.Identity())
        _swap(layer, anatomy["ffn"][-1], MemoryReadout(hml, tap, heads, head_dim, anatomy.get("ffn_tuple"),
                                                         anatomy.get("ffn_residual"), bool(anatomy.get("ffn_flat"))))
        for path in list(anatomy["ffn"][:-1]) + list(anatomy["ffn_norms"]):
            _stand_in(layer, path, nn.Identity())


def _check_block_parts(layer: nn.Module, index: int, anatomy: dict, memory_layers: list) -> None:
    """A Memory block's layer holds the modules its anatomy names: a config override that changes the layer kinds
    (from_pretrained(..., attn_layer_indices=...) on a hybrid) can build a state-space layer where a Memory block reads
    attention heads; said in these words, not as an AttributeError from deep in the install (trial144 F2)."""
    paths = [anatomy["attn_out_proj"], *anatomy["ffn"], *anatomy["ffn_norms"], *anatomy.get("attn_post_norms", ())]
    for path in paths:
        try:
            layer.get_submodule(path)
        except AttributeError:
            raise ValueError(f"layer {index} is a Memory block, but this config builds it as a {type(layer).__name__} without "
                             f"{path!r}: the config's layer kinds do not fit the Memory blocks at layers {list(memory_layers)} "
                             "(a config override such as attn_layer_indices or layer_types?)") from None


# ------------------------------------------------------------------------------------------------
# The classes: one public class per task, one runtime subclass per (task, base class)

_RUNTIME: dict[str, type] = {}  # runtime class name -> class


def _task_table(public: str) -> dict[str, str]:
    """transformers' model type -> class name for the task of the public MIDUS class ``public``."""
    return getattr(modeling_auto, TASK_CLASSES[public][1])


def _runtime_class(public: type, base_name: str) -> type:
    """The subclass of (``public``, the transformers class ``base_name``), e.g. MidusLlamaForCausalLM."""
    name = f"Midus{base_name}"
    if name not in _RUNTIME:
        import transformers

        base_cls = getattr(transformers, base_name)
        body = {"__module__": __name__, "__qualname__": name, "_midus_base": base_cls, **_kernel_checks_of(base_cls)}
        _RUNTIME[name] = type(name, (public, base_cls), body)
        # Pipelines (which log a 5 KB "not supported" error otherwise), Trainer's causal-LM label
        # shift and transformers serve know a model by its class name in this table. The key is no
        # model type, so no Auto class lookup ever reads it.
        _task_table(public.__name__).setdefault(f"midus ({name})", name)
    return _RUNTIME[name]


def midus_class_for(base_model_type: str, public: str = "MidusForCausalLM") -> type:
    """The runtime class of the public MIDUS class ``public`` for one base architecture; a
    one-line ValueError naming the heads that exist when transformers has none for this task."""
    base_name = _task_table(public).get(base_model_type)
    if base_name is None:
        have = [task for cls, (task, _) in TASK_CLASSES.items() if _task_table(cls).get(base_model_type)]
        raise ValueError(f"transformers has no {TASK_CLASSES[public][0]} class for {base_model_type!r}: "
                         f"a MIDUS model of it loads as {', '.join(have) or 'nothing'}")
    return _runtime_class(globals()[public], base_name)


def __getattr__(name: str) -> type:
    """Runtime classes by name (PEP 562): ``modeling_midus.MidusLlamaForCausalLM`` is found by
    pickle, by ``auto_map`` entries older saves wrote, and by ``getattr`` on a fresh import."""
    split = split_runtime_name(name)
    if split is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _runtime_class(globals()[split[0]], split[1])


def _kernel_checks_of(base_cls: type) -> dict:
    """The base class's answers to transformers' "which kernels can this class use?" checks.

    transformers answers them by reading the source file of the class's module, which for our
    classes is this file: a MoE base would fall back from ``grouped_mm`` experts to ``eager``
    ones (its logits then differ from the base's by float rounding, ~1e-8).
    """
    names = ("_can_set_attn_implementation", "_can_set_experts_implementation")
    return {name: classmethod(lambda cls, name=name: getattr(base_cls, name)()) for name in names if hasattr(base_cls, name)}


def _body_name(config) -> str:
    """The causal LM's attribute holding the body (``model`` of ``model.layers``)."""
    return next(iter(memory_blocks(config).values()))[0]["layers_path"].split(".")[0]


def _loadable_heads(config) -> list[str]:
    """The public MIDUS classes a model of this config loads as: transformers has the base's class
    for the task, and it names its body as the causal LM does (Llama's QA head says ``transformer``)."""
    import transformers

    out = []
    for public in TASK_CLASSES:
        name = _task_table(public).get(config.base_model_type)
        if name and (public == "MidusForCausalLM" or getattr(transformers, name).base_model_prefix == _body_name(config)):
            out.append(public)
    return out


@contextlib.contextmanager
def _body_class_for(config):
    """transformers' generic task heads build their body with ``AutoModel.from_config(config)``,
    which knows no MIDUS config: while a MIDUS model is built, AutoModel resolves this config's
    class to the base's own body class (LlamaModel). The entry is removed afterwards, so that
    ``AutoModel.from_pretrained`` never builds a body without its Memory blocks."""
    import transformers
    from transformers import AutoModel

    body_name = modeling_auto.MODEL_MAPPING_NAMES.get(config.base_model_type)
    extra = AutoModel._model_mapping._extra_content
    key = type(config)
    if body_name is None or key in extra:
        yield
        return
    extra[key] = getattr(transformers, body_name)
    try:
        yield
    finally:
        extra.pop(key, None)


# from_pretrained's arguments that say where its config.json is (transformers' DownloadKwargs, and trust_remote_code)
_CONFIG_DOWNLOAD_KWARGS = ("trust_remote_code", "revision", "cache_dir", "local_files_only", "token", "force_download", "proxies",
                           "subfolder")


class MidusPreTrainedModel(PreTrainedModel):
    """What every MIDUS class adds to its base class: Memory blocks, their initialisation, a
    strict load, and a save that carries the modeling files and the plan. See the module docstring."""

    config_class = MidusConfig
    _midus_base: type  # the transformers class a runtime class extends (LlamaForCausalLM)
    _midus_plan: str | None = None  # midus_plan.json's text, when loaded from a directory that has one

    def __new__(cls, *args, **kwargs):
        # copy.deepcopy and pickle call cls.__new__(cls) with no arguments, on the runtime class
        if cls.__name__ in TASK_CLASSES:
            config = args[0] if args else kwargs["config"]
            cls = midus_class_for(config.base_model_type, cls.__name__)
        return super().__new__(cls)

    def __init__(self, config: MidusConfig, *args, **kwargs):
        public = self._public_class().__name__
        if public != "MidusForCausalLM" and public not in _loadable_heads(config):
            task, prefix = TASK_CLASSES[public][0], self._midus_base.base_model_prefix
            raise ValueError(f"a MIDUS model of {config.base_model_type!r} cannot load as {task}: {self._midus_base.__name__} names its body "
                             f"{prefix!r} where the causal LM's is {_body_name(config)!r}, so the weights would not load; it loads as "
                             f"{', '.join(TASK_CLASSES[c][0] for c in _loadable_heads(config))}")
        with _body_class_for(config):
            self._midus_base.__init__(self, config, *args, **kwargs)
        install_memory_blocks(self, config)
        self.reset_memory_parameters(seed=0)

    @classmethod
    def _public_class(cls) -> type:
        return next(c for c in cls.__mro__ if c.__name__ in TASK_CLASSES)

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
        return midus_class_for(config.base_model_type, cls.__name__) if cls.__name__ in TASK_CLASSES else cls

    @classmethod
    def _from_config(cls, config, **kwargs):
        target = cls._base_dispatch(config)
        if target is cls:
            return super()._from_config(config, **kwargs)
        return target._from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        if cls.__name__ in TASK_CLASSES:
            # A public class reads the config only to pick the runtime class (MidusLlamaForCausalLM) and hands the caller's
            # config argument on unchanged: where it is no config object, transformers loads it there and applies the config
            # attributes among kwargs (use_cache=False) to it, as for a stock class; given a loaded config here, transformers
            # would pass them to __init__ (TypeError, trial105 F3). Compare by model type, not class: trust_remote_code may
            # load this module twice.
            probe = config
            if getattr(probe, "model_type", None) != MidusConfig.model_type:
                probe_kwargs = {k: kwargs[k] for k in _CONFIG_DOWNLOAD_KWARGS if k in kwargs}
                probe = MidusConfig.from_pretrained(config or pretrained_model_name_or_path, **probe_kwargs)
                if probe.base_model_type is None:
                    # transformers reads a local directory without config.json as an empty config, which names no base class
                    where = Path(str(config or pretrained_model_name_or_path), kwargs.get("subfolder") or "")
                    raise OSError(f"{where}: no MIDUS config.json there (a MIDUS model's config names its base_model_type)")
            return cls._base_dispatch(probe).from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, config=config, output_loading_info=True, **kwargs)
        missing, unexpected = cls._not_loaded(info.get("missing_keys", [])), cls._not_loaded(info.get("unexpected_keys", []))
        if missing or unexpected:
            # Never run with silently re-initialised weights. Stock transformers loads an untying override of a tied
            # checkpoint (tie_word_embeddings=False) with a fresh random LM head and a log line (trial105 F5): a model whose
            # logits are noise. Kept refused, saying why and how to untie with the head starting from the embedding.
            tied = getattr(model, "_tied_weights_keys", None) or {}
            if missing and not unexpected and all(n in tied for n in missing) and not model.config.get_text_config().tie_word_embeddings:
                sources = ", ".join(sorted({tied[n] for n in missing}))
                raise ValueError(
                    f"{pretrained_model_name_or_path}: the checkpoint has no {', '.join(missing)}: it was saved with tied word embeddings "
                    f"({sources} serves as both), and tie_word_embeddings=False unties them, which would start {', '.join(missing)} from "
                    "random weights. Load it tied; to untie with the head starting as a copy of the embedding, after loading: "
                    "model.get_output_embeddings().weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone()); "
                    "model.config.tie_word_embeddings = False"
                )
            raise ValueError(
                f"{pretrained_model_name_or_path}: the checkpoint does not match the MIDUS architecture "
                f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]})"
            )
        # Beside config.json, where transformers read it (subfolder= included: trial105 F4). Local directories only: nothing
        # is downloaded for it, so a Hub repo id finds no file here and loads without the plan, as before.
        plan = Path(pretrained_model_name_or_path or "", kwargs.get("subfolder") or "", PLAN_FILE)
        if pretrained_model_name_or_path is not None and plan.is_file():
            model._midus_plan = plan.read_text()
        return (model, info) if want_info else model

    @classmethod
    def _not_loaded(cls, names) -> list[str]:
        """The names of a load's missing or unexpected weights that make it wrong. A task head
        loaded from a causal LM starts its own head fresh and drops the LM head, as transformers
        does for any base; the memory and the shared body must load whole."""
        names = sorted(names)
        if cls._public_class() is MidusForCausalLM:
            return names
        body = cls.base_model_prefix + "."
        return [n for n in names if n.startswith(body) or is_memory_parameter(n)]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus what a MIDUS directory needs to load again in a fresh process
        without midus-surgery: the modeling files and the plan (config.json names the public
        classes: MidusConfig.to_dict)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return  # another rank writes
        self._write_midus_files(save_directory)

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        # save_pretrained(push_to_hub=True) uploads inside transformers' save_pretrained, before the lines above add the
        # modeling files and the plan: without this the upload had a config.json naming code it lacked (trial105 F2).
        # Written here, after transformers took the folder's timestamps, they count as modified and go up with the rest.
        self._write_midus_files(working_dir)
        return super()._upload_modified_files(working_dir, *args, **kwargs)

    def _write_midus_files(self, save_directory) -> None:
        if getattr(self, "_hf_peft_config_loaded", False):
            return  # an adapter-only save (PEFT's format): no model directory
        here, dest = Path(__file__).resolve().parent, Path(save_directory)
        for name in MODELING_FILES:
            if not (dest / name).exists() or not (dest / name).samefile(here / name):
                shutil.copyfile(here / name, dest / name)
        if self._midus_plan is not None:
            (dest / PLAN_FILE).write_text(self._midus_plan)


class MidusForCausalLM(MidusPreTrainedModel):
    """A base causal LM up-scaled with MIDUS Memory blocks. See the module docstring."""


class MidusForSequenceClassification(MidusPreTrainedModel):
    """The base architecture's sequence-classification head over a MIDUS body."""


class MidusForTokenClassification(MidusPreTrainedModel):
    """The base architecture's token-classification head over a MIDUS body."""


class MidusForQuestionAnswering(MidusPreTrainedModel):
    """The base architecture's extractive question-answering head over a MIDUS body."""


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
