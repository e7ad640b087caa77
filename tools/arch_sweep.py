"""Apply + verify DUS, LLaMA-Pro and MIDUS recipes on tiny random models of many architectures.

For each model type: a tiny random model built from its default config, shrunk generically
(:func:`tiny_config`), saved the way transformers saves it (so MoE experts are stored one tensor
per expert), then for each recipe kind: `compile` (validate + plan), `emit` (apply) and `verify`.
Each model type runs in a child process with a time limit and a memory cap, so a crash or a hang
is one row and the sweep goes on. The outcome per kind is one of

    ok                          applied, and every verify check passed
    refused: <reason>           `validate` (plan_recipe) refused the recipe with a RecipeError
    apply failed: <message>     emit raised a MidusError
    verify failed: <check>: ... emit wrote it, verify rejects it
    CRASH: <Type>: <message>    any other exception (a bug of this tool, to report)
    crash: <how> / timeout: ... the child process died or ran past its limit
    build: <message>            this script could not build the architecture at tiny size

A refusal by `validate` with a clear message is a valid outcome for a layout the architecture
cannot take; CRASH, verify failed and crash are bugs.

    python tools/arch_sweep.py                      # the representative list (a few minutes on 2 cores)
    python tools/arch_sweep.py mixtral qwen3_moe    # chosen model types
    python tools/arch_sweep.py --all                # every causal-LM type of the installed transformers,
                                                    # table in docs/architectures.md (30-60 min on 2 cores)
    python tools/arch_sweep.py --json               # one JSON object
    python tools/arch_sweep.py --from-json work/arch-sweep/results.json --doc docs/architectures.md

Every run also writes <out>/results.json (outcomes, tiny-model sizes, timings, and the verify checks the
tiny base itself fails). A base that fails a kind keeps its folder under <out> for a closer look.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from midus_surgery.errors import one_line  # light (no torch); the rest is imported where used
from midus_surgery.io.output_dir import OutputError, remove_own_directory, use_workspace

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "work" / "arch-sweep"
DEFAULT_DOC = ROOT / "docs" / "architectures.md"

DEFAULT_TYPES = ("llama mistral qwen2 qwen3 gemma gemma2 gemma3_text olmo olmo2 cohere cohere2 phi phi3 stablelm starcoder2 "
                 "granite falcon gpt2 gpt_neox gptj codegen gpt_bigcode opt glm4 smollm3 "
                 "mixtral qwen2_moe qwen3_moe olmoe granitemoe").split()
KINDS = {"dus": "transformer", "llama-pro": "identity", "midus": "memory"}
AFTER_EVERY = 2
MEMORY = "memory:\n  n_subkeys: 8\n  topk: 4\n  latent_dim: 8\n"
TIMEOUT_S = 180  # per model type: build + three kinds; a tiny model takes seconds
MEMORY_GB = 12  # address-space cap of a child (torch alone maps about 1.1 GiB)
CHILD_FLAG = "--_child"  # hidden: run one model type in this process, one JSON line per result
RESULT_TAG = "@@arch-sweep@@ "


def all_model_types() -> list[str]:
    """Every model type the installed transformers maps to a causal LM, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# --------------------------------------------------------------------------------------------
# Tiny configs: the type's default config with every width-like size shrunk.
#
# A size is recognised by the name of its config attribute (or the alias in the config's
# attribute_map), never by the model type. Sizes that the config derives from others (llama's
# head_dim from hidden_size / heads, a layer_types list from num_hidden_layers) are found by
# changing one size at a time on the class defaults, and are left to the config to recompute.
# Per-layer lists of the default length that the config does not regenerate are cut (or
# cycled) to the new layer count; lists of layer indices keep the indices below it.


@dataclass(frozen=True)
class Sizes:
    """The targets of one shrinking level; a size already at or below its target is kept."""

    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2  # when the default has fewer kv heads than heads (GQA); MQA stays 1, MHA follows heads
    head: int = 16
    rope: int = 8  # rotary / rope head dims
    ffn: int = 128
    moe_ffn: int = 32
    experts: int = 4
    experts_per_tok: int = 2
    groups: int = 2
    vocab: int = 512
    positions: int = 256
    window: int = 64
    rank: int = 16  # LoRA-style ranks (MLA kv/q ranks, laurel, gates)
    state: int = 16  # SSM state sizes
    per_layer: int = 16  # per-layer-input widths (gemma3n, gemma4)
    tower_layers: int | None = 2  # layers of a vision / audio tower; None: keep the default
    exotic: bool = True  # also shrink ranks, states, windows and groups


LEVELS = (
    Sizes(),
    Sizes(heads=8),  # SSMs that tie heads x head dim to expand x hidden (mamba2)
    Sizes(hidden=128, head=32, rope=16, ffn=256, moe_ffn=64, experts=8, vocab=1024, positions=512, window=128, rank=32),
    Sizes(hidden=256, heads=8, head=32, rope=16, ffn=512, moe_ffn=128, experts=8, vocab=4096, positions=1024, window=256,
          rank=64, state=64, per_layer=64, tower_layers=None, exotic=False),
)
LAYER_CHOICES = (8, 12, 16)  # the first that keeps every kind of layer the default pattern has
MAX_PARAMS = 20_000_000  # a level that would build more parameters than this is skipped

# The few per-type settings a generic shrink cannot find, each with its reason. OVERRIDES apply to
# the default config before it is shrunk (a dict value for a sub-config is merged into it);
# TINY_OVERRIDES to the shrunk one, from the level's sizes.
def _qsa(head_dim: int) -> dict:  # Qwen4-Exp's QSA indexer: all its sizes or none, and the model builds it whatever the config says
    return {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": head_dim, "indexer_budget": 16, "indexer_compress_ratio": 4}


OVERRIDES: dict[str, dict] = {
    # class defaults that do not validate, or do not build a model (transformers 5.24)
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},  # "must be 0, got 256"
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},  # {} by default
    # DbrxAttentionConfig has no rope_theta, which the model reads; clip_qkv None fails in torch.clamp (DBRX uses 8)
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "xmod": {"default_language": "en_XX"},  # its language adapters need one to run on input ids alone
    "lfm2_moe": {"num_hidden_layers": 8, "layer_types": ["conv", "conv", "full_attention"] * 2 + ["conv", "full_attention"]},  # None by default
    "qwen4_exp": {"text_config": _qsa(256)},
    "qwen4_exp_text": _qsa(256),
    # hybrid architectures whose class defaults are not hybrid: the mix their released checkpoints have
    "lfm2": {"full_attn_idxs": [2, 5]},  # short-conv blocks with attention at a few layers (default: all attention)
    "bamba": {"attn_layer_indices": [3]},  # Mamba-2 with attention at a few layers (default: none)
    "granitemoehybrid": {"num_hidden_layers": 8, "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 2},  # default: all Mamba
}
TINY_OVERRIDES = {
    # axial position embeddings: the two widths sum to hidden_size, the two lengths multiply to the positions
    "reformer": lambda s: {"axial_pos_embds_dim": [s.hidden // 4, s.hidden * 3 // 4], "axial_pos_shape": [16, s.positions // 16]},
}
_TOWERS = re.compile(r"vision|audio|vq|patcher|encoder_config|image|speech")  # sub-configs that are not the decoder
_BOOKKEEPING = {"transformers_version", "architectures", "_name_or_path", "id2label", "label2id", "dtype", "torch_dtype"}


def _category(name: str) -> str | None:
    """What kind of size a config attribute holds, from its name; None: not a size to shrink."""
    n = name.lower()
    if n.endswith(("token_id", "token_index", "token_ids")) or n in ("suppress_tokens", "begin_suppress_tokens"):
        return "token"
    if "multiple" in n or "divisible" in n:
        return "multiple"
    if "per_layer" in n:
        return "vocab" if "vocab" in n else "per_layer"
    if "rank" in n:
        return "dt_rank" if re.search(r"dt_rank|time_step_rank", n) else "rank"
    if re.search(r"^(num_hidden_layers|n_layers?|num_layers|(encoder|decoder)_layers|depth|num_global_layers|num_blocks)$|_num_hidden_layers$", n):
        return "layers"
    if re.search(r"period|interval|step|pattern|every|offset|layer_group_size|layers_per_\w*block", n):  # a block of N layers (Inkling2)
        return "layer_period"
    if "layer" in n or n == "first_k_dense_replace":
        return "layer_count"
    if re.search(r"experts_per_tok|top_?k_experts|^moe_top_?k$|^moe_k$|^top_k$|num_selected_experts", n):
        return "experts_per_tok"
    if re.search(r"n_group|num_expert_group|topk_group|n_?groups$|o_groups$", n):
        return "groups"
    if re.search(r"^(n|num|moe_num)_shared_experts$", n):
        return "shared_experts"
    if "expert" in n and not re.search(r"shared|size|dim|ffn|bias|coef|factor", n):
        return "experts"
    if re.search(r"intermediate|ffn|ff_dim|dim_ff|^dff$|^d_ff$|n_inner|mlp_dim|d_inner", n):
        return "moe_ffn" if re.search(r"moe|expert|shared", n) else "ffn"
    if re.search(r"rope_head_dim|rotary_dim|rope_dim", n):
        return "rope"
    if "nope_head_dim" in n:
        return "nope"  # MLA: head dim = nope + rope
    if re.search(r"head_?dim|d_head|dim_head|kv_channels|head_size|^d_rel$", n):
        return "head"
    if re.search(r"key_value_heads|kv_heads|kv_n_heads|query_groups|multi_query_group_num", n):
        return "kv_heads"
    if re.search(r"heads|^n_head$|attention_heads", n):
        return "heads"
    if re.search(r"d_state|state_size|ssm_state", n):
        return "state"
    if "vocab" in n:
        return "vocab"
    if re.search(r"max_position|n_positions|^n_ctx$|^max_.*positions$|max_seq_len|model_max_length|max_sequence_length|^context_length$", n):
        return "positions"
    if re.search(r"^sliding_window$|sliding_window_size|^window_size$|^local_attention$|attention_chunk_size|window_len", n):
        return "window"
    if re.search(r"hidden_size|^d_model$|^n_embd$|^dim$|embed_dim|embedding_dim|embedding_size|model_dim|hidden_dim|d_ssm|lru_width"
                 r"|output_dim|out_dim|input_dim|_in_dim$|(^|_)input_size$|codebook_dim|proj_dim", n):
        return "hidden"
    return None


_EXOTIC = {"rank", "dt_rank", "state", "window", "groups", "per_layer", "multiple"}
# sizes some defaults leave None although the model needs them (hunyuan's head_dim, dots1's expert counts);
# kv heads None: as many as the query heads. None elsewhere (a window, a LoRA rank) means "off" and stays.
_NONE_FILL = {"head", "heads", "kv_heads", "experts", "experts_per_tok", "shared_experts"}


def _none_fill(category: str, sizes: Sizes) -> int:
    return {"head": sizes.head, "heads": sizes.heads, "kv_heads": sizes.heads, "experts": sizes.experts,
            "experts_per_tok": sizes.experts_per_tok, "shared_experts": 1}[category]


def _shrunk(category: str, value: int, sizes: Sizes, ctx: dict) -> int:
    """The tiny value of one int size (``ctx``: the level's layer counts and default head count)."""
    n, layers = ctx["n"], ctx["L"]
    if category == "layers":
        return n if value > n or ctx["text"] else value
    if category == "layer_period":
        return min(value, n)
    if category == "layer_count":
        if value < n / 2 or not layers:
            return value
        return min(n - 1 if "index" in ctx["name"] or "start" in ctx["name"] or "end" in ctx["name"] else n, max(1, round(value * n / layers)))
    if category == "shared_experts":
        return value
    if category == "kv_heads":
        if value <= 1:
            return value
        return min(value, sizes.heads) if value >= (ctx["heads"] or value) else min(value, sizes.kv_heads)
    target = {"hidden": sizes.hidden, "heads": sizes.heads, "head": sizes.head, "rope": sizes.rope, "nope": sizes.head - sizes.rope, "ffn": sizes.ffn,
              "moe_ffn": sizes.moe_ffn, "experts": sizes.experts, "experts_per_tok": sizes.experts_per_tok, "groups": sizes.groups,
              "vocab": sizes.vocab, "positions": sizes.positions, "window": sizes.window, "rank": sizes.rank, "dt_rank": 8,
              "state": sizes.state, "per_layer": sizes.per_layer, "multiple": 16}[category]
    if category == "window" and value <= 0:
        return value
    return min(value, target)


def _default_layers(config) -> int:
    try:
        value = getattr(config, "num_hidden_layers", None)
    except Exception:  # noqa: BLE001 - a property that needs what is not set
        value = None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _aliases(cls) -> dict[str, str]:
    """attribute -> alias, from the class's attribute_map (n_embd -> hidden_size)."""
    return {real: alias for alias, real in getattr(cls, "attribute_map", {}).items()}


def _category_of(key: str, aliases: dict[str, str]) -> str | None:
    return _category(key) or (_category(aliases[key]) if key in aliases else None)


def _derived(cls, candidates: dict[str, int]) -> set[str]:
    """The attributes the class's __init__ recomputes when one of ``candidates`` changes."""
    try:
        base = cls().to_dict()
    except Exception:  # noqa: BLE001 - class defaults that do not validate: nothing learnt
        return set()
    derived: set[str] = set()
    for key, value in candidates.items():
        try:
            changed = cls(**{key: value}).to_dict()
        except Exception:  # noqa: BLE001 - a size that cannot change alone
            continue
        derived |= {k for k in changed if k != key and k not in _BOOKKEEPING and changed[k] != base.get(k)}
    return derived


def _resize(values: list, n: int) -> list:
    """A per-layer list cut, or cycled, to ``n`` entries (the default pattern's prefix)."""
    return [values[i % len(values)] for i in range(n)]


def _is_index_list(key: str, values: list) -> bool:
    return bool(values) and all(isinstance(v, int) and not isinstance(v, bool) for v in values) and bool(
        re.search(r"idx|ids$|indices|indexes|_layers$", key.lower()))


def _level_overrides(cls, d: dict, sizes: Sizes, *, n: int, text: bool, tokens: dict[int, int], derive: bool = True) -> tuple[dict, set[str]]:
    """The changed attributes of one config level (``d``: its default dict) and its derived attributes."""
    aliases = _aliases(cls)
    layers = d.get("num_hidden_layers") if isinstance(d.get("num_hidden_layers"), int) else 0
    if not layers:
        for key, value in d.items():
            if _category_of(key, aliases) == "layers" and isinstance(value, int):
                layers = value
                break
    if not layers:
        layers = max((len(v) for k, v in d.items() if isinstance(v, list) and k in ("layer_types", "layers_block_type", "block_types")), default=0)
    heads = next((v for k, v in d.items() if _category_of(k, aliases) == "heads" and isinstance(v, int)), 0)
    level_n = n if text else (sizes.tower_layers or layers or n)
    ctx = {"n": level_n, "L": layers, "heads": heads, "text": text}
    out: dict = {}
    for key, value in d.items():
        if key in _BOOKKEEPING:
            continue
        category = _category_of(key, aliases)
        ctx["name"] = key.lower()
        if value is None and category in _NONE_FILL:
            out[key] = _none_fill(category, sizes)
            continue
        if category is None or (category in _EXOTIC and not sizes.exotic):
            pass
        elif category == "layers" and not text and sizes.tower_layers is None:
            continue
        elif category == "token":
            if isinstance(value, int) and not isinstance(value, bool) and value in tokens:
                out[key] = tokens[value]
            elif isinstance(value, list) and any(v in tokens for v in value if isinstance(v, int)):
                out[key] = [tokens.get(v, v) if isinstance(v, int) else v for v in value]
            continue
        elif isinstance(value, int) and not isinstance(value, bool):
            new = _shrunk(category, value, sizes, ctx)
            if new != value:
                out[key] = new
            continue
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                and category not in ("layers", "layer_period", "layer_count"):
            new = [_shrunk(category, v, sizes, ctx) for v in value]  # a per-layer width list (gemma3n intermediate_size)
            value = new
            out[key] = new
        # lists and per-layer dicts that follow the layer count
        if isinstance(value, list) and layers and len(value) == layers and level_n != layers:
            out[key] = _resize(value, level_n)
        elif isinstance(value, list) and _is_index_list(key, value):
            kept = [v for v in value if v < level_n]
            if kept != value:
                out[key] = kept or [level_n - 1]
        elif isinstance(value, str) and layers and len(value) == layers and level_n != layers and key.endswith("pattern"):
            out[key] = "".join(_resize(list(value), level_n))
        elif isinstance(value, dict) and value and all(re.fullmatch(r"\d+", k) for k in value):
            # per-layer overrides keyed by layer index (gemma4's per_layer_config): the layers kept, shrunk alike
            out[key] = {k: (v | _level_overrides(cls, v, replace(sizes, tower_layers=None), n=level_n, text=False, tokens=tokens, derive=False)[0])
                        if isinstance(v, dict) else v for k, v in value.items() if int(k) < level_n}
    # a head dim equal to a rotary dim in the default (full rotary: longcat's head_dim = qk_rope_head_dim) stays equal
    ropes = {d[k]: out[k] for k in out if _category_of(k, aliases) == "rope" and isinstance(d.get(k), int)}
    for key, value in d.items():
        if _category_of(key, aliases) == "head" and isinstance(value, int) and value in ropes and key in out:
            out[key] = ropes[value]
    derived = _derived(cls, {k: v for k, v in out.items() if isinstance(v, int)}) if derive else set()
    return out, derived - {k for k, v in out.items() if isinstance(v, dict)}  # per-layer dicts: ours, shrunk, not the class's


def _sub_configs(config) -> dict[str, object]:
    from transformers import PreTrainedConfig

    return {k: v for k, v in vars(config).items() if isinstance(v, PreTrainedConfig)}


def _token_map(config, sizes: Sizes) -> dict[int, int]:
    """Special token ids at or above the tiny vocabulary -> distinct ids at its top (bos == eos stays so)."""
    ids: set[int] = set()

    def collect(d: dict) -> None:
        for key, value in d.items():
            if key in _BOOKKEEPING or not isinstance(key, str):
                continue
            if isinstance(value, dict):
                collect(value)
            elif _category(key) == "token":
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, int) and not isinstance(v, bool) and v >= sizes.vocab:
                        ids.add(v)

    collect(config.to_dict())
    return {old: sizes.vocab - 1 - i for i, old in enumerate(sorted(ids))}


def _pattern_kinds(config, n_default: int) -> dict[str, set]:
    """Per-layer string lists of a config (and its sub-configs): name -> the distinct values."""
    out = {}
    for prefix, cfg in [("", config), *((f"{k}.", v) for k, v in _sub_configs(config).items() if not _TOWERS.search(k))]:
        layers = _default_layers(cfg) or n_default
        for key, value in cfg.to_dict().items():
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value) and (not layers or len(value) == layers):
                out[prefix + key] = set(value)
    return out


def tiny_config(model_type: str, sizes: Sizes = LEVELS[0], *, layers: int | None = None):
    """The default config of ``model_type`` with its sizes shrunk to ``sizes`` and ``layers`` decoder layers
    (None: the first of LAYER_CHOICES whose per-layer lists keep every kind of layer the default has)."""
    from transformers import AutoConfig

    extra = OVERRIDES.get(model_type, {})
    default = AutoConfig.for_model(model_type, **extra)  # a sub-config dict: that class's defaults and these
    kinds = _pattern_kinds(default, _default_layers(default))
    choices = (layers,) if layers else LAYER_CHOICES
    first_error = None
    for n in choices:
        try:
            config = _tiny_config(model_type, default, sizes, n, extra)
        except Exception as exc:  # noqa: BLE001 - try the next layer count, report the first failure
            first_error = first_error or exc
            continue
        tiny = _pattern_kinds(config, n)
        if all(tiny.get(k, v) >= v for k, v in kinds.items()) or n == choices[-1]:
            return config
    if first_error is not None:
        raise first_error
    return config


def _tiny_config(model_type: str, default, sizes: Sizes, n: int, extra: dict):
    from transformers import AutoConfig

    tokens = _token_map(default, sizes)
    d = default.to_dict()
    ours, derived = _level_overrides(type(default), d, sizes, n=n, text=True, tokens=tokens)
    kwargs = {k: v for k, v in ours.items() if k not in derived or k in extra}
    # derived: the config's own value, unless it kept the default's size (larger than ours)
    checks = [((), k, v, d.get(k)) for k, v in ours.items() if k not in kwargs]
    if d.get("is_decoder") is False:
        kwargs["is_decoder"] = True  # an encoder stack used as a causal LM (bert, roberta, reformer) attends causally only so
    for name, sub in _sub_configs(default).items():
        text = not _TOWERS.search(name)
        if not text and not sizes.tower_layers and not sizes.exotic:
            continue  # the least shrinking keeps towers as they are
        sub_d = sub.to_dict()
        over, sub_derived = _level_overrides(type(sub), sub_d, sizes, n=n, text=text, tokens=tokens)
        base = {k: v for k, v in sub_d.items() if k not in sub_derived and k not in _BOOKKEEPING - {"model_type"}}
        kwargs[name] = base | {k: v for k, v in over.items() if k not in sub_derived}
        checks += [((name,), k, v, sub_d.get(k)) for k, v in over.items() if k in sub_derived]
    kwargs = {k: v for k, v in extra.items() if k not in kwargs} | kwargs | TINY_OVERRIDES.get(model_type, lambda _: {})(sizes)
    config = AutoConfig.for_model(model_type, **kwargs)
    # a per-layer list the config kept at its default length (not regenerated from num_hidden_layers)
    fixes: dict = {}
    for key, value in config.to_dict().items():
        if isinstance(value, list) and key in d and isinstance(d[key], list) and len(value) == len(d[key]) and \
                len(value) == _default_layers(default) and _default_layers(config) != len(value) and _default_layers(config):
            fixes[key] = _resize(value, _default_layers(config))
    # a derived size the config recomputed larger than the shrink wanted (gemma3n's per-layer intermediate_size)
    # and a per-layer list of numbers it regenerated unlike the default's prefix (gemma3n's activation_sparsity_pattern)
    for path, key, value, before in checks:
        got = (getattr(config, path[0]) if path else config).to_dict().get(key)
        if (_larger(got, value) and not _larger(before, got) and not _larger(got, before)) or (isinstance(value, list) and got != value and _category(key) in (None, "layer_period", "layer_count")
                                   and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)):
            if path:
                fixes.setdefault(path[0], dict(kwargs[path[0]]))[key] = value
            else:
                fixes[key] = value
    if fixes:
        config = AutoConfig.for_model(model_type, **(kwargs | fixes))
    return config


def _larger(got, wanted) -> bool:
    def top(v):
        values = v if isinstance(v, list) else [v]
        numbers = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
        return max(numbers) if numbers and len(numbers) == len(values) else None

    a, b = top(got), top(wanted)
    return a is not None and b is not None and a > b


def _param_count(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def build_base(model_type: str, directory: Path) -> dict:
    """Build and save the tiny model of ``model_type``: the first level of LEVELS whose config
    validates, whose model builds under MAX_PARAMS and runs a forward pass. Returns what was built."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    errors = []
    for level, sizes in enumerate(LEVELS):
        stage = "config"
        try:
            config = tiny_config(model_type, sizes)
            stage = "model"
            params = _param_count(config)
            if params > MAX_PARAMS:
                errors.append(f"{params / 1e6:.0f}M parameters at the least shrinking (cap {MAX_PARAMS / 1e6:.0f}M)")
                continue
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
            stage = "forward"
            vocab = getattr(config.get_text_config(), "vocab_size", None) or sizes.vocab
            with torch.no_grad():
                model(input_ids=torch.randint(3, min(vocab, sizes.vocab) - 8, (1, 12), generator=torch.Generator().manual_seed(0)))
        except Exception as exc:  # noqa: BLE001 - shrink less and try again
            errors.append(f"{stage}: {one_line(exc, whole=True)}")
            continue
        remove_own_directory(directory)  # inside the sweep's workspace
        model.save_pretrained(directory)
        return {"level": level, "params": params, "layers": _default_layers(config.get_text_config()),
                "build_s": round(time.perf_counter() - start, 1)}
    raise BuildError("; ".join(dict.fromkeys(errors)))


def base_checks(base: Path) -> dict[str, str]:
    """verify's checks that the tiny base itself fails (check -> detail): a failure after apply that
    the base shares is not the surgery's."""
    from midus_surgery.emit.verify import verify

    try:
        return {c.name: " ".join(c.detail.split())[:160] for c in verify(base, report=lambda c: None) if not c.ok}
    except Exception as exc:  # noqa: BLE001 - reported with the outcomes, never fatal
        return {"verify": one_line(exc, 160, whole=True)}


class BuildError(Exception):
    """This script could not build the architecture at tiny size."""


# --------------------------------------------------------------------------------------------
# One recipe kind on one base


def recipe_text(base: Path, kind: str, out: Path, after: list[int] | None = None) -> str:
    where = f"after: {after}" if after else f"after_every: {AFTER_EVERY}"
    return (f"base:\n  path: {base}\nlayout:\n  interleave:\n    {where}\n    kind: {KINDS[kind]}\n"
            f"{MEMORY if kind == 'midus' else ''}output:\n  dir: {out}\n  dtype: float32\n")


_ABLE = re.compile(r"base layers that can: ([0-9][0-9, \-]*)")


def layers_that_can(message: str, most: int = 2) -> list[int]:
    """The first ``most`` base layers a refusal says can make the blocks ("base layers that can: 0-1, 3-6" -> [0, 1])."""
    found = _ABLE.search(message)
    layers: list[int] = []
    for part in (found.group(1).split(",") if found else []):
        bounds = [int(x) for x in part.strip().split("-") if x.strip().isdigit()]
        if bounds:
            layers.extend(range(bounds[0], bounds[-1] + 1))
    return layers[:most]


_WHERE = re.compile(r"^\s*\S*?\.ya?ml(:\d+)*:\s*")  # "/path/x.yaml:3:1: "


def refusal(message: str, limit: int = 240) -> str:
    """The meaningful part of a RecipeError: its problems without file:line prefixes, at most two lines."""
    lines = [_WHERE.sub("", line).strip() for line in str(message).strip().splitlines()]
    lines = [line for line in lines if line]
    text = " / ".join(lines[:2]) + (f" (+{len(lines) - 2} more)" if len(lines) > 2 else "")
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _where(exc: BaseException) -> str:
    """Where an exception was raised: this project's deepest frame, then the last one (file:line)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)

    def short(frame) -> str:
        path = frame.filename
        for marker in ("site-packages/", f"{ROOT}/"):
            path = path.split(marker, 1)[-1]
        return f"{path}:{frame.lineno}"

    ours = [f for f in frames if "midus_surgery" in f.filename]
    parts = [short(ours[-1])] if ours else []
    if frames and (not ours or frames[-1] is not ours[-1]):
        parts.append(short(frames[-1]))
    return " > ".join(parts)


def try_kind(base: Path, kind: str, work: Path, base_failures: dict[str, str] | None = None) -> str:
    """'ok', or the outcome class and its one-line message (see the module's docstring)."""
    outcome = _try_kind(base, kind, work, base_failures)
    return outcome.replace(f"{work}/", "").replace(str(work), ".")  # paths inside the sweep's folder, relative


def _try_kind(base: Path, kind: str, work: Path, base_failures: dict[str, str] | None) -> str:
    """The outcome of the every-N layout; where it is refused for reaching layers of a kind that cannot make the blocks (a
    hybrid's convolution or state-space layers) and the refusal names layers that can, the outcome of inserting after
    those instead, as 'ok on other layers: ...' when that applies and verifies (else the first refusal)."""
    outcome, message = _try_layout(base, kind, work, base_failures, None)
    able = layers_that_can(message) if outcome.startswith("refused:") and kind != "dus" else []
    if able and _try_layout(base, kind, work, base_failures, able)[0] == "ok":
        return f"ok on other layers: after base layers {', '.join(map(str, able))} (after every {AFTER_EVERY}: {outcome})"
    return outcome


def _try_layout(base: Path, kind: str, work: Path, base_failures: dict[str, str] | None, after: list[int] | None) -> tuple[str, str]:
    """(the outcome, a refusal's whole message or '') of one layout."""
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import check_planned, emit
    from midus_surgery.emit.verify import verify
    from midus_surgery.errors import MidusError, RecipeError

    out = work / f"{base.name}-{kind}"
    remove_own_directory(out)
    recipe = work / f"{base.name}-{kind}.yaml"
    recipe.write_text(recipe_text(base, kind, out, after))
    stage = "plan"
    try:
        try:
            planned = check_planned(plan_recipe(recipe))  # what `validate` runs
        except RecipeError as exc:
            return f"refused: {refusal(str(exc))}", str(exc)
        stage = "apply"
        try:
            emit(planned, progress=False)
        except RecipeError as exc:
            return f"apply failed: {refusal(str(exc))}", ""
        except MidusError as exc:
            return f"apply failed: {one_line(exc, 240, whole=True)}", ""
        stage = "verify"
        try:
            checks = verify(out, report=lambda c: None)
        except MidusError as exc:
            return f"verify failed: {one_line(exc, 240, whole=True)}", ""
    except Exception as exc:  # noqa: BLE001 - any other exception is a bug of the tool: shown, not hidden
        return f"CRASH: {one_line(exc, 200, whole=True)} (in {stage}, at {_where(exc)})", ""
    failed = [c for c in checks if not c.ok]
    if failed:
        shared = " [the base fails this check too]" if failed[0].name in (base_failures or {}) else ""
        return f"verify failed: {failed[0].name}: {' '.join(failed[0].detail.split())[:200]}{shared}", ""
    remove_own_directory(out)
    recipe.unlink(missing_ok=True)
    return "ok", ""


def run_type(model_type: str, work: Path, emit_line=None) -> tuple[dict[str, str], dict]:
    """Build ``model_type`` and try every kind on it, in this process: (outcome per kind, info)."""
    emit_line = emit_line or (lambda *a: None)
    base = work / model_type
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = build_base(model_type, base)
    except Exception as exc:  # noqa: BLE001 - a config this script cannot build is reported, not fatal
        message = str(exc) if isinstance(exc, BuildError) else one_line(exc, whole=True)
        outcome = f"build: {' '.join(message.replace(str(work), '.').split())[:240]}"
        info = {"total_s": round(time.perf_counter() - start, 1)}
        emit_line("info", info)
        for kind in KINDS:
            emit_line(kind, outcome)
        return dict.fromkeys(KINDS, outcome), info
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base_failures = base_checks(base)
    info["base_verify_s"] = round(time.perf_counter() - t0, 1)
    if base_failures:
        info["base_fails"] = {k: v.replace(f"{work}/", "") for k, v in base_failures.items()}
    emit_line("info", info)
    outcomes = {}
    for kind in KINDS:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcomes[kind] = try_kind(base, kind, work, base_failures)
        info[f"{kind}_s"] = round(time.perf_counter() - t0, 1)
        emit_line(kind, outcomes[kind])
    info["total_s"] = round(time.perf_counter() - start, 1)
    emit_line("info", info)
    if all(v == "ok" for v in outcomes.values()):
        remove_own_directory(base)  # kept only where something is to be looked at
    return outcomes, info


def _child_main(model_type: str, work: Path, threads: int | None) -> int:
    import torch

    import midus_surgery  # noqa: F401 - registers the MIDUS classes

    if threads:
        torch.set_num_threads(threads)

    def emit_line(key, value):
        print(RESULT_TAG + json.dumps({key: value}), flush=True)

    run_type(model_type, work, emit_line)
    return 0


def _limit_memory(gb: float):
    def apply():
        import resource

        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.setsid()  # its own process group: a timeout kills the child and whatever it started

    return apply


def run_child(model_type: str, work: Path, *, timeout: float = TIMEOUT_S, memory_gb: float | None = MEMORY_GB,
              threads: int | None = 1, argv: list[str] | None = None) -> tuple[dict[str, str], dict]:
    """Run one model type in a child process of this script; a crash or a timeout becomes its outcome."""
    import signal

    cmd = argv or [sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, model_type, "--out", str(work)]
    env = dict(os.environ)
    if threads and not argv:
        cmd += ["--threads", str(threads)]
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_limit_memory(memory_gb) if memory_gb else os.setsid, cwd=str(ROOT))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        failure = None if proc.returncode == 0 else _death(proc.returncode, stderr)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        failure = f"timeout: over {timeout:.0f} s"
    outcomes: dict[str, str] = {}
    info: dict = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            (key, value), = json.loads(line[len(RESULT_TAG):]).items()
            if key == "info":
                info.update(value)
            else:
                outcomes[key] = value
    if failure is not None or len(outcomes) < len(KINDS):
        failure = failure or _death(proc.returncode, stderr) or "crash: the child ended without a result"
        for kind in KINDS:
            outcomes.setdefault(kind, failure)
    info.setdefault("total_s", round(time.perf_counter() - start, 1))
    return {k: outcomes[k] for k in KINDS}, info


def _death(returncode: int, stderr: str) -> str:
    import signal

    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip() and not line.startswith("[transformers]")]
    last = lines[-1][:200] if lines else ""
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        return f"crash: killed by {name}" + (" (memory cap?)" if name == "SIGKILL" else "") + (f"; {last}" if last else "")
    if returncode == 0:
        return ""
    return f"crash: exit code {returncode}" + (f"; {last}" if last else "")


def sweep(model_types: list[str], work: Path, log, *, isolate: bool = True, jobs: int = 1, timeout: float = TIMEOUT_S,
          memory_gb: float | None = MEMORY_GB, info: dict | None = None) -> dict[str, dict[str, str]]:
    """Outcome per kind for each model type (in the given order); ``info`` receives timings and sizes."""
    work = use_workspace(work)  # a new folder or the sweep's own: what it builds inside is removed on a rerun
    info = {} if info is None else info
    results: dict[str, dict[str, str]] = {}

    def one(model_type: str):
        if isolate:  # one torch thread: tiny matmuls are 10x slower with two threads on a busy 2-core machine
            outcomes, meta = run_child(model_type, work, timeout=timeout, memory_gb=memory_gb, threads=1)
        else:
            import midus_surgery  # noqa: F401 - registers the MIDUS classes

            outcomes, meta = run_type(model_type, work)
        results[model_type], info[model_type] = outcomes, meta
        size = f"[{meta['params'] / 1e6:.2f}M L{meta.get('layers')} lv{meta.get('level')}]" if "params" in meta else ""
        shown = (f"all: {outcomes['dus']}" if len(set(outcomes.values())) == 1 else "; ".join(f"{k}: {v}" for k, v in outcomes.items()))
        base = f" (base fails {', '.join(meta['base_fails'])})" if meta.get("base_fails") else ""
        log(f"{model_type:24s} {meta.get('total_s', 0):6.1f}s {size:18s} {shown}{base}")

    if jobs > 1:
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, model_types))
    else:
        for model_type in model_types:
            one(model_type)
    return {t: results[t] for t in model_types}


# --------------------------------------------------------------------------------------------
# Report


CLASSES = ("ok", "ok on other layers", "refused", "apply failed", "verify failed", "CRASH", "crash", "timeout", "build")
_GROUP_ORDER = ("CRASH", "crash", "timeout", "verify failed", "apply failed", "build", "refused", "ok on other layers", "ok")  # bugs first


def outcome_class(outcome: str) -> str:
    for name in CLASSES[1:]:
        if outcome.startswith(name + ":"):
            return name
    return "ok" if outcome == "ok" else "CRASH"


def counts(results: dict[str, dict[str, str]]) -> dict[str, dict[str, int]]:
    """kind -> outcome class -> number of model types."""
    table = {kind: dict.fromkeys(CLASSES, 0) for kind in KINDS}
    for outcomes in results.values():
        for kind in KINDS:
            table[kind][outcome_class(outcomes.get(kind, "crash: no result"))] += 1
    return table


def _cell(text: str) -> str:
    """A table cell: no column break, and no accidental markdown link ("[...](...)") in a message."""
    return text.replace("|", "\\|").replace("\n", " ").replace("](", "]\\(")


# Why a model type is not built (shown under the table when the sweep reports it as `build`).
BUILD_NOTES = {
    "blt": "BLT's forward builds its KV cache from the top-level BltConfig, which has no num_hidden_layers (transformers 5.24): "
           "the model does not run a forward pass with the cache on, whatever its size.",
    "gemma3n": "its vision tower is a TimmWrapperModel, which needs the timm package (not a dependency of this project); "
               "gemma3n_text, the same decoder alone, is swept.",
    "gemma4_assistant": "a drafter for speculative decoding: its forward needs the main model's KV states (shared_kv_states), "
                        "so it does not run on input ids alone.",
    "gemma4_unified_assistant": "as gemma4_assistant: a drafter that needs the main model's KV states.",
    "musicgen": "AutoModelForCausalLM maps the composite MusicgenConfig to MusicgenForCausalLM, which takes the decoder's "
                "config only: the class does not build from the config it is mapped from.",
    "musicgen_melody": "as musicgen.",
}


def _size(meta: dict | None) -> str:
    if not meta or "params" not in meta:
        return ""
    level = f", level {meta['level']}" if meta.get("level") else ""
    return f"{meta['params'] / 1e6:.2f}M, {meta.get('layers')} layers{level}"


def markdown(results: dict[str, dict[str, str]], meta: dict, info: dict | None = None) -> str:
    """The page: how it was run, counts per kind, one row per model type, outcomes other than ok grouped."""
    info = info or {}
    table = counts(results)
    shown = [c for c in CLASSES if any(table[k][c] for k in KINDS)] or ["ok"]
    first = LEVELS[0]
    lines = [
        "# Architectures",
        "",
        "<!-- generated by tools/arch_sweep.py --all; rerun it rather than editing this page -->",
        "",
        "What `apply` + `verify` do on a tiny random model of every causal-LM model type of the installed",
        "transformers (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), for three recipe kinds. This page is the sweep's",
        "output: rerun `python tools/arch_sweep.py --all` to refresh it.",
        "",
        f"- command: `{meta.get('command', 'python tools/arch_sweep.py --all')}`",
        f"- transformers {meta.get('transformers', '?')}, torch {meta.get('torch', '?')}, Python {meta.get('python', '?')}",
        f"- date: {meta.get('date', '?')}; machine: {meta.get('machine', '?')}",
        f"- {len(results)} model types, each in its own process (one torch thread, {TIMEOUT_S} s limit); "
        f"wall time {meta.get('wall_s', 0) / 60:.0f} min",
        *(f"- rerun afterwards with later code (`{r['command']}`, {r['date']}): {', '.join(r['types'])}"
          for r in meta.get("rerun", [])),
        "",
        "Each kind's recipe interleaves one new block after every "
        f"{AFTER_EVERY} layers of the base (`layout: {{interleave: {{after_every: {AFTER_EVERY}, kind: KIND}}}}`):",
        "",
        "| kind | recipe |",
        "|---|---|",
        *(f"| {kind} | `kind: {KINDS[kind]}`" + (" + `memory: {n_subkeys: 8, topk: 4, latent_dim: 8}`" if kind == "midus" else "")
          + " |" for kind in KINDS),
        "",
        "The tiny models: the type's default config (`AutoConfig.for_model`) with every width-like size shrunk, found by",
        f"the attribute's name (hidden {first.hidden}, {first.heads} heads, head dim {first.head}, FFN {first.ffn}, "
        f"{first.experts} experts with {first.experts_per_tok} per token,",
        f"vocabulary {first.vocab}, LoRA ranks {first.rank}, SSM states {first.state}; vision and audio towers "
        f"{first.tower_layers} layers) and {', '.join(map(str, LAYER_CHOICES[:-1]))} or {LAYER_CHOICES[-1]} decoder layers,",
        "the fewest that keep every kind of layer of the default pattern (per-layer lists regenerated by the config",
        "or cut to the new length). Where the config or the model refuses, less shrinking is tried (the size column",
        "names the level when it is not the first). Overridden by hand, each for a stated reason in",
        f"`tools/arch_sweep.py`: {', '.join(sorted(set(OVERRIDES) | set(TINY_OVERRIDES)))}.",
        "",
        "Outcomes: **ok** (applied, every `verify` check passed); **ok on other layers** (the every-N layout reached layers",
        "of a kind that cannot make these blocks, a hybrid's convolution or state-space layers, and was refused naming the",
        "layers that can; inserting after the first two of those applied and passed every check); **refused** (`validate` refused the recipe,",
        "its message shown); **apply failed** / **verify failed** (a bug: the recipe was accepted; "
        "\"the base fails this check too\" marks a check",
        "the tiny base itself fails); **CRASH** (an exception other than the tool's own errors: a bug);",
        "**crash** / **timeout** (the child process died or ran past its limit); **build** (this script could",
        "not build the architecture at tiny size; why, below).",
        "",
        "## Counts",
        "",
        "| kind | " + " | ".join(shown) + " |",
        "|---|" + "---:|" * len(shown),
        *(f"| {kind} | " + " | ".join(str(table[kind][c]) for c in shown) + " |" for kind in KINDS),
        "",
        "## Per model type",
        "",
        "| model type | tiny model | " + " | ".join(KINDS) + " |",
        "|---|---|" + "---|" * len(KINDS),
    ]
    for model_type in sorted(results):
        outcomes = results[model_type]
        values = [outcomes.get(kind, "") for kind in KINDS]
        size = _size(info.get(model_type))
        if len(set(values)) == 1 and outcome_class(values[0]) in ("build", "crash", "timeout"):
            lines.append(f"| {model_type} | {size} | {_cell(values[0])} | | |")
        elif len(set(values)) == 1 and values[0] != "ok":
            lines.append(f"| {model_type} | {size} | {_cell(values[0])} | (same) | (same) |")
        else:
            lines.append(f"| {model_type} | {size} | " + " | ".join(_cell(v) for v in values) + " |")
    not_built = [t for t in sorted(results) if all(outcome_class(v) == "build" for v in results[t].values())]
    if not_built:
        lines += ["", "## Not built", ""]
        lines += [f"- **{t}**: {BUILD_NOTES.get(t, 'see its row.')}" for t in not_built]
    groups: dict[str, dict[str, list[str]]] = {}
    for model_type in sorted(results):
        for kind in KINDS:
            outcome = results[model_type].get(kind, "")
            if outcome_class(outcome) != "ok":
                groups.setdefault(outcome, {}).setdefault(model_type, []).append(kind)
    base_fails: dict[str, list[str]] = {}
    for model_type in sorted(info):
        for check in (info[model_type] or {}).get("base_fails", {}):
            base_fails.setdefault(check, []).append(model_type)
    if base_fails:
        lines += ["", "## Checks the tiny base itself fails", "",
                  "`verify` run on the base as `save_pretrained` wrote it, before any surgery (a failure after apply",
                  "that the base shares is marked in its row). Details in the run's `results.json`.", "",
                  "| check | model types |", "|---|---|"]
        lines += [f"| {check} | {', '.join(types)} |" for check, types in sorted(base_fails.items())]
    if groups:
        lines += ["", "## Outcomes other than ok, grouped", "", "| outcome | model types (kinds, when not all three) |", "|---|---|"]
        for outcome in sorted(groups, key=lambda o: (_GROUP_ORDER.index(outcome_class(o)), o)):
            cell = ", ".join(t if len(ks) == len(KINDS) else f"{t} ({', '.join(ks)})" for t, ks in groups[outcome].items())
            lines.append(f"| {_cell(outcome)} | {cell} |")
    return "\n".join(lines) + "\n"


def write_doc(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def merge_rerun(earlier: dict, rerun: dict, model_types: list[str]) -> dict:
    """An earlier whole run's saved results with ``model_types``' rows (outcomes and info) replaced by ``rerun``'s, the
    counts recomputed, and the rerun recorded in its meta (the page lists it under the command)."""
    results = {**earlier["results"], **{t: rerun["results"][t] for t in model_types}}
    info = {**earlier.get("info", {}), **{t: rerun["info"][t] for t in model_types if t in rerun.get("info", {})}}
    meta = {**earlier["meta"], "rerun": [*earlier["meta"].get("rerun", []), {"command": rerun["meta"]["command"], "date": rerun["meta"]["date"],
                                                                             "types": list(model_types)}]}
    return {"meta": meta, "counts": counts(results), "results": results, "info": info}


def run_meta(argv: list[str]) -> dict:
    import torch
    import transformers

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"command": " ".join(["python tools/arch_sweep.py", *argv]), "transformers": transformers.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "machine": f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [CHILD_FLAG]:
        ap = argparse.ArgumentParser()
        ap.add_argument("model_type")
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--threads", type=int)
        args = ap.parse_args(argv[1:])
        return _child_main(args.model_type, args.out, args.threads)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_types", nargs="*", help=f"model types (default: {len(DEFAULT_TYPES)} representative ones)")
    ap.add_argument("--all", action="store_true", help="every causal-LM model type of the installed transformers")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the tiny bases and recipes go")
    ap.add_argument("--doc", type=Path, help=f"write the markdown table here (default with --all: {DEFAULT_DOC.relative_to(ROOT)})")
    ap.add_argument("--jobs", type=int, default=1, help="model types run at once (default 1)")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds per model type (default {TIMEOUT_S})")
    ap.add_argument("--memory-gb", type=float, default=MEMORY_GB, help=f"address-space cap per child (default {MEMORY_GB}; 0: none)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    ap.add_argument("--from-json", type=Path, help="write --doc from the results.json of an earlier run instead of running")
    ap.add_argument("--merge-into", type=Path, help="the results.json of an earlier whole run: the given types' rows are replaced "
                                                     "by this run's, the counts recomputed, the rerun recorded, and --doc written "
                                                     "from the merged results")
    args = ap.parse_args(argv)
    if args.merge_into and (args.all or not args.model_types):
        ap.error("--merge-into reruns the model types named on the command line into an earlier run's results")
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        write_doc(args.doc or DEFAULT_DOC, markdown(saved["results"], saved["meta"], saved.get("info")))
        print(f"table written to {args.doc or DEFAULT_DOC}")
        return 0
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    model_types = all_model_types() if args.all else (args.model_types or list(DEFAULT_TYPES))
    doc = args.doc or (DEFAULT_DOC if args.all else None)
    start = time.perf_counter()
    info: dict = {}
    results = sweep(model_types, args.out, log, jobs=max(1, args.jobs), timeout=args.timeout, memory_gb=args.memory_gb or None, info=info)
    table = counts(results)
    meta = run_meta(argv) | {"wall_s": time.perf_counter() - start}
    saved = {"meta": meta, "counts": table, "results": results, "info": info}
    write_doc(args.out / "results.json", json.dumps(saved, indent=1, sort_keys=True) + "\n")  # outcomes, sizes, timings, base checks
    if args.merge_into:
        merged = merge_rerun(json.loads(args.merge_into.read_text()), saved, model_types)
        write_doc(args.merge_into, json.dumps(merged, indent=1, sort_keys=True) + "\n")
        table, results, meta, info = merged["counts"], merged["results"], merged["meta"], merged["info"]
    if doc is not None:
        write_doc(doc, markdown(results, meta, info))
    if args.json:
        print(json.dumps({"results": results, "counts": table, "info": info}, indent=2))
    else:
        print()
        for kind in KINDS:
            print(f"{kind:10s} " + ", ".join(f"{c}: {n}" for c, n in table[kind].items() if n))
        if doc is not None:
            print(f"table written to {doc}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OutputError as exc:  # a --out folder the tool did not make: one line, as the CLI says it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
