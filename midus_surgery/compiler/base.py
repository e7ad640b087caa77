"""Find the base model a recipe names and read its config (never its weights)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from pathlib import Path

from midus_surgery.errors import BaseModelError, RecipeError, not_utf8_path, one_line, printable, shown
from midus_surgery.io.small_files import file_kind
from midus_surgery.io.tensor_source import BaseRef
from midus_surgery.recipe.schema import MAX_BASE_LAYERS, MAX_OUTPUT_LAYERS, LoadedRecipe, cwd_relative_hint

MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few KB (a few MB with big label maps)


def _is_file(loaded: LoadedRecipe, key: str, path: Path) -> bool:
    """``path.is_file()``, with a path the OS refuses (a component over 255 bytes...) a located problem."""
    try:
        return path.is_file()
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RecipeError([loaded.problem(("base", key), f"cannot use this path: {why}")]) from None


@contextlib.contextmanager
def located_at_base_path(loaded: LoadedRecipe):
    """A problem with the base's files (BaseModelError) said where the recipe names the base, as every problem
    validate finds is said (trial77 F4: a base file linking outside the folder was the one line without a place)."""
    try:
        yield
    except BaseModelError as exc:
        raise RecipeError([loaded.problem(("base", "path"), str(exc))]) from None


def resolve_base(loaded: LoadedRecipe) -> BaseRef:
    spec = loaded.recipe.base
    path = loaded.resolve(spec.path)
    if path.suffix.lower() == ".gguf":
        return BaseRef(path.parent, path.name, _is_file(loaded, "path", path))
    if spec.gguf_file:
        return BaseRef(path, spec.gguf_file, _is_file(loaded, "gguf_file", path / spec.gguf_file))
    return BaseRef(path, None, _is_file(loaded, "path", path / "config.json"))


def _special_float(obj: dict):
    """json object_hook: ``{"__float__": "Infinity"}`` (how transformers 5 writes inf/nan) -> the float."""
    if len(obj) == 1 and isinstance(obj.get("__float__"), str):
        return {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}.get(obj["__float__"], obj)
    return obj


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_config_json(path: Path) -> dict:
    """A config.json as a dict, as transformers reads it (special floats included); ValueError says what is wrong."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # not there, or not reachable: open says which
        mode = None
    if mode is not None and not stat.S_ISREG(mode):  # a named pipe blocked validate, plan and apply in open() forever (trial138 F1)
        raise ValueError(f"{printable(str(path))} is {file_kind(mode)}, not a config.json file")
    with open(path, "rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; a config.json is a few KB")
    try:
        # decoded as transformers opens it (UTF-8): json.loads of the bytes would also take UTF-16 and
        # UTF-32, which transformers then refuses (trial45: validated and applied, verify failed)
        data = json.loads(raw.decode("utf-8"), object_hook=_special_float)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text, which transformers reads a config.json as ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a config") from None
    except (ValueError, UnicodeDecodeError) as exc:  # e.g. an integer of more than 4300 digits, bytes not UTF-8
        raise ValueError(f"{path} cannot be read: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {_JSON_TYPES.get(type(data), type(data).__name__)}, not an object with model_type and the sizes")
    return data


# The names a config.json gives its number of decoder layers (transformers' and its attribute_maps' aliases).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
# Config keys with a physical meaning (transformers' names and the aliases its attribute_maps use),
# each with its largest sane value. Checked on the raw JSON before transformers builds anything.
_SIZES = {
    LAYER_COUNT_KEYS: MAX_BASE_LAYERS,
    ("hidden_size", "n_embd", "d_model"): 2**20,
    ("num_attention_heads", "n_head", "n_heads", "num_heads"): 2**14,
    ("num_key_value_heads", "n_kv_heads", "num_kv_heads"): 2**14,
    ("head_dim",): 2**16,
    ("intermediate_size", "n_inner", "ffn_dim"): 2**22,
    ("vocab_size",): 2**24,
    ("max_position_embeddings", "n_positions"): 2**30,
    ("sliding_window",): 2**30,
}
# 0 experts is a dense model (Granite 4.0's dense configs: num_local_experts 0, num_experts_per_tok 0: the pair is checked
# in _experts_problems); no window, a full one
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# experts per token, by the names configs give it (Ernie 4.5's moe_k, Aria's and Hunyuan's moe_topk, Kimi's num_experts_per_token)
_PER_TOKEN = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk")
# every name of both gets the size check: moe_k -1 was judged by nothing, validated, and applied into an output whose
# forward pass fails (trial114)
_SIZES.update({_EXPERT_COUNTS: 2**16, _PER_TOKEN: 2**16})
_MAY_BE_ZERO = {"sliding_window", *_EXPERT_COUNTS, *_PER_TOKEN}
# some configs list these per layer (HunYuan-MoE's moe_topk: trial71). Not an expert count: HunYuan-V1-MoE's gate reads
# num_experts[layer_idx] for a list, but its config class refuses a list (a strict int field) and its experts are built
# from the one count, and no other transformers 5 config takes a list there (trial121 F4)
_PER_LAYER_OK = {"intermediate_size", "n_inner", "ffn_dim", "num_key_value_heads", "moe_topk"}
_REQUIRED = ("num_hidden_layers", "hidden_size", "vocab_size")  # heads too when the config has them (state-space models have none)


def _count_problem(key: str, value, limit: int) -> str | None:
    values = value if isinstance(value, list) and key in _PER_LAYER_OK else [value]
    for v in values:
        if v is None:
            continue
        if isinstance(v, list) and key in _EXPERT_COUNTS:  # said, as moe_topk's list is taken: transformers takes none
            return (f"{key} must be one whole number for every layer, got {_short(v)}: transformers' config classes take "
                    "no per-layer list of it")
        if isinstance(v, bool) or not isinstance(v, int):
            return f"{key} must be a whole number, got {_short(v)}"
        low = 0 if key in _MAY_BE_ZERO else 1
        if not low <= v <= limit:
            return f"{key} is {v}; it must be between {low} and {limit}"
    return None


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def config_size_problems(data: dict, max_layers: int = MAX_BASE_LAYERS) -> list[str]:
    """The sizes of a raw config dict that are of the wrong type, zero or absurd (layers, widths, heads, vocabulary).
    Needs neither torch nor transformers, so the header planner can check them too."""
    problems = []
    for keys, limit in _SIZES.items():
        limit = max_layers if keys is LAYER_COUNT_KEYS else limit
        for key in keys:
            if key in data:
                problem = _count_problem(key, data[key], limit)
                if problem:
                    problems.append(problem)
    if not problems:
        problems += _experts_problems(data)
    return problems


def _experts_problems(data: dict) -> list[str]:
    """What is wrong with a config's experts per token against its expert counts, at most one line. Every count key is read:
    a decoy num_experts: 0 beside DeepSeek-V3's n_routed_experts hid a per-token 0 (trial104).
    Refused: no expert per token beside experts (every MoE block outputs zero: a silently wrong model), and more per token
    than 2 or more experts (topk fails). Not judged: 0 experts, or 1 (Jamba builds a plain MLP there, beside the per-token
    default 2 that save_pretrained writes; Qwen2/3-MoE, Qwen3-Next and GraniteMoeHybrid are dense at 0, and DeepSeek-V3 with
    every layer dense): a class that fails there fails its forward pass, an error the commands report (trial111)."""
    for name, per_token in _per_token_counts(data):  # Ernie 4.5's moe_k 0 beside 8 experts passed (trial113)
        for key, count in _ints(data, _EXPERT_COUNTS):
            if per_token == 0 and count > 0:  # every MoE block would output zero
                return [f"{name} is 0 with {key} {count}: each token would use no expert; set it to between 1 and {count}"]
            if per_token > count >= 2:  # torch.topk fails in the first forward pass
                return [f"{name} is {per_token}, more than {key} {count}: a token cannot use more experts than there are; "
                        f"set it to between 1 and {count}"]
    return []


def _per_token_counts(data: dict) -> list[tuple[str, int]]:
    """(how to name it, experts per token) for each plain number and each entry of a per-layer list (HunYuan's moe_topk):
    an entry is judged as the plain number is, as the layer it configures fails or outputs zero alike."""
    found = _ints(data, _PER_TOKEN)
    for key in _PER_LAYER_OK.intersection(_PER_TOKEN):
        if isinstance(data.get(key), list):
            found += [(f"an entry of {key}", v) for v in data[key] if isinstance(v, int) and not isinstance(v, bool)]
    return found


def _ints(data: dict, keys) -> list[tuple[str, int]]:
    return [(key, data[key]) for key in keys if isinstance(data.get(key), int) and not isinstance(data.get(key), bool)]


def no_experts_problem(data: dict, tensors) -> str | None:
    """Experts per token beside 0 experts, where the model's class builds its MoE blocks over no experts (a router or
    expert weights with no elements, among ``tensors``, the plan's): its first forward pass fails (Mixtral's topk).
    The config alone cannot tell: Qwen2/3-MoE, Qwen3-Next and GraniteMoeHybrid build a plain MLP at 0 experts beside the
    per-token default save_pretrained writes, and run (trial104, trial111); no transformers default config has 0
    experts beside experts per token."""
    per_token = [(name, n) for name, n in _ints(data, _PER_TOKEN) if n >= 1]
    zero = [key for key, count in _ints(data, _EXPERT_COUNTS) if count == 0]
    empty = next((t for t in tensors if 0 in t.shape), None) if per_token and zero else None
    if empty is None:
        return None
    (name, n), key = per_token[0], zero[0]
    return (f"{name} is {n} with {key} 0: {printable(str(data.get('model_type')))[:40]} then builds its MoE blocks over no experts "
            f"({shown(empty.name, 80)} has shape {tuple(empty.shape)}), and its forward pass fails; set {key} to the number of experts")


def config_number_problems(data: dict) -> list[str]:
    """What is wrong with the sizes of a base config's raw dict (wrong types, zero or absurd values, unknown rope types)."""
    problems = config_size_problems(data)
    for key in ("rope_scaling", "rope_parameters"):
        problems += _rope_problems(key, data.get(key))
    problems += config_math_problems(data)
    for key in ("dtype", "torch_dtype"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) and re.fullmatch(r"(torch\.)?[a-z]+[0-9_a-z]*", value)):
            problems.append(f"{key} must be a dtype name such as \"bfloat16\", got {_short(value)}")
    return problems


def model_config_problems(data: dict) -> list[str]:
    """What is wrong with the numbers of a model folder's config.json (a base, an output, a trained export) that eval,
    train, verify and analyze open: checked before the model is built on the meta device, which takes minutes and
    gigabytes for 10^5 layers whatever the weights hold (trial99 C3). An up-scaled output may have up to
    MAX_OUTPUT_LAYERS layers. Rope types are left to transformers: a load converts some that validate does not know."""
    problems = config_size_problems(data, MAX_OUTPUT_LAYERS) + config_math_problems(data)
    text = data.get("text_config")  # a composite model's language model, built at its own depth
    if isinstance(text, dict):
        problems += [f"text_config.{problem}" for problem in config_size_problems(text, MAX_OUTPUT_LAYERS)]
    return problems


# Values the model's arithmetic needs in range: outside it every logit is NaN or inf (trial41: these
# validated OK, or were blamed on index-dependent layers or a missing attention module).
_POSITIVE = ("rope_theta", "rope_local_base_freq")  # RoPE bases: a power of one <= 0 is 0, inf or NaN
_NON_NEGATIVE = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon")  # added to a variance
_ROPE_FACTORS = ("factor",)  # a rope scaling factor divides the frequencies


def _rope_sections(data: dict):
    """(key prefix, object) for the config itself and each RoPE object in it (per layer type too)."""
    yield "", data
    for key in ("rope_scaling", "rope_parameters"):
        value = data.get(key)
        if not isinstance(value, dict):
            continue
        per_type = bool(value) and all(isinstance(v, dict) for v in value.values())  # full_attention: {...}, ...
        for name, section in (value.items() if per_type else [("", value)]):
            yield f"{key}.{name + '.' if name else ''}", section


def config_math_problems(data: dict) -> list[str]:
    """Config values no model computes finite logits with; and attention heads that do not share out over
    the key/value heads (transformers' grouped attention cannot run them)."""
    problems = []
    # transformers 5 reads rope_parameters' rope_theta where it has one: a top-level one is then unused
    shadowed = any(where.startswith("rope_parameters.") and "rope_theta" in section for where, section in _rope_sections(data))
    for where, section in _rope_sections(data):
        for key in _POSITIVE + (_ROPE_FACTORS if where else ()):
            if not where and key == "rope_theta" and shadowed:
                continue
            value = section.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                problems.append(f"{where}{key} is {_short(value)}; it must be a number above 0")
    for key in _NON_NEGATIVE:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
            problems.append(f"{key} is {_short(value)}; it must be a number, 0 or above")
    heads, kv = data.get("num_attention_heads"), data.get("num_key_value_heads")
    if all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (heads, kv)) and heads % kv:
        problems.append(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv}): the query heads cannot "
                        "share the key/value heads out evenly")
    return problems


def _gguf_config(data, unused: dict):
    """The config AutoConfig.from_pretrained builds of a GGUF's config dict (its own steps for a known model
    type), without reading the file again (seconds for a large vocabulary); None where it would do more."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(data, dict) or "auto_map" in data or data.get("model_type") not in CONFIG_MAPPING or "layer_types" in data:
        return None
    return CONFIG_MAPPING[data["model_type"]].from_dict(data, **unused)


def _from_metadata(problem: str, keys: dict[str, str]) -> str:
    """Where in a GGUF's metadata the config keys a problem names come from: " (its metadata's llama.rope.freq_base)"."""
    named = sorted((m.start(), keys[k]) for k in keys if (m := re.search(rf"\b{re.escape(k)}\b", problem)))
    return f" (its metadata's {' and '.join(dict.fromkeys(key for _, key in named))})" if named else ""


def _rope_problems(key: str, value) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{key} must be an object, got {_short(value)}"]
    if value and all(isinstance(v, dict) for v in value.values()) and not ({"rope_type", "type"} & set(value)):
        return [p for v in value.values() for p in _rope_problems(key, v)]  # per layer type (full_attention: {...}, ...)
    kind = value.get("rope_type", value.get("type", "default"))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    known = ["default", *ROPE_INIT_FUNCTIONS]
    if kind not in known:
        return [f"{key} has an unknown rope_type {_short(kind)} (transformers knows {', '.join(known)})"]
    return []


def _attr(config, key: str):
    """``config.<key>``, or its dict's value where transformers refuses a global read of a per-layer
    attribute (Gemma-4's head_dim: the per-layer values are checked where they are used)."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError
        return config.to_dict().get(key)


def config_object_problems(config) -> list[str]:
    """What is wrong with a built config's sizes (after transformers' aliases and defaults)."""
    problems = []
    for key in _REQUIRED:
        value = _attr(config, key)
        limit = next(limit for keys, limit in _SIZES.items() if key in keys)
        problem = _count_problem(key, value, limit) if value is not None else f"the config has no {key}"
        if problem:
            problems.append(problem)
    if problems:
        text = getattr(config, "text_config", None)  # a vision-language (or other composite) model's language model
        if text is not None and _attr(text, "num_hidden_layers") is not None and _attr(config, "num_hidden_layers") is None:
            return [f"a {getattr(config, 'model_type', 'composite')} config: its decoder layers are those of its language model "
                    f"(text_config, a {getattr(text, 'model_type', '?')} of {text.num_hidden_layers} layers), and midus-surgery "
                    "up-scales causal language models: use a checkpoint of the language model alone"]
        return problems
    heads = _attr(config, "num_attention_heads")
    if heads is not None:
        limit = next(limit for keys, limit in _SIZES.items() if "num_attention_heads" in keys)
        problem = _count_problem("num_attention_heads", heads, limit)
        if problem:
            return [problem]
    head_dim = _attr(config, "head_dim")
    if heads is None:
        pass  # no attention: nothing to check of its heads
    elif head_dim is None and isinstance(heads, int) and config.hidden_size // heads < 1:
        problems.append(f"num_attention_heads ({config.num_attention_heads}) is larger than hidden_size ({config.hidden_size}): heads would have no width")
    elif head_dim is not None:
        problem = _count_problem("head_dim", head_dim, 2**16)
        if problem:
            problems.append(problem)
    layer_types = _attr(config, "layer_types")
    if isinstance(layer_types, (list, tuple)) and len(layer_types) != config.num_hidden_layers:
        problems.append(f"layer_types has {len(layer_types)} entries for {config.num_hidden_layers} layers")
    return problems


def _config_from_dict(data: dict, where: str, trust_remote_code: bool):
    from transformers import AutoConfig

    model_type = data.get("model_type")
    if not model_type:
        raise ValueError(f"{where} has no model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{where}: model_type is {type(model_type).__name__} {str(model_type)[:60]}, not a name (\"llama\")")
    if model_type == "midus":  # its blocks are not the base architecture's: no anatomy, no replica
        raise ValueError(f"{where} is a MIDUS output (model_type 'midus'); up-scaling one again is not supported: apply one recipe "
                         "with every block you want to the original base")
    if "auto_map" in data and not trust_remote_code:
        # Custom code would be needed to build this architecture; never run it unasked.
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from midus_surgery.compiler.custom_code import building_code, refusal

        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"{where}: model_type {model_type!r} needs its own code (auto_map); set base.trust_remote_code: true to allow it")
        if building_code(data):  # a known type, but the stock class would silently build another model
            raise ValueError(refusal(where, building_code(data)))
    from midus_surgery.compiler.custom_code import hub_kernel

    kernel = hub_kernel(data)
    if kernel and not trust_remote_code:  # the kernels library downloads compiled code for it and runs it (trial73 F9e)
        raise ValueError(f"{where}: {kernel[0]} {kernel[1]!r} names a kernel on the Hugging Face Hub, code that is downloaded and run; "
                         f"midus-surgery runs it only when allowed: set base.trust_remote_code: true, or {kernel[0]} to sdpa or eager")
    if trust_remote_code and "auto_map" in data:
        from midus_surgery.compiler.custom_code import config_with_custom_code

        return config_with_custom_code(data, Path(where).parent, where)
    fields = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
    unknown = unknown_model_type(model_type)
    if unknown:
        raise ValueError(f"{where}: {unknown}")
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as exc:
        raise ValueError(f"{where}: transformers does not accept this config: {one_line(exc, 400, whole=True)}") from None


def unknown_model_type(model_type) -> str | None:
    """Why transformers cannot build ``model_type`` (None when it can): its own message lists every type it
    knows, thousands of characters on one line; this names the nearest ones."""
    import difflib

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        return None
    near = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
    hint = f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""
    return f"transformers {transformers.__version__} does not know model_type {model_type!r}{hint}; a newer transformers may know it"


# What base.config must agree on with the base's own config.json when both are there: the shape of
# the model (a config written for another size or family would plan the wrong model).
SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")


def check_stated_config(loaded: LoadedRecipe, found: dict, found_path: Path) -> None:
    """``base.config`` is for planning without the weights; when the weights are there their own
    config.json is used, and a ``base.config`` that describes another model is an error, not ignored."""
    stated_path = loaded.resolve(loaded.recipe.base.config)
    try:
        stated = read_config_json(stated_path)
    except (ValueError, OSError) as exc:
        raise RecipeError([loaded.problem(("base", "config"), str(exc))]) from None
    differ = [f"{k}: {stated.get(k)!r} here, {found.get(k)!r} in {found_path}" for k in SHAPE_KEYS if stated.get(k) != found.get(k)]
    if differ:
        raise RecipeError([loaded.problem(("base", "config"), f"{stated_path} does not describe the base model in base.path ({'; '.join(differ[:3])}); "
                                                              "fix it or remove base.config (the base's own config.json is used when it is there)")])


def load_base_config(loaded: LoadedRecipe):
    """The base model's ``PretrainedConfig``, from its directory, its GGUF, or ``base.config``.

    Every way the config can be wrong (unreadable, not a JSON object, sizes of the wrong type or
    absurd, an unknown rope type, refused by transformers) is a RecipeError located at the
    recipe's ``base`` key that names the config file."""
    spec = loaded.recipe.base
    ref = resolve_base(loaded)
    key = "path"
    if ref.exists and (not_utf8 := not_utf8_path(ref.directory)):  # its tokenizer.json read as broken, and an output no reader could open
        raise RecipeError([loaded.problem(("base", "path"), not_utf8)])
    try:
        if ref.exists and ref.is_gguf:
            from transformers import AutoConfig, PretrainedConfig

            from midus_surgery.io.hf_output import transformers_quiet
            from midus_surgery.io.tensor_source import gguf_config_keys, gguf_problem

            where = str(ref.directory / ref.gguf_file)
            at = ("base", "path" if spec.gguf_file is None else "gguf_file")
            problem = gguf_problem(ref.directory / ref.gguf_file)
            if problem:
                raise RecipeError([loaded.problem(at, problem)])
            # the config transformers derives from the metadata, checked as a config.json is (a GGUF's numbers are
            # as much the user's as a config.json's: transformers would build a model of them, or fail to load it)
            with transformers_quiet():
                data, unused = PretrainedConfig.get_config_dict(ref.directory, gguf_file=ref.gguf_file, name_or_path=ref.directory)
            numbers = config_number_problems(data) if isinstance(data, dict) else []
            if numbers:
                keys = gguf_config_keys(ref.directory / ref.gguf_file)
                raise RecipeError([loaded.problem(at, f"{where}: {problem}{_from_metadata(problem, keys)}") for problem in numbers])
            with transformers_quiet():
                config = _gguf_config(data, unused)
                if config is None:  # what the dict alone does not settle: transformers' own way, and its words
                    config = AutoConfig.from_pretrained(ref.directory, gguf_file=ref.gguf_file, trust_remote_code=spec.trust_remote_code)
        elif ref.exists or spec.config is not None:
            path = ref.directory / "config.json" if ref.exists else loaded.resolve(spec.config)
            if not ref.exists:
                key = "config"
                if not _is_file(loaded, "config", path) and not path.exists():  # one that is not a regular file: said by the read
                    raise RecipeError([loaded.problem(("base", "config"), f"config file not found: {printable(str(path))}")])
            data = read_config_json(path)
            if ref.exists and spec.config is not None:
                check_stated_config(loaded, data, path)
            numbers = config_number_problems(data)
            if numbers:
                raise RecipeError([loaded.problem(("base", key), f"{path}: {problem}") for problem in numbers])
            config, where = _config_from_dict(data, str(path), spec.trust_remote_code), str(path)
        else:
            config = None
        if config is not None:
            config.to_dict()  # what the planner and the anatomy tracer read first: fail here, located
    except RecipeError:
        raise
    except (ValueError, OSError) as exc:
        raise RecipeError([loaded.problem(("base", key), str(exc))]) from None
    except Exception as exc:  # noqa: BLE001 - transformers' config classes raise anything on odd values
        raise RecipeError([loaded.problem(("base", key), f"transformers cannot build a config from it: {one_line(exc, 300, whole=True)}")]) from None
    if config is not None:
        problems = config_object_problems(config)
        if problems:
            raise RecipeError([loaded.problem(("base", key), f"{where}: {problem}") for problem in problems])
        return config
    wanted = ref.directory / (ref.gguf_file or "config.json")
    at = ("base", "gguf_file" if ref.gguf_file is not None and ref.gguf_file == loaded.recipe.base.gguf_file else "path")
    if wanted.exists() and not wanted.is_file():  # a pipe would block the read, a device never ends
        raise RecipeError([loaded.problem(at, f"{printable(str(wanted))} is not a regular file (a pipe, a device or a folder)")])
    ggufs = sorted(p.name for p in ref.directory.glob("*.gguf")) if ref.gguf_file is None and ref.directory.is_dir() else []
    if ggufs:  # a folder of GGUF files: which one is the user's to say
        raise RecipeError([loaded.problem(("base", "path"), f"{printable(str(ref.directory))} has no config.json but holds GGUF weights ({', '.join(ggufs[:4])}): "
                                                            f"give the file, base.path: {ref.directory / ggufs[0]}, or set base.gguf_file: {ggufs[0]}")])
    if ref.gguf_file is None and ref.directory.is_file():
        raise RecipeError([loaded.problem(("base", "path"), f"{printable(str(ref.directory))} is a file: give the model's directory (config.json beside "
                                                            "the weights), or a .gguf file")])
    raise RecipeError([loaded.problem(at, f"base model not found: {printable(str(wanted))} (give base.config, a config.json, to validate and plan without the weights)"
                                                        f"{cwd_relative_hint(loaded.recipe.base.path, loaded.directory)}")])
