"""Plan copy-only recipes from config.json and the safetensors headers: no transformers, no torch.

The full planner (``compile.plan_loaded``) imports transformers, builds the base config and a
meta-device instance of the architecture just to learn the tensor names and shapes, seconds of
work, when a Hugging Face checkpoint's safetensors headers already hold them. For the recipes and
bases below ``plan_from_headers`` makes the same plan without that; for everything else it returns
None and the reason, and ``apply`` plans the full way, which also reports every user error.

Covered: every block a base layer or a ``transformer`` copy and no ``anatomy:`` block; a HF
directory with config.json and .safetensors files (not GGUF, not pickle); ``output.dtype`` auto
or equal to the stored dtype of every tensor (no conversion); no custom code (``auto_map``,
``trust_remote_code``); a model type in ``ARCHS``, whose layers' behaviour config.json states in
full: none of the settings that assign behaviour by layer index (``plan.INDEX_PATTERNS`` and
``INDEX_LISTS``, a sliding window from ``max_window_layers`` on) and no per-layer list that the
config class would compute. The checkpoint must hold exactly the tensors the architecture has,
with the shapes its config implies; anything else goes the full way.

Base files that are broken, or a config.json that does not describe the weights (layer count,
hidden size, vocabulary), are refused here as in the full planner (BaseModelError), not passed on.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Callable

from midus_surgery.anatomy.config_lists import taken_by_length
from midus_surgery.compiler.base import check_stated_config, config_size_problems, located_at_base_path, read_config_json, resolve_base
from midus_surgery.compiler.layout import COPY, expand_layout
from midus_surgery.compiler.plan import (
    CYCLED_LISTS,
    INDEX_LISTS,
    INDEX_PATTERNS,
    BaseFacts,
    assemble_plan,
    guess_layers_path,
    remap_per_layer,
    sync_every_nth_keys,
    sync_max_window_layers,
)
from midus_surgery.compiler.planned import PlannedRecipe
from midus_surgery.errors import BaseModelError, MidusError
from midus_surgery.io.dtypes import FLOATS, TAGS, auto_dtype
from midus_surgery.io.tensor_source import SafetensorsSource, check_matches_config
from midus_surgery.recipe.schema import LoadedRecipe

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Dims:
    """The sizes a Llama-style checkpoint's shapes follow, all stated in config.json."""

    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def _llama_layer(d: Dims, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool, qk_norm: bool = False) -> Shapes:
    """One decoder layer's tensors in module order (what named_parameters lists): attention, MLP, norms."""
    out: Shapes = {}
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    for proj, rows, cols, bias in (("q_proj", q, d.hidden, qkv_bias), ("k_proj", kv, d.hidden, qkv_bias),
                                   ("v_proj", kv, d.hidden, qkv_bias), ("o_proj", d.hidden, q, o_bias)):
        out[f"self_attn.{proj}.weight"] = (rows, cols)
        if bias:
            out[f"self_attn.{proj}.bias"] = (rows,)
    if qk_norm:  # Qwen3: RMSNorm over each head's query / key, (d_h,)
        out["self_attn.q_norm.weight"] = (d.head_dim,)
        out["self_attn.k_norm.weight"] = (d.head_dim,)
    for proj, rows, cols in (("gate_proj", d.inter, d.hidden), ("up_proj", d.inter, d.hidden), ("down_proj", d.hidden, d.inter)):
        out[f"mlp.{proj}.weight"] = (rows, cols)
        if mlp_bias:
            out[f"mlp.{proj}.bias"] = (rows,)
    out["input_layernorm.weight"] = (d.hidden,)
    out["post_attention_layernorm.weight"] = (d.hidden,)
    return out


@dataclass(frozen=True)
class Arch:
    """What the header planner knows of an architecture (tests check it against transformers' own model).

    layer: (config.json, dims) -> one layer's tensors and shapes in module order; a flag config.json
    omits takes its config class's default (False for every flag used here).
    window_flag: the config key that switches the sliding window on (Qwen2/3 drop ``sliding_window``
    without it), None where ``sliding_window`` alone decides.
    head_dim_default: "hidden/heads" where the config class derives head_dim so, None where it has
    another default (then config.json must state head_dim).
    """

    layer: Callable[[dict, Dims], Shapes]
    window_flag: str | None
    head_dim_default: str | None


ARCHS: dict[str, Arch] = {
    "llama": Arch(lambda c, d: _llama_layer(d, qkv_bias=bool(c.get("attention_bias", False)), o_bias=bool(c.get("attention_bias", False)),
                                            mlp_bias=bool(c.get("mlp_bias", False))), None, "hidden/heads"),
    "mistral": Arch(lambda c, d: _llama_layer(d, qkv_bias=False, o_bias=False, mlp_bias=False), None, "hidden/heads"),
    "qwen2": Arch(lambda c, d: _llama_layer(d, qkv_bias=True, o_bias=False, mlp_bias=False), "use_sliding_window", "hidden/heads"),
    "qwen3": Arch(lambda c, d: _llama_layer(d, qkv_bias=bool(c.get("attention_bias", False)), o_bias=bool(c.get("attention_bias", False)),
                                            mlp_bias=False, qk_norm=True), "use_sliding_window", None),
}
EMBED, NORM, LM_HEAD, LAYERS = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers"
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")  # emit.py writes these when the base has no generation_config.json


class NotCovered(Exception):
    """The recipe or base is outside what the header planner covers (the message says why)."""


def plan_from_headers(loaded: LoadedRecipe) -> tuple[PlannedRecipe | None, str | None]:
    """(the plan, None), or (None, why not) when the full planner must make it."""
    try:
        with located_at_base_path(loaded):
            return _plan(loaded), None
    except NotCovered as exc:
        return None, str(exc)


def _plan(loaded: LoadedRecipe) -> PlannedRecipe:
    recipe = loaded.recipe
    if recipe.anatomy is not None:
        raise NotCovered("the recipe states an anatomy")
    if recipe.base.trust_remote_code:
        raise NotCovered("base.trust_remote_code is set")
    ref = resolve_base(loaded)
    if ref.is_gguf or not ref.exists:
        raise NotCovered(f"no base model at {ref.directory} yet" if not ref.is_gguf else "the base is a GGUF file")
    try:
        # as the full planner reads it: bare json.loads of a config nested 200,000 deep was a RecursionError traceback (trial95 F6)
        config = read_config_json(ref.directory / "config.json")
    except (OSError, ValueError) as exc:
        raise NotCovered(f"config.json: {exc}") from None
    if not isinstance(config, dict):
        raise NotCovered("config.json is not a JSON object")
    if recipe.base.config is not None:
        check_stated_config(loaded, config, ref.directory / "config.json")
    if config_size_problems(config):
        # before expand_layout, which builds a set the size of the layer count: 10^9 layers were an OOM kill or a
        # MemoryError traceback (trial99 C1); the full planner refuses these numbers first, in validate's words
        raise NotCovered("config.json's sizes are out of range (the full planner reports them)")
    L = config.get("num_hidden_layers")
    counted = isinstance(L, int) and not isinstance(L, bool) and L >= 1
    layers, problems = expand_layout(loaded, L) if counted else ([], [])
    if not problems and any(layer.kind not in ("base", COPY) for layer in layers):  # the deepest reason first: it holds for every model type
        raise NotCovered("identity and memory blocks need the block anatomy")
    model_type = config.get("model_type")
    arch = ARCHS.get(model_type) if isinstance(model_type, str) else None  # any other value: the full planner says what is wrong
    if arch is None or "auto_map" in config:
        raise NotCovered(f"model type {config.get('model_type')!r} is not one the header planner covers" if arch is None else "config.json has an auto_map")

    if not counted:
        raise NotCovered("config.json does not state num_hidden_layers")
    if problems:
        raise NotCovered("the layout has problems (the full planner reports them)")
    _check_per_layer_settings(config, arch)

    stored_dtype = config.get("dtype", config.get("torch_dtype"))
    if stored_dtype is not None and stored_dtype not in FLOATS:
        raise NotCovered(f"config.json's dtype {stored_dtype!r}")
    base_dtype = auto_dtype(stored_dtype)
    out_dtype = base_dtype if recipe.output.dtype == "auto" else recipe.output.dtype
    if not (ref.directory / "generation_config.json").is_file() and not all(k in config for k in GENERATION_KEYS):
        raise NotCovered("no generation_config.json, and config.json leaves token ids to its config class")

    dims = _dims(config, arch)
    shapes = _expected_shapes(config, arch, dims, L)
    source = _headers(ref.directory)
    # the facts every plan rests on; other differences are left to the full planner to report
    check_matches_config(source, [(EMBED, shapes[EMBED])], LAYERS, L, config, str(ref.directory / "config.json"))
    _check_checkpoint(source, shapes, TAGS[out_dtype], tied=bool(config.get("tie_word_embeddings", False)))
    layers_path = guess_layers_path(shapes, L)
    if layers_path != LAYERS:
        raise NotCovered("the decoder layers are not where the architecture has them")

    data = {k: v for k, v in config.items() if k != "transformers_version"}
    updates, problems = remap_per_layer(data, L, layers)
    if problems:  # cannot happen after _check_per_layer_settings; the full planner explains it
        raise NotCovered("; ".join(problems))
    new_config = {**data, **updates, "num_hidden_layers": len(layers)}
    sync_max_window_layers(new_config)
    sync_every_nth_keys(new_config)
    window = config.get("sliding_window") if arch.window_flag is None or config.get(arch.window_flag) else None
    facts = BaseFacts(config["model_type"], L, dims.heads, dims.head_dim, dims.hidden, dims.vocab, window, config.get("layer_types"))
    plan = assemble_plan(loaded, facts, layers, new_config, shapes, layers_path, None)
    plan = dataclasses.replace(plan, lists_by_length=tuple(taken_by_length(data, L, {})))
    tied = ((LM_HEAD, EMBED),) if config.get("tie_word_embeddings", False) else ()
    return PlannedRecipe(loaded, None, None, plan, base_dtype=base_dtype, renames=(), planner="headers", tied=tied)


def _check_per_layer_settings(config: dict, arch: Arch) -> None:
    """Refuse configs whose layers' behaviour depends on their index or on a computed default."""
    for key in (*INDEX_PATTERNS, *INDEX_LISTS, *CYCLED_LISTS):
        if key in config:
            raise NotCovered(f"config.json's {key} assigns behaviour by layer index")
    if arch.window_flag and config.get(arch.window_flag) and "layer_types" not in config:
        # the config class would compute layer_types from max_window_layers for the new depth
        raise NotCovered(f"{arch.window_flag} without layer_types: sliding layers are chosen by index")
    types = config.get("layer_types")
    if types is not None and (not isinstance(types, list) or len(types) != config["num_hidden_layers"]):
        raise NotCovered("layer_types does not list every layer")
    if types and any("sliding" in str(t) for t in types) and "sliding_window" not in config:
        raise NotCovered("sliding layers without a sliding_window in config.json")


def _dims(config: dict, arch: Arch) -> Dims:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    values = [config.get(k) for k in keys]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise NotCovered(f"config.json does not state all of {', '.join(keys)}")
    hidden, inter, heads, kv_heads, vocab = values
    head_dim = config.get("head_dim")
    if head_dim is None and arch.head_dim_default == "hidden/heads":
        head_dim = hidden // heads
    if not isinstance(head_dim, int) or head_dim <= 0 or hidden % heads or heads % kv_heads:
        raise NotCovered("the attention sizes in config.json are not consistent")
    return Dims(hidden, inter, heads, kv_heads, head_dim, vocab)


def _expected_shapes(config: dict, arch: Arch, dims: Dims, L: int) -> Shapes:
    """Every tensor of the model in module order, as the full planner's meta-device model lists them."""
    layer = arch.layer(config, dims)
    shapes: Shapes = {EMBED: (dims.vocab, dims.hidden)}
    for i in range(L):
        shapes.update((f"{LAYERS}.{i}.{rest}", shape) for rest, shape in layer.items())
    shapes[NORM] = (dims.hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes[LM_HEAD] = (dims.vocab, dims.hidden)
    return shapes


def _check_checkpoint(source: SafetensorsSource, shapes: Shapes, tag: str, *, tied: bool) -> None:
    """The checkpoint holds exactly these tensors, with these shapes, stored in the output dtype."""
    stored = source.stored()
    if tied:
        stored.pop(LM_HEAD, None)  # a tied head saved anyway is dropped, as the full plan does
    if set(stored) != set(shapes):
        extra, missing = sorted(set(stored) - set(shapes)), sorted(set(shapes) - set(stored))
        if extra and not missing:  # said in apply's summary: the full planner, as transformers' load, leaves them out
            raise NotCovered(f"the checkpoint holds {len(extra)} tensor(s) the architecture lacks, e.g. {extra[0]}: left out of the "
                             "output, as transformers' load leaves them out")
        raise NotCovered(f"the checkpoint's tensors differ from the architecture's ({(extra or missing)[0]})")
    for name, shape in shapes.items():
        dtype, got = stored[name]
        if tuple(got) != shape:
            raise NotCovered(f"{name} has shape {tuple(got)}, the config implies {shape}")
        if dtype != tag:
            raise NotCovered(f"{name} is stored as {dtype}, the output is {tag} (a conversion)")


def _headers(directory) -> SafetensorsSource:
    """The checkpoint's headers, read and checked as the emitter reads them (tensor_source).

    Corrupt or escaping files are the user's to fix (BaseModelError, raised as is); anything else
    the header planner does not cover (no .safetensors files at all) goes the full way.
    """
    try:
        return SafetensorsSource(directory, (), ())
    except BaseModelError:
        raise
    except (MidusError, OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise NotCovered(f"cannot read the safetensors headers: {exc}") from None
