"""The planner: (recipe, base config, block anatomy) -> Plan, without touching weights.

The plan is everything the emitter executes and the CLI prints: the output layer map, the
rewritten config (new depth and every per-layer list), the tensor map (each output tensor from
a source tensor or from an init rule), and parameter / FLOP counts against plain DUS.

Two front ends share ``assemble_plan`` and ``remap_per_layer``: ``make_plan`` (any architecture
transformers knows: tensor shapes from a meta-device instance, the config checked by
transformers) and ``header_plan.plan_from_headers`` (copy-only recipes on a few architectures:
shapes from the safetensors headers, neither transformers nor torch imported).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from midus_surgery.anatomy.config_lists import is_per_layer, list_kinds, never_per_layer, taken_by_length
from midus_surgery.compiler.layout import LayerSpec, expand_layout
from midus_surgery.errors import MidusError, RecipeError, one_line
from midus_surgery.io.dtypes import auto_dtype
from midus_surgery.io.json_text import loads_checked
from midus_surgery.io.small_files import NotBookkeeping, read_small_text
from midus_surgery.model.midus_names import HML_MODULE, PLAN_FILE, SHARED_BANK, STAND_IN_PREFIX
from midus_surgery.recipe.anatomy_spec import Anatomy, StackAnatomy, index_ranges
from midus_surgery.recipe.schema import LoadedRecipe, MemorySettings


# Config integers that assign behaviour to layers by index. Where the new layout would give an output layer another
# behaviour than its source layer's, the plan restates the integers at the new depth or, where they cannot say it,
# refuses (named, explained). ``layers_changed_by_config`` then builds the result and checks every layer's tensors.
@dataclass(frozen=True)
class IndexRule:
    keys: tuple[str, ...]  # the config integers the rule reads (all present for it to apply)
    applies: Callable[[dict, int], bool]  # (config dict, layer index): the behaviour the integers give that layer
    # (config dict, the behaviour wanted per output layer, the output layers, updates so far) -> {key: value}, or None
    restate: Callable[[dict, list[bool], list[LayerSpec], dict], dict | None]
    cannot: str  # why the integers cannot say a pattern they refuse (the refusal's advice)


def _prefix(key: str) -> IndexRule:
    """Dense FFNs in the first ``key`` layers, MoE after (DeepSeek-V3's first_k_dense_replace, LFM2-MoE's and AFMoE's
    num_dense_layers): the new count of dense layers, when those still come first."""
    def restate(data, wanted, layers, updates):
        dense = wanted.count(True)
        return {key: dense} if wanted == [True] * dense + [False] * (len(wanted) - dense) else None
    return IndexRule((key,), lambda cfg, i: i < cfg[key], restate,
                     "the config can only say 'the first k layers are dense': the copies of dense layers must all come before the first MoE layer")


def _sparse_step_restated(data, wanted, layers, updates):
    """Qwen-MoE: every step-th layer MoE, but for those mlp_only_layers names: step 1 and the dense layers named."""
    if not isinstance(data.get("mlp_only_layers"), list):
        return None
    dense = [layer.index for layer, sparse in zip(layers, wanted) if not sparse]
    return {"decoder_sparse_step": 1, "mlp_only_layers": sorted(set(updates.get("mlp_only_layers", [])) | set(dense))}


ERNIE_MOE_KEYS = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")


def _ernie_moe(cfg, i: int) -> bool:
    return (i + 1) % max(1, cfg["moe_layer_interval"]) == 0 and cfg["moe_layer_start_index"] <= i <= cfg["moe_layer_end_index"]


def _ernie_moe_restated(data, wanted, layers, updates):
    """ERNIE-4.5-MoE: MoE on every interval-th layer from start to end (end stored resolved, the base's last layer):
    the three values that give the wanted MoE layers, when some do."""
    moe = [i for i, w in enumerate(wanted) if w]
    if not moe:
        return {"moe_layer_start_index": len(wanted), "moe_layer_end_index": len(wanted) - 1, "moe_layer_interval": 1}
    for interval in range(1, len(wanted) + 1):
        trial = {"moe_layer_start_index": moe[0], "moe_layer_end_index": moe[-1], "moe_layer_interval": interval}
        if all(_ernie_moe(trial, i) == w for i, w in enumerate(wanted)):
            return trial
    return None


INDEX_RULES = (
    _prefix("first_k_dense_replace"),
    _prefix("num_dense_layers"),
    IndexRule(("decoder_sparse_step",), lambda cfg, i: (i + 1) % max(1, cfg["decoder_sparse_step"]) == 0, _sparse_step_restated,
              "the config has no mlp_only_layers list to name the dense layers by"),
    IndexRule(ERNIE_MOE_KEYS, _ernie_moe, _ernie_moe_restated,
              "no start, end and interval make the MoE layers the layout asks for"),
)
INDEX_PATTERNS = tuple(key for rule in INDEX_RULES for key in rule.keys)  # every config integer an IndexRule reads
# Config lists of layer kinds that repeat to the depth (RecurrentGemma's block_types: recurrent, recurrent, attention,
# recurrent, ...): written out in full for the new layout, one entry per output layer from its source's.
CYCLED_LISTS = ("block_types",)
# Config lists holding layer indices (not one entry per layer).
INDEX_LISTS = ("mlp_only_layers", "moe_layers")


@dataclass(frozen=True)
class TensorEntry:
    name: str  # output tensor name
    shape: tuple[int, ...]
    source: str | None  # base tensor it is read from, or None for a new tensor
    rule: str  # "copy", "zeros" (a zeroed copy's shape), or the init rule of a new tensor

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Plan:
    model_type: str
    base_num_layers: int
    layers: list[LayerSpec]
    config: dict  # the rewritten architecture config (transformers accepts it)
    midus: dict  # what the emitted config carries beyond the base architecture
    tensors: list[TensorEntry]
    params: dict[str, int]  # base, added, total, dus_added
    flops_per_token: dict[str, int]  # base, dus, plan: forward FLOPs per token at a context of flops_seq_len tokens
    layer_params: list[int] = field(default_factory=list)  # per output layer
    anatomy: StackAnatomy | None = None  # every kind of base layer (hybrid stacks have several)
    # where the decoder layers are (e.g. 'model.layers'), also for copy-only plans that trace no anatomy:
    # `train --freeze base` and the benchmarks find the inserted layers' parameters by it
    layers_path: str | None = None
    # True: every inserted block was checked to start as the identity (emit/replica.py); False: it
    # was found not to and the recipe accepted it; None: not checked (copies change the function anyway)
    function_preserving: bool | None = None
    # of a recipe whose function changes anyway (a plain copy beside them): which blocks meant as the identity were found
    # not to start as it, accepted by accept_function_change (one line; None: all do, or none was meant to)
    accepted_change: str | None = None
    # base layer -> the kind an earlier `apply` inserted it as, when the base is itself an apply output
    # (``earlier_insertions``): `train --freeze base` trains those layers with this recipe's blocks
    inserted_before: dict[int, str] = field(default_factory=dict)
    # base config lists remapped as one entry a layer on their length alone (config_lists.taken_by_length): plan notes them
    lists_by_length: tuple[str, ...] = ()
    # the context (tokens) flops_per_token is counted at: the recipe's flops_seq_len (attention's share grows with it)
    flops_seq_len: int = 2048

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    @property
    def name_prefixes(self) -> tuple[str, ...]:
        """The first parts of the output's tensor names ('model', 'lm_head'): a base checkpoint saved without its
        body's prefix is read under them."""
        return tuple({t.name.split(".", 1)[0] for t in self.tensors if "." in t.name})

    @property
    def dropped_layers(self) -> list[int]:
        """The base layers the output leaves out (a layout with allow_dropped_layers)."""
        return sorted(set(range(self.base_num_layers)) - {layer.source for layer in self.layers})

    @property
    def shared_bank_params(self) -> int:
        """The latent bank the memory layers share (memory.share_bank), counted once in ``params`` and in no layer's
        ``layer_params``; 0 without one."""
        return sum(t.numel for t in self.tensors if t.name.startswith(f"{SHARED_BANK}."))

    @property
    def memory_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.kind == "memory"]

    def to_json(self, *, tensors: bool = True) -> dict:
        """The plan as JSON: ``plan --json`` prints it, midus_plan.json is it without ``tensors``.

        Each fact once. ``layers`` is the layer map (index, source, kind, params), ``block_kinds``
        the anatomy of every kind of base layer and which kind each is (null for copy-only plans); a
        layer whose source an earlier `apply` inserted (the base is an apply output) says so in
        ``inserted_before`` (that kind),
        ``anatomy`` the block anatomy when all layers are of one kind (else null; what plans held
        before hybrid stacks were planned per kind), ``layers_path`` where the decoder layers are (set
        for every plan), ``flops_per_token`` the forward pass's FLOPs per token at a context of
        ``flops_seq_len`` tokens (null in plans written before it was recorded), ``midus`` only the memory settings no other key holds (``hml``,
        ``share_bank``; null without memory blocks). The emitted config.json's own ``midus`` dict
        (``self.midus``: layer map, memory layers, anatomy... as modeling_midus reads them) is a
        different file; ``read_plan_json`` also reads plans written when this repeated it.
        """
        data = {
            "model_type": self.model_type,
            "base_num_hidden_layers": self.base_num_layers,
            "num_hidden_layers": self.num_hidden_layers,
            "layers": [{**asdict(layer), "params": n,
                        **({"inserted_before": self.inserted_before[layer.source]} if layer.source in self.inserted_before else {})}
                       for layer, n in zip(self.layers, self.layer_params)],
            "params": self.params,
            "flops_per_token": self.flops_per_token,
            "flops_seq_len": self.flops_seq_len,
            "anatomy": self.anatomy.single.model_dump(mode="json") if self.anatomy and self.anatomy.single else None,
            "block_kinds": self.anatomy.model_dump(mode="json") if self.anatomy else None,
            "layers_path": self.layers_path,
            "function_preserving": self.function_preserving,
            **({"accepted_change": self.accepted_change} if self.accepted_change else {}),
            "midus": {k: self.midus[k] for k in PLAN_MIDUS_KEYS} if self.memory_layers else None,
            "config": self.config,
        }
        if tensors:
            data["tensors"] = [{"name": t.name, "shape": list(t.shape), "source": t.source, "rule": t.rule} for t in self.tensors]
        return data


# ----------------------------------------------------------------------------------------------
# midus_plan.json: written by the emitter (``Plan.to_json`` without tensors, plus where the base
# was and whether its code was trusted), read by `train` (freeze: base), `verify` and the tools.

PLAN_MIDUS_KEYS = ("hml", "share_bank")  # what the plan's `midus` section holds: the rest is elsewhere in the plan


def read_plan_json(data: dict) -> dict:
    """A midus_plan.json's contents in today's layout (``Plan.to_json``), whichever layout it was
    written in; the one reader of plan files, so that every output ever written still loads.

    Older layouts: ``midus`` repeated the layer map (``layer_map``), the anatomy, the memory layer
    indices and the base model type; plans before ``layers_path`` existed had it only inside the
    anatomy (copy-only plans, with no anatomy, had it nowhere: the caller then reads it off the
    model's parameter names, ``train.params.inserted_layers``); plain copies were kind
    ``transformer``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    plan = dict(data)
    old_midus = plan.get("midus") or {}
    plan["anatomy"] = plan.get("anatomy") or old_midus.get("anatomy")
    layers = plan.get("layers") or old_midus.get("layer_map") or []
    plan["layers"] = [{**layer, "kind": "copy"} if layer.get("kind") == "transformer" else dict(layer) for layer in layers]
    plan["layers_path"] = plan.get("layers_path") or (plan["anatomy"] or {}).get("layers_path")
    has_memory = any(layer.get("kind") == "memory" for layer in plan["layers"])
    plan["midus"] = {k: old_midus[k] for k in PLAN_MIDUS_KEYS if k in old_midus} if has_memory and old_midus else None
    plan.setdefault("flops_seq_len", None)  # plans written before it was recorded: the context is not known
    return plan


def read_plan_file(model_dir: Path) -> dict | None:
    """``model_dir``'s midus_plan.json through ``read_plan_json``; None when it has none (not made
    by `apply`); MidusError, one line, when it is not a readable plan."""
    path = Path(model_dir) / PLAN_FILE
    if not (path.exists() or path.is_symlink()):  # a pipe or a folder in its place is not "no plan" (trial66): it is said
        return None
    try:
        # a plan nested 200,000 deep was a RecursionError traceback in verify and train (trial95 F6); json.dumps wrote it
        return read_plan_json(loads_checked(read_small_text(path), special_floats=True))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as exc:
        raise MidusError(f"{path}: not a readable plan ({exc if isinstance(exc, NotBookkeeping) else one_line(exc, 200)})") from None


def earlier_insertions(base_dir: Path, num_layers: int) -> dict[int, str]:
    """Base layer -> the kind it was inserted as, when ``base_dir`` is itself an `apply` output (its
    midus_plan.json, describing ``num_layers`` layers; a chain of applies keeps the first kind). Empty
    for any other base, and for a plan that does not describe it (unreadable, or another depth)."""
    try:
        plan = read_plan_file(base_dir)
    except MidusError:
        return {}
    if plan is None or len(plan["layers"]) != num_layers:
        return {}
    return {int(layer["index"]): layer.get("inserted_before") or layer["kind"] for layer in plan["layers"] if is_inserted(layer)}


def plan_mismatch(plan: dict, config: dict) -> str | None:
    """Why a read midus_plan.json does not describe the model whose config.json holds ``config``: another
    depth, or (a MIDUS output's config.json holds its layer map too) another layer map; None when it does.
    A plan copied from another output or edited made `train --freeze base` train base layers (trial55)."""
    layers = plan["layers"]
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    depth = config.get("num_hidden_layers", text.get("num_hidden_layers"))
    if isinstance(depth, int) and depth != len(layers):
        return f"lists {len(layers)} layers, and config.json's num_hidden_layers is {depth}"
    own = (config.get("midus") or {}).get("layer_map") if isinstance(config.get("midus"), dict) else None
    if isinstance(own, list):
        read = read_plan_json({"layers": own})["layers"]  # older configs called plain copies "transformer"
        for theirs, mine in zip(layers, read):
            a = (theirs.get("index"), theirs.get("source"), theirs.get("kind"))
            b = (mine.get("index"), mine.get("source"), mine.get("kind"))
            if a != b:
                return (f"says output layer {a[0]} is {a[2]} from base layer {a[1]}, and config.json's layer map says "
                        f"{b[2]} from base layer {b[1]}")
        if len(read) != len(layers):
            return f"lists {len(layers)} layers, and config.json's layer map {len(read)}"
    return None


def is_inserted(layer: dict) -> bool:
    """Whether a plan's layer entry is a block some `apply` inserted: this one's, or an earlier one's in a chain."""
    return layer.get("kind") != "base" or bool(layer.get("inserted_before"))


def inserted_attention_out_projs(plan: dict, config) -> dict[int, str]:
    """Output layer index -> its attention output projection (a path inside the block), for each
    inserted block of a read plan whose layer kind has an anatomy. ``config``: the output's own."""
    inserted = [entry for entry in plan["layers"] if entry["kind"] != "base"]
    if plan.get("anatomy"):  # one kind of layer
        return {entry["index"]: plan["anatomy"]["attn_out_proj"] for entry in inserted if plan["anatomy"]["attn_out_proj"]}
    if plan.get("block_kinds"):  # a hybrid stack: each base layer's kind
        stack, at = StackAnatomy.model_validate(plan["block_kinds"]), "source"
    else:  # a copy-only plan, read from the safetensors headers, records none: the output's layers are traced
        from midus_surgery.anatomy.trace import find_stack_anatomy

        stack, at = find_stack_anatomy(config), "index"
    kinds = {entry["index"]: stack.kind_of(entry[at]).anatomy for entry in inserted}
    return {index: anatomy.attn_out_proj for index, anatomy in kinds.items() if anatomy is not None and anatomy.attn_out_proj}


# ----------------------------------------------------------------------------------------------
# Base model facts from its config alone (a meta-device instance: shapes, no memory, no weights)


@functools.lru_cache(maxsize=8)
def _base_model_facts(config_json: str) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], tuple[tuple[str, str], ...],
                                                 tuple[tuple[str, str], ...] | None, frozenset[str], frozenset[str],
                                                 tuple[tuple[str, tuple[str, ...]], ...]]:
    """(every tensor -> shape, tied ones once; the tied pairs target -> source; transformers' renames on load,
    ``load_renames``; the tensors that are not floating point; the persistent buffers; each module list -> the class
    names of its modules) of the causal LM a config builds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from midus_surgery.compiler.custom_code import custom_causal_lm

    data = json.loads(config_json)
    custom = custom_causal_lm(data)  # a base whose own code the recipe allows: its model, not the stock one
    config = custom if custom is not None else AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=custom is not None)
    # named_parameters drops tied duplicates (lm_head tied to the embedding is written once), keeping
    # the first name in module order; transformers saves the tie's source name (RoBERTa's embedding,
    # not its lm_head.decoder), so that is the name planned
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None)
    tied = tied if isinstance(tied, dict) and getattr(config, "tie_word_embeddings", False) else {}
    shapes = [(tied.get(name, name), tuple(p.shape)) for name, p in model.named_parameters()]
    persistent = set(model.state_dict().keys())
    shapes += [(name, tuple(b.shape)) for name, b in model.named_buffers() if name in persistent]
    integers = frozenset(name for name, t in model.state_dict().items() if not t.is_floating_point())
    buffers = frozenset(name for name, _ in model.named_buffers() if name in persistent)
    lists = tuple((name, (len(module), *sorted({type(m).__name__ for m in module}))) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.ModuleList))
    return tuple(shapes), tuple((str(k), str(v)) for k, v in tied.items()), load_renames(model), integers, buffers, lists


def load_renames(model) -> tuple[tuple[str, str], ...] | None:
    """transformers' (checkpoint pattern -> module name) renames when it loads ``model``'s checkpoints, or
    None when its load does more than rename by plain patterns (stacks experts, fuses projections, renames
    only under a submodule): then which module tensor a file lacks is for its load to say, not the headers."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - another transformers version: the headers decide nothing
        return None
    renames = []
    for t in transforms:
        if type(t) is not WeightRenaming or len(t._original_target_patterns) != 1 or getattr(t, "scope_prefix", None):
            return None
        renames += [(source, t._original_target_patterns[0]) for source in t._original_source_patterns]
    return tuple(renames)


def _config_key(config) -> str:
    data = config.to_dict()
    data.pop("transformers_version", None)
    return json.dumps(data, sort_keys=True, default=str)


def base_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the base causal LM (tied ones once) -> shape, from the config alone."""
    return dict(_base_model_facts(_config_key(config))[0])


def base_tied_pairs(config) -> dict[str, str]:
    """The base's tied tensors, target -> source (``lm_head.weight`` -> ``model.embed_tokens.weight``),
    when its config ties them; the target is not planned (transformers saves the source only)."""
    return dict(_base_model_facts(_config_key(config))[1])


def base_integer_tensors(config) -> frozenset[str]:
    """The base's tensors that are not floating point (persistent integer buffers, such as DeepSeek-V4's
    ``tid2eid``): stored as integers by right, unlike a weight."""
    return _base_model_facts(_config_key(config))[3]


def base_buffers(config) -> frozenset[str]:
    """The base's persistent buffers (Gemma-4's ``layer_scalar``, GLM-4-MoE's ``e_score_correction_bias``): stored
    beside the weights, but no parameters, so not counted as any (plan counted them; trial68)."""
    return _base_model_facts(_config_key(config))[4]


def base_module_lists(config) -> dict[str, tuple[int, tuple[str, ...]]]:
    """Each module list of the base causal LM (``model.layers``) -> (its length, the class names of its modules)."""
    return {name: (facts[0], tuple(facts[1:])) for name, facts in _base_model_facts(_config_key(config))[5]}


def base_load_renames(config) -> list[tuple[str, str]] | None:
    """What transformers renames when it loads the base's checkpoint (``load_renames``); None: it converts more."""
    renames = _base_model_facts(_config_key(config))[2]
    return None if renames is None else list(renames)


def config_value(config, name: str):
    """``config.<name>`` as its dict holds it: also where transformers refuses a global read of a
    per-layer attribute (Gemma-4's head_dim); None when absent."""
    data = config.to_dict()
    return data.get(getattr(config, "attribute_map", {}).get(name, name))


def attention_dims(config) -> tuple[int, int]:
    """(query heads H, head dim d_h) of the base's attention, as its config states them globally."""
    heads = config_value(config, "num_attention_heads")
    heads = heads if isinstance(heads, int) and heads > 0 else 0  # no attention (state-space models)
    head_dim = config_value(config, "head_dim")
    if not isinstance(head_dim, int):
        hidden = config_value(config, "hidden_size")
        head_dim = hidden // heads if heads and isinstance(hidden, int) else 0
    return heads, head_dim


def layer_config_value(config, name: str, layer: int):
    """``name`` for one layer: transformers' per-layer overrides (``per_layer_config``) or a
    per-layer list first, the global value otherwise."""
    try:
        return getattr(config.per_layer_config[layer], name)
    except Exception:  # noqa: BLE001 - no per-layer configs (most architectures)
        pass
    value = config_value(config, name)
    return value[layer] if isinstance(value, list) and len(value) == config.num_hidden_layers else value


def memory_geometry(config, shapes: dict[str, tuple[int, ...]], layers_path: str, anatomy: Anatomy, source: int) -> tuple[int, int]:
    """(heads H, head width d_h) of the per-head outputs a memory block copied from base layer
    ``source`` reads: the traced head count's config key, and the width its output projection takes."""
    heads = layer_config_value(config, anatomy.heads_key or "num_attention_heads", source)
    weight = shapes.get(f"{layers_path}.{source}.{anatomy.attn_out_proj}.weight")
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"the head count {anatomy.heads_key or 'num_attention_heads'} of base layer {source} is {heads!r}")
    if weight is None or len(weight) != 2:
        return heads, attention_dims(config)[1]
    width = weight[anatomy.out_proj_in_axis]
    if width % heads:
        raise ValueError(f"the output projection {anatomy.attn_out_proj} of base layer {source} takes {width} values, not a multiple of {heads} heads")
    return heads, width // heads


# ----------------------------------------------------------------------------------------------
# Config rewriting


def remap_per_layer(data: dict, num_layers: int, layers: list[LayerSpec], kinds: dict[str, str] | None = None) -> tuple[dict, list[str]]:
    """The per-layer entries of a config dict for the new layout, each taken from its source layer.

    Returns {key: new value} for every list with one entry per base layer and every list of layer
    indices, and problems (messages) for per-layer behaviour the config cannot restate (INDEX_RULES).
    ``kinds`` (``list_kinds``, when the config class is at hand) overrides the length and name rules.
    """
    L = num_layers
    kinds = kinds or {}
    updates: dict = {}
    problems: list[str] = []
    index_lists = [k for k in index_list_keys(data, L) if kinds.get(k) != "per-layer"]
    for key, value in data.items():
        if key not in index_lists and is_per_layer(key, value, L, kinds):
            updates[key] = [value[layer.source] for layer in layers]
    overrides = data.get("per_layer_config")
    if isinstance(overrides, dict) and overrides:  # transformers' per-layer overrides (Gemma-4), keyed by index
        by_layer = {int(k): v for k, v in overrides.items()}
        updates["per_layer_config"] = {str(layer.index): by_layer[layer.source] for layer in layers if layer.source in by_layer}
    for key in index_lists:
        if isinstance(data.get(key), list):
            chosen = set(data[key])
            updates[key] = [layer.index for layer in layers if layer.source in chosen]
    for key in CYCLED_LISTS:
        value = data.get(key)
        if key not in updates and isinstance(value, list) and 0 < len(value) < L:
            cycle = [value[i % len(value)] for i in range(L)]
            updates[key] = [cycle[layer.source] for layer in layers]
    for rule in INDEX_RULES:
        if not all(isinstance(data.get(key), int) and not isinstance(data.get(key), bool) for key in rule.keys):
            continue
        wanted = [rule.applies(data, layer.source) for layer in layers]  # each output layer behaves as its source did
        if all(rule.applies(data, layer.index) == w for layer, w in zip(layers, wanted)):
            continue
        restated = rule.restate(data, wanted, layers, updates)
        if restated is not None:
            updates.update(restated)
            continue
        moved = next(layer for layer, w in zip(layers, wanted) if rule.applies(data, layer.index) != w)
        said = ", ".join(f"{key}={data[key]}" for key in rule.keys)
        problems.append(f"the base config's {said} assign{'s' if len(rule.keys) == 1 else ''} behaviour to layers by index, and the new layout "
                        f"gives output layer {moved.index} (from base layer {moved.source}) a different one, and {rule.cannot}; "
                        "use a layout that keeps the pattern")
    return updates, problems


_INDEX_NAME = re.compile(r"(_ids|_idxs|_idx|_indices|_layers)$")


def index_list_keys(data: dict, num_layers: int) -> list[str]:
    """Config lists that hold layer indices rather than one value per layer: INDEX_LISTS, and lists
    named so (``hybrid_layer_ids``, ``full_attn_idxs``...) of distinct ints that are all layer indices."""
    keys = [k for k in INDEX_LISTS if isinstance(data.get(k), list)]
    for key, value in data.items():
        if key in keys or not isinstance(value, list) or not _INDEX_NAME.search(key) or never_per_layer(key):
            continue  # stop_token_ids [1, 2] on a four-layer base are token ids, not layers 1 and 2
        if all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_layers for v in value) and len(set(value)) == len(value):
            keys.append(key)
    return keys


def rewrite_config(config, layers: list[LayerSpec]) -> tuple[dict, list[str], list[str]]:
    """The base config with the new depth, every per-layer entry taken from its source layer.

    Returns the config dict, problems (messages) for per-layer behaviour the dict can't express, and the
    lists remapped on their length alone (``taken_by_length``).
    """
    new = copy.deepcopy(config)
    data, kinds = config.to_dict(), list_kinds(config)
    updates, problems = remap_per_layer(data, config.num_hidden_layers, layers, kinds)
    by_length = taken_by_length(data, config.num_hidden_layers, kinds)
    try:
        new.num_hidden_layers = len(layers)  # first: per-layer overrides are checked against it
    except Exception as exc:  # noqa: BLE001 - a config whose depth is derived from others (ProphetNet)
        return config.to_dict(), [f"the base config does not let its depth be set: {one_line(exc, 160)}"], []
    for key, value in updates.items():
        setattr(new, key, value)  # through the config object: attribute_map aliases (gpt2's n_layer) apply
    out = new.to_dict()
    out.pop("transformers_version", None)
    sync_max_window_layers(out)
    sync_attention_types(out)
    sync_every_nth_keys(out)
    return out, problems, by_length


def window_layers_boundary(config: dict) -> int | None:
    """The ``max_window_layers`` that says ``layer_types`` the old way (layers from it on slide, the
    ones before do not); None when no layer slides, the types are not that shape (a copy of a full
    layer among sliding ones), or the config has no such key or no types."""
    types = config.get("layer_types")
    if "max_window_layers" not in config or not isinstance(types, list):
        return None
    sliding = ["sliding" in str(t) for t in types]
    if not any(sliding):
        return None  # nothing slides: the key says nothing that matters (its flag is off), left as the base had it
    m = sliding.index(True)
    return m if all(sliding[m:]) else None


def sync_max_window_layers(config: dict) -> None:
    """Qwen2-style configs state sliding layers twice: ``layer_types`` (what transformers 5 reads)
    and ``max_window_layers`` (what readers of the older key build from). Keep the second true at
    the new depth where it can say the same; where it cannot, plan notes it (cli's notes)."""
    boundary = window_layers_boundary(config)
    if boundary is not None:
        config["max_window_layers"] = boundary


# Integers that restate a per-layer list as "every N-th layer is special" (layer i special when (i + 1) % N == 0):
# Gemma-3's and Cohere-2's sliding_window_pattern (the full-attention layers of layer_types), Llama-4's
# no_rope_layer_interval (the 0 entries of no_rope_layers) and interleave_moe_layer_step (moe_layers). transformers 5
# reads the lists, which the layer map rewrites; a reader of the integer builds the pattern from it.
_EVERY_NTH = {
    "sliding_window_pattern": ("layer_types", lambda value, i: value[i] == "full_attention"),
    "_sliding_window_pattern": ("layer_types", lambda value, i: value[i] == "full_attention"),
    "no_rope_layer_interval": ("no_rope_layers", lambda value, i: value[i] == 0),
    "interleave_moe_layer_step": ("moe_layers", lambda value, i: i in value),
}


EVERY_NTH_LISTS = {key: list_key for key, (list_key, _) in _EVERY_NTH.items()}


def _every_nth(config: dict, key: str) -> tuple[int, int | None] | None:
    """(the key's value, the N that says its list at this depth, None when no N does); None when the config does not
    state both the key and its list."""
    list_key, special = _EVERY_NTH[key]
    value, listed, n = config.get(key), config.get(list_key), config.get("num_hidden_layers")
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0 and isinstance(listed, list) and isinstance(n, int)):
        return None
    if list_key != "moe_layers" and len(listed) != n:
        return None
    marked = [special(listed, i) for i in range(n)]
    step = marked.index(True) + 1 if any(marked) else n + 1  # n + 1: no layer is special
    said = all(m == ((i + 1) % step == 0) for i, m in enumerate(marked))
    return value, (step if said else None)


def sync_every_nth_keys(config: dict) -> None:
    """Keep each _EVERY_NTH integer true to its list at the new depth where an N can say it (a value past the depth
    that already says 'none' is left as it is); where none can, plan notes it (every_nth_keys_unsaid)."""
    for key in _EVERY_NTH:
        found = _every_nth(config, key)
        if found is None or found[1] is None:
            continue
        value, step = found
        if not (step > config["num_hidden_layers"] and value > config["num_hidden_layers"]):
            config[key] = step


def every_nth_keys_unsaid(config: dict) -> list[str]:
    """The _EVERY_NTH integers of ``config`` that no N can make say their list (kept as the base had them)."""
    return [key for key in _EVERY_NTH if (found := _every_nth(config, key)) is not None and found[1] is None
            and found[0] != found[1]]


def sync_attention_types(config: dict) -> None:
    """GPT-Neo states its layers' attention twice: ``attention_layers`` (one kind a layer, what its class
    reads) and ``attention_types`` ([[kinds, repeats], ...], which a reader that builds the list from it
    expands). Keep the second true at the new depth: the new layers' kinds as runs."""
    kinds = config.get("attention_layers")
    if not isinstance(config.get("attention_types"), list) or not isinstance(kinds, list) or not kinds:
        return
    runs: list = []
    for kind in kinds:
        if runs and runs[-1][0] == [kind]:
            runs[-1][1] += 1
        else:
            runs.append([[kind], 1])
    config["attention_types"] = runs


def check_config_accepted(config_dict: dict) -> str | None:
    """None when transformers builds a config from ``config_dict``, else the reason it refuses."""
    from transformers import AutoConfig

    data = dict(config_dict)
    try:
        AutoConfig.for_model(data.pop("model_type"), **data)
    except Exception as exc:  # noqa: BLE001 - any refusal by transformers is a plan problem to report
        return f"transformers rejects the rewritten config: {exc}"
    return None


def layer_kinds_changed(config, new_config: dict, layers: list[LayerSpec]) -> str | None:
    """Why an output layer would not run as the base layer it copies because the config class rewrites its kind, or None.

    Some config classes fix a layer's kind whatever the config says (Gemma-4's last layer is always full attention): a
    copy of a sliding-attention layer there was written, and verified, as a full-attention layer (trial68)."""
    from transformers import AutoConfig

    data = dict(new_config)
    try:
        built = AutoConfig.for_model(data.pop("model_type"), **data)
    except Exception:  # noqa: BLE001 - check_config_accepted says why
        return None
    base_kinds, out_kinds = getattr(config, "layer_types", None), getattr(built, "layer_types", None)
    if not (isinstance(base_kinds, list) and isinstance(out_kinds, list) and len(out_kinds) == len(layers)):
        return None
    for layer in layers:
        if layer.source < len(base_kinds) and out_kinds[layer.index] != base_kinds[layer.source]:
            return (f"output layer {layer.index} copies base layer {layer.source}, a {base_kinds[layer.source]} layer, but transformers' "
                    f"{built.model_type} config makes it {out_kinds[layer.index]} whatever layer_types says (the class fixes some "
                    f"layers' kind, e.g. the last one's); choose a layout whose layer {layer.index} comes from a {out_kinds[layer.index]} layer")
    return None


# ----------------------------------------------------------------------------------------------
# Memory checks and the HML module's own facts


def memory_problems(loaded: LoadedRecipe, hidden_size: int, geometry: tuple[int, int], where: str) -> list:
    """Problems with the memory settings against the attention shape (heads, head_dim) a memory block reads."""
    mem = loaded.recipe.memory
    heads, head_dim = geometry
    problems = []
    if mem.query_source == "heads" and head_dim % 2:
        problems.append(loaded.problem(("memory",), f"{where}: the attention's head width {head_dim} is odd; product keys split each head's query in two halves"))
    if mem.query_source == "heads" and heads * head_dim != hidden_size and mem.output_proj == "never":
        problems.append(loaded.problem(("memory", "output_proj"), f"{where}: heads*head_dim = {heads * head_dim} differs from hidden size {hidden_size}: the memory needs an output projection (output_proj: auto or always)"))
    return problems


def build_hml(hidden_size: int, geometry: tuple[int, int], mem: MemorySettings, device="meta"):
    """An HML module of the right size for one memory block (on the meta device: shapes only)."""
    import torch

    from midus_surgery.model.hml import HeadwiseMemory, HMLConfig

    heads, head_dim = geometry
    with torch.device(device):
        return HeadwiseMemory(heads, head_dim, hidden_size, HMLConfig.from_dict(mem.hml_dict()))


# ----------------------------------------------------------------------------------------------
# The planner


def _is_under(name: str, module: str | None) -> bool:
    """Whether tensor or module ``name`` is ``module`` or inside it (None, a block's absent attention: never)."""
    return module is not None and (name == module or name.startswith(module + "."))


def _matmul_params(shapes: dict[str, tuple[int, ...]], experts_per_token: int | None = None) -> int:
    """Weights one token multiplies by: every >= 2-D tensor, but of stacked [experts, ...] tensors
    (transformers' MoE layout) only the ``experts_per_token`` experts the router picks."""
    total = 0
    for s in shapes.values():
        if len(s) >= 3 and experts_per_token and s[0]:  # a stack of 0 experts holds no weights (and divided by zero)
            total += math.prod(s) * min(experts_per_token, s[0]) // s[0]
        elif len(s) >= 2:
            total += math.prod(s)
    return total


@dataclass(frozen=True)
class BaseFacts:
    """What the plan's counts need to know of the base beyond its tensors."""

    model_type: str
    num_layers: int
    heads: int  # query heads H
    head_dim: int  # d_h
    hidden_size: int
    vocab_size: int
    sliding_window: int | None
    layer_types: list | None  # the base's per-layer attention kinds, when its config has them
    # a mixture of experts' routed experts per token (num_experts_per_tok): one for all layers, or one per base layer
    # (HunYuan-MoE's moe_topk list)
    experts_per_token: int | list | None = None

    def experts_of(self, layer: int) -> int | None:
        """The routed experts per token of base layer ``layer``."""
        value = self.experts_per_token
        if isinstance(value, list):
            value = value[layer] if layer < len(value) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @classmethod
    def of(cls, config) -> "BaseFacts":
        heads, head_dim = attention_dims(config)
        value = functools.partial(config_value, config)
        return cls(config.model_type, config.num_hidden_layers, heads, head_dim, value("hidden_size"), value("vocab_size"),
                   value("sliding_window"), value("layer_types"), value("num_experts_per_tok"))


def make_plan(loaded: LoadedRecipe, config, anatomy: StackAnatomy | None, *, anatomy_problem: str | None = None) -> Plan:
    """Plan the recipe against the base config; RecipeError lists every problem found.

    anatomy: every kind of base layer (``find_stack_anatomy``, or the recipe's ``anatomy:`` for
    all layers); each identity or memory block is made from the anatomy of its own source layer.
    """
    recipe = loaded.recipe
    L = config.num_hidden_layers
    layers, problems = expand_layout(loaded, L)
    kinds = {layer.kind for layer in layers}
    if "memory" in kinds:
        if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
            # the MIDUS model class wraps the stock class of base_model_type, not the base's own code
            problems.append(loaded.problem(("layout",), "memory blocks over a base with its own modeling code (auto_map) are not supported: "
                                                        "the MIDUS model would build the stock architecture; use transformer or identity blocks"))
    if kinds & {"identity", "memory"} and anatomy is None:
        why = f": {anatomy_problem}" if anatomy_problem else "; state it with an `anatomy:` block"
        problems.append(loaded.problem(("layout",), f"identity and memory blocks need the block anatomy, which could not be found{why}"))
    if anatomy is not None and not problems:
        problems += block_kind_problems(loaded, anatomy, layers)
    if problems:
        raise RecipeError(problems)

    new_config, config_problems, by_length = rewrite_config(config, layers)
    refusal = check_config_accepted(new_config)
    if config_problems or refusal:
        raise RecipeError([loaded.problem(("layout",), msg) for msg in config_problems + ([refusal] if refusal else [])])

    # transformers builds the models (on the meta device) from config values it may not check:
    # whatever it raises is a located problem, never a traceback
    try:
        shapes = base_tensor_shapes(config)
    except Exception as exc:  # noqa: BLE001
        raise RecipeError([loaded.problem(("base",), f"transformers cannot build the base model from its config: {one_line(exc)}")]) from None
    layers_path = anatomy.layers_path if anatomy else guess_layers_path(shapes, L)
    if recipe.anatomy is not None:
        stated_anatomy_problem(loaded, config, L)
    if layers_path is None:
        raise RecipeError([loaded.problem(("base",), "cannot tell where the decoder layers are in this model; state it with an `anatomy:` block")])
    parallel = [p for p in layer_lists(shapes, L) if p != layers_path]
    if parallel:
        raise RecipeError([loaded.problem(("base",), f"the model keeps its layers' parts in parallel lists ({', '.join([layers_path, *parallel][:4])}), "
                                                     f"not one module per layer: surgery copies decoder-layer modules, so this architecture cannot be made deeper")])
    try:
        # a layer built unlike its source says why by its tensors first (an index rule that the layout moves: Jamba)
        moved = layers_changed_by_config(shapes, new_config, layers, layers_path) or layer_kinds_changed(config, new_config, layers)
    except Exception as exc:  # noqa: BLE001
        moved = (layer_kinds_changed(config, new_config, layers)
                 or f"transformers cannot build the up-scaled model from the rewritten config: {one_line(exc)}")
    if moved:
        raise RecipeError([loaded.problem(("layout",), moved)])
    hidden = config_value(config, "hidden_size")
    geometry: dict[int, tuple[int, int]] = {}  # output memory layer -> (heads, head width) it reads
    problems = []
    for layer in layers:
        if layer.kind == "memory" and not anatomy.kind_of(layer.source).anatomy.ffn and recipe.memory.query_source == "hidden":
            problems.append(loaded.problem(("memory", "query_source"), f"output layer {layer.index} (memory from base layer {layer.source}, a "
                                           f"{anatomy.kind_of(layer.source).label}): the layer has no FFN (its one residual branch is its "
                                           "attention), whose input query_source: hidden would query the memory with; use query_source: heads"))
        elif layer.kind == "memory":
            try:
                geometry[layer.index] = memory_geometry(config, shapes, layers_path, anatomy.kind_of(layer.source).anatomy, layer.source)
            except ValueError as exc:
                problems.append(loaded.problem(("layout",), f"output layer {layer.index} (memory from base layer {layer.source}): {exc}"))
    for g in dict.fromkeys(geometry.values()):  # one message per attention shape, naming its blocks
        at = [i for i, gi in geometry.items() if gi == g]
        problems += memory_problems(loaded, hidden, g, f"memory block{'s' if len(at) > 1 else ''} at output layer{'s' if len(at) > 1 else ''} {index_ranges(at)}")
    if problems:
        raise RecipeError(problems)
    try:
        hmls = {g: build_hml(hidden, g, recipe.memory) for g in set(geometry.values())}
    except Exception as exc:  # noqa: BLE001
        raise RecipeError([loaded.problem(("memory",), f"cannot build the memory layer for this base: {one_line(exc)}")]) from None
    plan = assemble_plan(loaded, BaseFacts.of(config), layers, new_config, shapes, layers_path, anatomy,
                         {index: hmls[g] for index, g in geometry.items()}, buffers=base_buffers(config))
    return dataclasses.replace(plan, lists_by_length=tuple(by_length))


def block_kind_problems(loaded: LoadedRecipe, anatomy: StackAnatomy, layers: list[LayerSpec]) -> list:
    """Identity and memory blocks whose source layer's kind cannot make them: one problem per
    (kind of block, kind of layer), naming the first such output layer and where the layout could
    take them from instead."""
    problems, seen = [], set()
    for layer in layers:
        if layer.kind not in ("identity", "memory"):
            continue
        kind_index = anatomy.layer_kinds[layer.source]
        why = anatomy.kinds[kind_index].refusal(layer.kind)
        if why is None or (layer.kind, kind_index) in seen:
            continue
        seen.add((layer.kind, kind_index))
        able = [i for i in range(len(anatomy.layer_kinds)) if anatomy.kind_of(i).refusal(layer.kind) is None]
        article = "an" if layer.kind[0] in "aeiou" else "a"
        reason, *advice = why.splitlines()
        if able:  # the layout can take the block from elsewhere: that is the advice
            instead = f"{reason}; base layers that can: {index_ranges(able)}"
        else:  # no layer can: what was found, and how to state the block in the recipe
            instead = f"{reason.rstrip('.')}, and no base layer of this model can make {article} {layer.kind} block." + "".join(f"\n{line}" for line in advice)
        problems.append(loaded.problem(("layout",), f"output layer {layer.index} is {article} {layer.kind} block copied from base layer {layer.source}, "
                                                    f"a {anatomy.kinds[kind_index].label}: {instead}"))
    return problems


def _split_layers(shapes: dict[str, tuple[int, ...]], layers_path: str) -> dict[int, dict[str, tuple[int, ...]]]:
    """layer index -> {name inside the layer: shape}."""
    prefix = layers_path + "."
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            out.setdefault(int(index), {})[rest] = shape
    return out


def layers_changed_by_config(base_shapes: dict[str, tuple[int, ...]], new_config: dict, layers: list[LayerSpec], layers_path: str) -> str | None:
    """Why the rewritten config would build an output layer unlike its source layer, or None.

    Configs can choose a layer's kind from its index by rules of their own (Jamba's
    ``expert_layer_period``: MoE or dense FFN, Mamba or attention), which moving layers changes.
    INDEX_PATTERNS names the known ones; this catches the rest wherever they change a layer's
    tensors: the architecture built (on the meta device) from the rewritten config must give each
    output layer exactly its source layer's tensor names and shapes.
    """
    data = dict(new_config)
    new_shapes = dict(_base_model_facts(json.dumps(data, sort_keys=True, default=str))[0])
    prefix = layers_path + "."
    resized = [name for name, shape in base_shapes.items() if not name.startswith(prefix) and new_shapes.get(name, shape) != shape]
    if resized:
        return (f"the base has tensors outside the decoder layers sized by the depth ({', '.join(resized[:3])}: "
                f"{base_shapes[resized[0]]} for {max(layer.source for layer in layers) + 1} layers, {new_shapes[resized[0]]} for "
                f"{len(layers)}), e.g. per-layer input embeddings; surgery does not split them per layer, so this architecture "
                f"cannot be made deeper")
    base_layers, new_layers = _split_layers(base_shapes, layers_path), _split_layers(new_shapes, layers_path)
    unlike = [layer for layer in layers if new_layers.get(layer.index, {}) != base_layers.get(layer.source, {})]
    if not unlike:
        return None
    # a moved or inserted layer first: an in-place one that changes too (Zamba2's shared block, an adapter per use) is
    # changed by what was added, which the message then blamed on a move it did not make (trial68)
    layer = next((la for la in unlike if la.index != la.source), unlike[0])
    differ = sorted(set(new_layers.get(layer.index, {}).items()) ^ set(base_layers.get(layer.source, {}).items()))
    names = ", ".join(name for name, _ in differ[:3])
    if layer.index == layer.source:
        return (f"the rewritten config builds output layer {layer.index} unlike base layer {layer.source}, though it stays in place "
                f"(tensors differ: {names}): its tensors depend on the rest of the stack (e.g. a block shared by several layers, "
                "with a part per use), so the layers this layout adds change it; this architecture cannot take this layout")
    suspects = [f"{k}={v}" for k, v in new_config.items()
                if isinstance(v, int) and not isinstance(v, bool) and _PATTERN_KEY.search(k) and k not in INDEX_PATTERNS]
    return (f"the rewritten config builds output layer {layer.index} unlike its source, base layer {layer.source} "
            f"(tensors differ: {names}): the base config chooses some layers' kind by index"
            + (f" (settings such as {', '.join(suspects[:4])})" if suspects else "")
            + ", and this layout moves them; use a layout that keeps the pattern")


# Names of config integers that may choose a layer's kind by its index (Jamba's attn_layer_period / offset): named in
# the refusal above, which otherwise left the user to find which key sets the pattern (trial71 L2)
_PATTERN_KEY = re.compile(r"(_period|_offset|_interval|_step|_freq|_every|start_index|end_index)$")


def assemble_plan(loaded: LoadedRecipe, base: BaseFacts, layers: list[LayerSpec], new_config: dict,
                  shapes: dict[str, tuple[int, ...]], layers_path: str, anatomy: StackAnatomy | None, hmls: dict | None = None,
                  buffers: frozenset[str] = frozenset()) -> Plan:
    """The tensor map and the counts, from the checked layer map, the rewritten config and the base's tensors.

    shapes: every base tensor (tied ones once) -> shape, in module order (what named_parameters
    lists); the output has the tensors outside the decoder layers first, in this order, then each
    output layer's tensors in the order of its source layer.
    hmls: output memory layer -> a (meta-device) memory module of its size.
    buffers: the base's persistent buffers among ``shapes``: written, not counted as parameters.
    """
    recipe = loaded.recipe
    # the config the output will have, so its dtype is the written weights' (`plan --json` and midus_plan.json
    # said the base's when output.dtype converts; trial64)
    base_dtype = auto_dtype(new_config.get("dtype") or new_config.get("torch_dtype"))
    new_config = {**{k: v for k, v in new_config.items() if k != "torch_dtype"},
                  "dtype": base_dtype if recipe.output.dtype == "auto" else recipe.output.dtype}
    L = base.num_layers
    prefix = layers_path + "."
    split = _split_layers(shapes, layers_path)
    per_layer: list[dict[str, tuple[int, ...]]] = [split.get(i, {}) for i in range(L)]
    global_shapes = {name: shape for name, shape in shapes.items() if not name.startswith(prefix)}

    hmls = hmls or {}
    share = recipe.memory.share_bank
    bank_shapes = {tuple(h.bank.weight.shape) for h in hmls.values() if getattr(h, "bank", None) is not None}
    hml_bank_shape = next(iter(bank_shapes), None) if share else None

    tensors: list[TensorEntry] = [TensorEntry(n, s, n, "copy") for n, s in global_shapes.items()]
    layer_params: list[int] = []
    buffer_numel = 0  # the memory blocks' running statistics: written like the parameters, not counted with them
    heads, head_dim = base.heads, base.head_dim
    window = base.sliding_window
    # per output layer: attention score/value flops per token (QK^T and AV over the context)
    attn_ctx_flops = [4 * _attention_context(new_config.get("layer_types"), window, recipe.flops_seq_len, layer.index) * heads * head_dim for layer in layers]

    plan_layer_flops: list[int] = []
    # query_source "heads": the attention's output projection becomes the tap (dropped); "hidden"
    # keeps it (zeroed), as modeling_midus does, and queries the memory from the FFN branch's input
    tapped = recipe.memory.query_source == "heads"
    for layer in layers:
        src = per_layer[layer.source]
        out_prefix, src_prefix = f"{prefix}{layer.index}.", f"{prefix}{layer.source}."
        count = 0
        kept: dict[str, tuple[int, ...]] = {}
        block = anatomy.kind_of(layer.source).anatomy if anatomy is not None and layer.kind in ("identity", "memory") else None
        try:
            ffn_outputs = _ffn_output_tensors(src, block) if layer.kind == "identity" else set()
        except ValueError as exc:
            raise RecipeError([loaded.problem(("layout",), f"output layer {layer.index}: {exc}")]) from None
        for rest, shape in src.items():
            rule = _block_tensor_rule(layer.kind, rest, block, tapped, ffn_outputs)
            if rule is None:
                continue
            tensors.append(TensorEntry(out_prefix + rest, shape, src_prefix + rest, rule))
            kept[rest] = shape
            count += 0 if src_prefix + rest in buffers else math.prod(shape)
        flops = 2 * _matmul_params(kept, base.experts_of(layer.source)) + attn_ctx_flops[layer.index]
        if layer.kind == "memory":
            hml = hmls[layer.index]
            rules = hml.init_rules()
            readout = f"{out_prefix}{memory_module_path(block)}.{HML_MODULE}."
            parameters = dict(hml.named_parameters())
            for pname, p in hml.state_dict().items():  # parameters and the query norm's running statistics
                if share and pname == "bank.weight":
                    continue  # one bank for the whole model, written once below
                tensors.append(TensorEntry(readout + pname, tuple(p.shape), None, rules.get(pname, "init")))
                if pname in parameters:
                    count += p.numel()
                else:
                    buffer_numel += p.numel()  # written, but not a parameter (the running statistics)
            flops += hml.flops_per_token()
        layer_params.append(count)
        plan_layer_flops.append(flops)
    if share and hmls:
        # One bank for the whole model, owned at the top level and written once.
        if len(bank_shapes) != 1:
            raise RecipeError([loaded.problem(("memory", "share_bank"), f"memory blocks of different sizes cannot share one bank (banks {sorted(bank_shapes)})")])
        first = next(iter(hmls.values()))
        tensors.append(TensorEntry(f"{SHARED_BANK}.weight", hml_bank_shape, None, first.init_rules().get("bank.weight", "init")))

    base_total = sum(math.prod(s) for name, s in shapes.items() if name not in buffers)
    total = sum(t.numel for t in tensors if t.source not in buffers) - buffer_numel
    layer_size = [sum(math.prod(s) for rest, s in per_layer[i].items() if f"{prefix}{i}.{rest}" not in buffers) for i in range(L)]
    # plain DUS: the same layer map with every output layer a copy of its source, so a layout that drops base layers
    # counts them out here as it does in the plan's own total and in the FLOPs (it counted inserted copies only, and a
    # copy-only SOLAR layout with two layers dropped showed 0.955x plain DUS's parameters: trial82 F1)
    dus_added = sum(layer_size[layer.source] for layer in layers) - sum(layer_size)
    base_layer_flops = [2 * _matmul_params(per_layer[i], base.experts_of(i)) for i in range(L)]
    head_flops = 2 * base.vocab_size * base.hidden_size
    base_types = base.layer_types
    base_flops = head_flops + sum(base_layer_flops[i] + 4 * _attention_context(base_types, window, recipe.flops_seq_len, i) * heads * head_dim for i in range(L))
    dus_flops = head_flops + sum(base_layer_flops[layer.source] + attn_ctx_flops[layer.index] for layer in layers)
    plan_flops = head_flops + sum(plan_layer_flops)

    midus = {
        "layer_map": [asdict(layer) for layer in layers],
        "memory_layers": [layer.index for layer in layers if layer.kind == "memory"],
        "hml": recipe.memory.hml_dict(),
        "share_bank": share,
        "anatomy": anatomy.single.model_dump(mode="json") if anatomy and anatomy.single else None,
        # per memory block: the anatomy of its source layer and the heads it reads (modeling_midus)
        "memory_blocks": {str(layer.index): {"anatomy": anatomy.kind_of(layer.source).anatomy.model_dump(mode="json"),
                                             "heads": hmls[layer.index].num_heads, "head_dim": hmls[layer.index].head_dim}
                          for layer in layers if layer.kind == "memory"},
        "base_model_type": base.model_type,
    }
    return Plan(
        model_type=base.model_type,
        base_num_layers=L,
        layers=layers,
        config=new_config,
        midus=midus,
        tensors=tensors,
        params={"base": base_total, "added": total - base_total, "total": total, "dus_added": dus_added},
        flops_per_token={"base": base_flops, "dus": dus_flops, "plan": plan_flops},
        flops_seq_len=recipe.flops_seq_len,
        layer_params=layer_params,
        anatomy=anatomy,
        layers_path=layers_path,
    )


def memory_module_path(anatomy: Anatomy) -> str:
    """Where a memory block's readout sits in its layer (its HML module is under it): the last FFN module's place, or in a
    block with no FFN the attention's output projection's, registered as a stand-in (modeling_midus.install_memory_blocks)."""
    if anatomy.ffn:
        return anatomy.ffn[-1]
    parent, _, name = anatomy.attn_out_proj.rpartition(".")
    return f"{parent}.{STAND_IN_PREFIX}{name}" if parent else f"{STAND_IN_PREFIX}{name}"


_DOWN_PROJ = re.compile(r"(^|\.)down_proj(\.weight|\.bias|_bias)?$")


def _ffn_output_tensors(layer: dict[str, tuple[int, ...]], anatomy: Anatomy) -> set[str]:
    """The tensors of one layer's FFN that an identity block zeroes, so that the FFN adds 0.

    A dense FFN: its down projection's. A mixture of experts in transformers' layout (the
    experts' weights stacked in [experts, ...] tensors): every ``down_proj`` under the FFN, the
    stacked experts' and any shared expert's. transformers' experts code names the output
    projection so; zeroing only these keeps the experts' input projections, so gradients reach
    them from the first step (zeroing the whole experts module would leave them stuck at zero).
    """
    if not anatomy.ffn:  # a block whose one branch is its mixer: zeroing the mixer's output projection is enough
        return set()
    ffn = [name for name in layer if any(_is_under(name, m) for m in anatomy.ffn)]
    if not any(len(layer[name]) >= 3 for name in ffn):
        return {name for name in ffn if _is_under(name, anatomy.ffn_down_proj)}
    outputs = {name for name in ffn if _DOWN_PROJ.search(name)}
    # the module the graph found last, when it is one stacked projection (JetMoE's output_linear), not
    # a module of several (Mixtral's experts: gate_up_proj and down_proj side by side)
    own = [name for name in ffn if name.rpartition(".")[0] == anatomy.ffn_down_proj]
    if sum(len(layer[name]) >= 2 for name in own) == 1:
        outputs |= set(own)
    if not any(len(layer[name]) >= 3 for name in outputs):
        raise ValueError(f"identity blocks: the FFN {', '.join(anatomy.ffn)} has stacked (3-D) weights, but no down_proj among them and its "
                         f"last module {anatomy.ffn_down_proj} is not one projection, so which of them makes its output is not known")
    return outputs


def _block_tensor_rule(kind: str, rest: str, anatomy: Anatomy | None, tapped: bool, ffn_outputs: set[str] = frozenset()) -> str | None:
    """How an inserted block gets its source layer's tensor ``rest``: "copy", "zeros", or None (not in the block).

    anatomy: the source layer's; ffn_outputs: for identity blocks, the FFN tensors zeroed
    (``_ffn_output_tensors``). Further residual branches (``extra_out_projs``) start at zero in
    identity and memory blocks alike, and so do the biases added after a branch's output projection
    (``out_biases``)."""
    if kind in ("identity", "memory") and any(_is_under(rest, m) for m in anatomy.extra_out_projs):
        return "zeros"
    if kind == "identity" and any(_is_under(rest, m) for m in anatomy.out_biases):
        return "zeros"
    if kind == "memory":
        if not anatomy.ffn and (_is_under(rest, anatomy.attn_out_proj) or any(_is_under(rest, m) for m in anatomy.attn_post_norms)):
            return None  # no FFN: the memory readout stands in for the attention's output projection, its post-norms identities
        if any(_is_under(rest, m) for m in (*anatomy.ffn, *anatomy.ffn_norms)):
            return None  # replaced by the HML readout / identities
        if _is_under(rest, anatomy.attn_out_proj):
            # heads: replaced by the tap; hidden: kept, zero at the start (as LLaMA-Pro's) so the block starts as the identity
            return None if tapped else "zeros"
        if tapped and any(_is_under(rest, m) for m in anatomy.attn_post_norms):
            return None  # they would normalise the tap's zeros: identities (Gemma-2's post_attention_layernorm)
        if any(_is_under(rest, m) for m in anatomy.out_biases):
            return "zeros"  # the attention's (the FFN's are gone with it, above)
    if kind == "identity" and (_is_under(rest, anatomy.attn_out_proj) or rest in ffn_outputs):
        return "zeros"
    return "copy"


def _attention_context(layer_types, window: int | None, seq_len: int, index: int) -> int:
    """Tokens layer ``index`` attends over: the window for sliding layers, else the sequence. Without
    ``layer_types`` a window is every layer's (Mistral, Mixtral, Phi-3, Starcoder2 pass config.sliding_window
    to each layer's attention; Qwen2's flag, when off, leaves no window to read: trial52)."""
    if window and (not layer_types or "sliding" in str(layer_types[index])):
        return min(seq_len, window)
    return seq_len


def stated_anatomy_problem(loaded, config, num_layers: int) -> None:
    """A recipe's `anatomy:` checked against the model: a layers_path that names no list of its decoder layers was said
    as a model that keeps its layers in parallel lists, at `base`, and a layer_class that is not the layers' was written
    into the output's config unchecked (trial150 L2). Raises RecipeError, located at the key."""
    stated = loaded.recipe.anatomy
    lists = base_module_lists(config)  # by the modules, not by the weights' names (layers that share weights name fewer)
    found = [name for name, (length, _) in lists.items() if length == num_layers]
    hint = f"its lists of {num_layers} modules: {', '.join(repr(f) for f in found[:3]) or 'none'}"
    if stated.layers_path not in lists:
        raise RecipeError([loaded.problem(("anatomy", "layers_path"), f"{stated.layers_path!r} is no list of modules in this model; {hint}")])
    length, classes = lists[stated.layers_path]
    if length != num_layers:  # another list of modules (experts, per-layer norms): not the decoder layers (trial153 L3, trial154 L4)
        raise RecipeError([loaded.problem(("anatomy", "layers_path"), f"{stated.layers_path!r} holds {length} modules, not the model's "
                                          f"{num_layers} decoder layers; {hint}")])
    if stated.layer_class not in classes:
        raise RecipeError([loaded.problem(("anatomy", "layer_class"), f"the layers at {stated.layers_path} are {', '.join(classes)}, "
                                          f"not {stated.layer_class}")])


def layer_lists(shapes: dict[str, tuple[int, ...]], num_layers: int) -> list[str]:
    """Dotted prefixes followed by every index 0..L-1 (and no other), outermost first: the decoder
    layers' list, and any list running beside it (XLM keeps attentions and FFNs apart)."""
    candidates: dict[str, set[int]] = {}
    for name in shapes:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                candidates.setdefault(".".join(parts[:i]), set()).add(int(part))
    found = [path for path, seen in candidates.items() if seen == set(range(num_layers))]
    # a list nested inside one layer's module (e.g. experts numbered like layers) is not a layer list
    return [p for p in found if not any(p.startswith(q + ".") and p[len(q) + 1:].split(".")[0].isdigit() for q in found if q != p)]


def guess_layers_path(shapes: dict[str, tuple[int, ...]], num_layers: int) -> str | None:
    """Without an anatomy: the first dotted prefix followed by every index 0..L-1."""
    found = layer_lists(shapes, num_layers)
    return found[0] if found else None
