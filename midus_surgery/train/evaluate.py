"""Held-out perplexity of any causal LM directory transformers can load.

Perplexity is token-weighted: exp(sum of next-token NLL / number of predicted tokens).
- ``blocks``: the text is packed like training data (documents joined by EOS, cut into blocks
  of ``block_size``); every block predicts its tokens 2..block_size from the ones before,
  within the block.
- ``documents``: each document (plus its EOS) on its own, in non-overlapping windows of
  ``block_size``; no context crosses a document or window boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from midus_surgery.errors import (
    MidusError,
    UsageError,
    disk_problem,
    is_library_panic,
    load_error_line,
    not_utf8_path,
    one_line,
    printable,
    quiet_library_panic,
)
from midus_surgery.io.hf_output import hf_progress_bars, kept_load_report, load_report_words
from midus_surgery.io.json_text import loads_as_tokenizer_config, loads_as_transformers
from midus_surgery.io.output_dir import CHECKPOINT_STATE, data_folder, input_root, run_export_hint
from midus_surgery.io.small_files import read_small_text
from midus_surgery.io.stored_dtypes import floats_stored_as_integers, stored_dtype_problem
from midus_surgery.io.tensor_source import PICKLE_RISK, holds_only_pickle_weights, wrong_shapes
from midus_surgery.train.config import DIR_GLOB

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(MidusError):
    """A model directory does not load whole: a missing, unexpected or misshapen tensor, unreadable weights."""

    exit_code = 2


class ModelFailed(MidusError):
    """One of several models failed: its error in one line that names it, with that error's exit code. ``partial``:
    what the models before it scored, for the caller to print before the error (``eval --tasks``' result)."""

    def __init__(self, model, exc: MidusError, partial=None):
        text, shown = str(exc), printable(str(Path(model)))  # as the messages show it
        named = text.startswith(shown) or f" {shown}" in text or f"({shown}" in text
        super().__init__(text if named else f"{shown}: {text}")
        self.exit_code = exc.exit_code
        self.partial = partial


def out_of_memory(model, exc: BaseException, device, less: str = "a smaller --batch-size or --block-size") -> MidusError:
    """A model's load or evaluation that ran out of memory (``MemoryError``, torch's ``OutOfMemoryError``), as one line
    naming it, not a traceback; ``less``: the options that need less memory."""
    from midus_surgery.errors import MachineError

    return MachineError(f"{Path(model)}: out of memory on {device} ({one_line(exc, 200)}); {less}, or --dtype bfloat16, needs less")


def unforeseen(exc: BaseException) -> bool:
    """Whether ``exc`` is an error no check foresees (a RuntimeError inside a model's forward, a library's own error),
    not a MidusError, Ctrl-C, or what the CLI words itself (a full disk, a path it cannot write: OSError)."""
    symlink_loop = isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop from")  # pathlib's: the CLI words it
    return isinstance(exc, Exception) and not isinstance(exc, (MidusError, OSError)) and not disk_problem(exc) and not symlink_loop


def unforeseen_failure(model, exc: BaseException) -> MidusError:
    """``unforeseen`` ``exc``, from a model's load or evaluation, as one line naming the model, the exception and
    where it was raised, not a traceback (exit 1); under the results of the models before it, if any. "please
    report it" only when this package raised it: a model's own code or a library's error is theirs (trial61)."""
    import midus_surgery

    raised = raised_at(exc)
    ours = raised is not None and Path(raised[0]).is_relative_to(Path(midus_surgery.__file__).parent)
    where = f", raised at {raised[1]}" if raised else ""
    report = "; a bug in midus-surgery: please report it" if ours else ""
    return MidusError(f"{Path(model)}: the evaluation failed with an unexpected error ({one_line(exc, 300)}{where}){report}")


def raised_at(exc: BaseException) -> tuple[str, str] | None:
    """(the file, 'path:line' relative to the import root, transformers/models/...) where ``exc`` was raised, or None."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    raised = Path(frames[-1].filename)
    roots = sorted({Path(p) for p in sys.path if p and Path(p).is_absolute()}, key=lambda p: len(p.parts), reverse=True)
    short = next((raised.relative_to(root) for root in roots if raised.is_relative_to(root)), raised)
    return str(raised), f"{short}:{frames[-1].lineno}"


def _names(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


DEFAULT_EVAL_BLOCK = 512  # eval's tokens per block unless told (fewer when the model has fewer positions)
# Where configs state how many positions a model has (GPT-2 and its kind, most others, old GPT-style)
POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def position_limit(model) -> tuple[int, str] | None:
    """How many positions the model's config states, and under which key; None when it states none."""
    return config_position_limit(model.config)


def config_position_limit(config) -> tuple[int, str] | None:
    """``position_limit`` of a built config object (its class's aliases count, as for a model)."""
    config = config.get_text_config()
    for key in POSITION_KEYS:  # getattr, not the config's dict: a config class's attribute_map aliases count
        limit = getattr(config, key, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit, key
    return None


def context_problem(model, block_size: int) -> str | None:
    """Why blocks of ``block_size`` tokens do not fit the model's positions, or None. Learned
    position tables fail past their end (an index error deep in the forward); rotary models run
    but past the context they were trained on."""
    return positions_problem(position_limit(model), block_size)


def model_positions(path: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> tuple[int, str] | None:
    """``position_limit`` of the model at ``path`` from its config class, no weights read (the config ``load_causal_lm``
    builds it with: an alias such as RWKV's context_length counts, which config.json's keys as written miss)."""
    _, config, _, _ = _causal_lm_loader(Path(path), trust_remote_code=trust_remote_code, how_to_allow=ALLOW_CODE,
                                        allow_pickle=allow_pickle)
    return config_position_limit(config)


def stated_positions(config_json: dict) -> tuple[int, str] | None:
    """``position_limit`` from a config.json's contents, before any model is built (keys as written:
    an alias only the config class knows is found later, by ``context_problem``)."""
    text = config_json.get("text_config") if isinstance(config_json.get("text_config"), dict) else config_json
    for key in POSITION_KEYS:
        limit = text.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit, key
    return None


def positions_problem(stated: tuple[int, str] | None, block_size: int) -> str | None:
    if stated is None or block_size <= stated[0]:
        return None
    limit, key = stated
    return f"{block_size} tokens per block exceed the model's {limit} positions (config.json {key}); use at most {limit}"


ALLOW_CODE = "read that code, then pass --trust-remote-code"  # how eval's users allow it; train's config says it another way
ALLOW_PICKLE = "pass --allow-pickle"  # eval's and analyze's words; train's config says it another way


def check_model_dir(path: Path, *, trust_remote_code: bool = False, how_to_allow: str = ALLOW_CODE, allow_pickle: bool = False,
                    how_to_allow_pickle: str = ALLOW_PICKLE) -> Path:
    """``path`` as a model directory a command may load, checked before any slow work: it holds a
    config.json, and a model that is its own code (config.json's ``auto_map`` replaces the config or
    causal-LM class) only when the user allowed that code: transformers would otherwise build the
    stock class of its model_type in its place, and the scores would be another model's. MIDUS
    outputs map to the classes this package registers (the same code) and need no permission. Weights that are
    pickles alone are read only when allowed too (``allow_pickle``; transformers then reads them with
    weights_only=True), the rule apply holds a base to."""

    from midus_surgery.compiler.base import model_config_problems
    from midus_surgery.compiler.custom_code import building_code
    from midus_surgery.compiler.custom_code import hub_kernel as find_hub_kernel

    path = Path(path)
    # a folder name holding a newline split the one-line error into lines the name chose (trial99 M3)
    said = printable(str(path))
    if not path.is_dir():
        raise ModelLoadError(f"{said} is not a directory")
    if not_utf8 := not_utf8_path(path):
        raise ModelLoadError(not_utf8)
    if not (path / "config.json").is_file():
        if (path / CHECKPOINT_STATE).is_file():  # a run's checkpoint: its state, not a model to load
            raise ModelLoadError(f"{said} is a training checkpoint (resume state), not a model directory: use the run's export "
                                 "(export.dir, by default run_dir/final), or resume the run to export it")
        raise ModelLoadError(f"{said} is not a model directory (no config.json){run_export_hint(path)}")
    try:
        data = loads_as_transformers(read_small_text(path / "config.json"))  # bounded: a config.json is a few KB
        code = building_code(data) if isinstance(data, dict) and data.get("model_type") != "midus" else {}
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{said}: cannot read config.json ({one_line(exc, 300, whole=True)})") from None
    if not isinstance(data, dict):  # a list was blamed on the tokenizer, the first thing to read it (trial73 F9d)
        raise ModelLoadError(f"{said}/config.json holds a JSON {type(data).__name__}, not an object: not a model's config")
    broken = model_config_problems(data)
    broken += [problem] if isinstance(data, dict) and (problem := _midus_depth_problem(data)) else []
    if broken:  # said before the model is built: every logit NaN or inf, or minutes building 10^5 layers (trial99 C3)
        raise ModelLoadError(f"{said}/config.json: {broken[0]}")
    if not allow_pickle and holds_only_pickle_weights(path):
        raise ModelLoadError(f"{said} holds only pickle .bin weights; {PICKLE_RISK}: {how_to_allow_pickle} to read them "
                             "(with weights_only=True)")
    if trust_remote_code:
        return path
    hub_kernel = find_hub_kernel(data)
    if hub_kernel:  # transformers hands such a name to the kernels library, which downloads compiled code and runs it (trial73 F9e)
        raise ModelLoadError(f"{said}/config.json asks for {hub_kernel[0]} {hub_kernel[1]!r}, a kernel from the Hugging Face Hub: code that is "
                             f"downloaded and run; it runs only when allowed: {how_to_allow}, or set {hub_kernel[0]} to a built-in one "
                             "(sdpa, eager)")
    if code:
        names = ", ".join(f"{k} -> {v}" for k, v in sorted(code.items()))
        raise ModelLoadError(f"{said} is its own modeling code (config.json auto_map: {names[:200]}), "
                             f"{_without_the_code(data.get('model_type'))}; it runs only when allowed: {how_to_allow}")
    return path


def _midus_depth_problem(data: dict) -> str | None:
    """Why a MIDUS config.json's depth disagrees with its own layer map (the model would not build, or build other
    blocks than the map says: trial63 got transformers' "IndexError: index 5 is out of range"), or None."""
    midus = data.get("midus") if data.get("model_type") == "midus" else None
    layer_map = midus.get("layer_map") if isinstance(midus, dict) else None
    if not isinstance(layer_map, list):
        return None
    from midus_surgery.compiler.base import LAYER_COUNT_KEYS

    for key in LAYER_COUNT_KEYS:
        depth = data.get(key)
        if isinstance(depth, int) and not isinstance(depth, bool):
            if depth != len(layer_map):
                return (f"{key} is {depth}, but its layer map (midus.layer_map) lists {len(layer_map)} layers: "
                        "the config was changed since apply wrote it")
            break
    outside = [i for i in (midus.get("memory_layers") or []) if not (isinstance(i, int) and 0 <= i < len(layer_map))]
    if outside:
        return f"midus.memory_layers names layer(s) {outside[:5]} outside its layer map of {len(layer_map)} layers"
    return None


def _without_the_code(model_type) -> str:
    """What loading a model that is its own code would do without that code: build transformers' stock
    class of its model_type in its place, or fail when transformers has no such type."""
    from transformers import CONFIG_MAPPING

    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return f"which the stock {model_type!r} class would silently replace"
    shown = repr(model_type)[:60] if model_type is not None else "none"
    return f"which transformers cannot load without it (model_type {shown} is not one of transformers' own)"


_NOTED_CODE: set[tuple[str, object]] = set()  # (model directory, differing files or own tokenizer classes) already said in this process


def _causal_lm_loader(path: Path, *, trust_remote_code: bool, how_to_allow: str, allow_pickle: bool = False,
                      how_to_allow_pickle: str = ALLOW_PICKLE):
    """(path checked, config, class, from_pretrained keyword arguments): what ``load_causal_lm`` loads ``path``
    with, and ``model_on_meta`` builds. A MIDUS output is this package's classes, or, allowed, its shipped code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    # The MIDUS classes are registered by this package's __init__, so MIDUS outputs load too.
    path = check_model_dir(path, trust_remote_code=trust_remote_code, how_to_allow=how_to_allow, allow_pickle=allow_pickle,
                           how_to_allow_pickle=how_to_allow_pickle)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - a bad config.json surfaces as many kinds
        raise ModelLoadError(f"{path}: cannot read config.json ({one_line(exc, 300, whole=True)})") from None
    loader, kwargs = AutoModelForCausalLM, {"config": config, "trust_remote_code": trust_remote_code}
    if getattr(config, "model_type", None) == "midus":
        from midus_surgery.model import shipped_causal_lm_class, shipped_code_differences

        missing, different = shipped_code_differences(path)
        if trust_remote_code and not missing:  # what the user allowed: the code beside the weights, as loads elsewhere run it
            try:
                loader, kwargs = shipped_causal_lm_class(path), {}
            except Exception as exc:  # noqa: BLE001 - the directory's own code: anything can fail
                raise ModelLoadError(f"{path}: its modeling code does not load ({one_line(exc, 300, whole=True)})") from None
        elif different and (str(Path(path).resolve()), tuple(different)) not in _NOTED_CODE:
            # once per model: eval checks each model (model_on_meta) before it loads it, train's dry run builds it too
            _NOTED_CODE.add((str(Path(path).resolve()), tuple(different)))
            print(f"note: {path}: {', '.join(different)} differ{'s' if len(different) == 1 else ''} from this package's copy; loaded with "
                  "the package's code, not what trust_remote_code=True runs elsewhere (--trust-remote-code uses the shipped files)",
                  file=sys.stderr)
    return path, config, loader, kwargs


def model_on_meta(path: Path, *, trust_remote_code: bool = False, how_to_allow: str = ALLOW_CODE, allow_pickle: bool = False,
                  how_to_allow_pickle: str = ALLOW_PICKLE) -> torch.nn.Module:
    """The model ``load_causal_lm`` would load from ``path``, built from its config.json on the meta device:
    its tensors' names, shapes and ties, no storage, no weights read (seconds at any size)."""
    from transformers import AutoModelForCausalLM

    path, config, loader, kwargs = _causal_lm_loader(path, trust_remote_code=trust_remote_code, how_to_allow=how_to_allow,
                                                     allow_pickle=allow_pickle, how_to_allow_pickle=how_to_allow_pickle)
    try:
        with torch.device("meta"):
            if loader is AutoModelForCausalLM:
                return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            return loader._from_config(loader.config_class.from_pretrained(path))  # the shipped code reads its own config
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build surfaces as many kinds
        raise ModelLoadError(f"{path}: cannot build its model from config.json ({one_line(exc, 300)})") from None


class WeightFilesError(ModelLoadError):
    """The weights' files, judged from their headers: none, unreadable, or a tensor stored in another shape than config.json makes it."""


class StoredAsIntegersError(WeightFilesError):
    """A floating-point tensor of the model stored as integers or booleans (the load would cast it without a word)."""


def check_weight_headers(path: Path, model) -> None:
    """What ``load_causal_lm``'s strict load refuses at once, found from the weights' safetensors headers alone (no
    tensor data read): no weights file, a header the library's rules refuse, a tensor stored in another shape than
    ``model``'s (``model_on_meta``), a tensor missing or one too many. A tied pair is one tensor, stored under either
    name. Weights this tool did not write may store names transformers converts on load (one tensor per expert, an
    old name): its plain renames are applied, and where a stored name is still not the model's, the load judges
    the names. Pickle weights are not read (their names need unpickling): the load judges them. Raises
    ``WeightFilesError`` for the files and shapes, ``ModelLoadError`` for the names, worded as the load words them."""
    import re

    from midus_surgery.compiler.plan import load_renames
    from midus_surgery.io.tensor_source import name_groups, stored_by_module_name

    d = Path(path)
    if not (d / "model.safetensors.index.json").is_file() and not any(d.glob("*.safetensors")):
        if any(d.glob("pytorch_model*.bin")):
            return
        raise WeightFilesError(f"{d} holds no weights (model.safetensors, its index, or pytorch_model.bin)")
    renames = load_renames(model)
    try:
        held = stored_by_module_name(d, renames)  # module name (renamed as the load renames) -> (dtype tag, shape)
    except MidusError as exc:
        raise WeightFilesError(f"{d}: cannot load the weights: {exc}") from None
    stored = {name: shape for name, (_, shape) in held.items()}
    shapes = wrong_shapes(stored, model)
    if shapes:  # as the load says it
        raise WeightFilesError(f"{d}: the weights do not match the model's architecture: {shapes}")
    integers = floats_stored_as_integers({name: tag for name, (tag, _) in held.items()}, model)
    if integers:
        raise StoredAsIntegersError(f"{d}: {integers}")
    groups = name_groups(model)  # a tied embedding and head are one group of two names

    def ignored(kind: str) -> list:
        return [re.compile(p) for p in (getattr(model, f"_keys_to_ignore_on_load_{kind}", None) or [])]

    missing = [names[0] for names in groups if stored.keys().isdisjoint(names) and not any(p.search(names[0]) for p in ignored("missing"))]
    unexpected = sorted(name for name in stored.keys() - {name for names in groups for name in names}
                        if not any(p.search(name) for p in ignored("unexpected")))
    ours = (d / "midus_plan.json").is_file() or (d / "midus_train.json").is_file()  # apply and export write the model's own names
    problems = []
    if missing and (ours or not unexpected):
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    # names beyond a complete set, where the load only renames by the plain patterns applied above: the load
    # refuses them too (trial57: found only after the models before it were scored); with some name missing
    # as well, an old name it converts may stand for it, and the load judges
    if unexpected and (ours or (renames is not None and not missing)):
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_names(unexpected)}")
    if problems:  # as the load says it
        raise ModelLoadError(f"{d}: the weights do not match the model's architecture: {'; '.join(problems)}")


def check_model_loads(path: Path, *, trust_remote_code: bool = False, block_size: int | None = None, allow_pickle: bool = False,
                      how_to_allow: str = ALLOW_CODE):
    """``path`` checked as far as it can be without reading its weights, before an evaluation starts (each model
    then loads once, to be evaluated): ``check_model_dir``, config.json, the tokenizer, the model built on the meta
    device and the weights' headers against it (``check_weight_headers``), and ``block_size`` against its positions.
    A load can still fail on what headers do not show (a tensor's bytes, a converting load): the caller keeps the
    results of the models before it. Returns the tokenizer it loaded, for the evaluation (read once, not twice)."""
    path = check_model_dir(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, how_to_allow=how_to_allow)
    tokenizer = load_tokenizer(path, trust_remote_code, how_to_allow=how_to_allow)
    model = model_on_meta(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, how_to_allow=how_to_allow)
    check_weight_headers(path, model)
    too_long = context_problem(model, block_size) if block_size is not None else None
    if too_long:
        raise ModelLoadError(f"{path}: --block-size: {too_long}")
    return tokenizer


def load_causal_lm(path: Path, *, dtype: torch.dtype | str | None = torch.float32, trust_remote_code: bool = False,
                   progress: bool = True, how_to_allow: str = ALLOW_CODE, allow_pickle: bool = False, how_to_allow_pickle: str = ALLOW_PICKLE,
                   headers_checked: bool = False):
    """Load a model directory (base, DUS, LLaMA-Pro or MIDUS output) as a causal LM, strictly.

    Every tensor the architecture has must be in the weights (tied ones excepted), with its shape,
    and the weights may hold no other: transformers would otherwise start missing tensors from
    random values with only a log line. Any failure is one ``ModelLoadError`` line (exit 2).
    ``progress=False`` keeps transformers' loading bar off too (``eval --quiet`` prints one line).
    ``headers_checked``: the caller ran ``check_model_loads`` on ``path`` (eval does, for every model before the first):
    its header check is not made again.
    """
    path, _, loader, kwargs = _causal_lm_loader(path, trust_remote_code=trust_remote_code, how_to_allow=how_to_allow, allow_pickle=allow_pickle,
                                                how_to_allow_pickle=how_to_allow_pickle)
    # the weights' headers against the model config.json makes, before the model is allocated: a config of 400B
    # parameters over a tiny model's weights took the machine's memory before the shapes were compared (trial83 F3)
    if not headers_checked:
        check_weight_headers(path, model_on_meta(path, trust_remote_code=trust_remote_code, how_to_allow=how_to_allow,
                                                 allow_pickle=allow_pickle, how_to_allow_pickle=how_to_allow_pickle))
    try:
        # transformers' LOAD REPORT table kept, not printed: a strict load names its tensors in one line below
        with hf_progress_bars(progress), warnings.catch_warnings(), kept_load_report() as report:
            # torch's note on a pickle's protocol came before the one-line refusal of a pickle checkpoint (trial54)
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # ignore_mismatched_sizes: report misshapen tensors by name below instead of transformers'
            # "look at the above report" error
            model, info = loader.from_pretrained(path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unreadable files, MIDUS's own key check, remote code: all one line
        if report and "above report" in str(exc):  # a converting load (experts stored one by one) that failed: its exception points at the report
            raise ModelLoadError(f"{path}: cannot load the weights: transformers could not build {load_report_words(report)} "
                                 "from its files") from None
        raise ModelLoadError(f"{path}: cannot load the weights ({load_error_line(exc, 300)})") from None  # not torch's advice to unpickle unsafely
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {len(info['missing_keys'])} tensor(s): {_names(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"{len(info['unexpected_keys'])} unexpected tensor(s): {_names(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        shapes = {f"{k} (weights {list(saved)}, model {list(wanted)})" for k, saved, wanted in info["mismatched_keys"]}
        problems.append(f"{len(shapes)} tensor(s) of the wrong shape: {_names(shapes)}")
    if info.get("error_msgs"):
        problems.append(" ".join(" ".join(info["error_msgs"]).split())[:300])
    if problems:
        raise ModelLoadError(f"{path}: the weights do not match the model's architecture: {'; '.join(problems)}")
    from midus_surgery.compiler.plan import load_renames

    integers = stored_dtype_problem(path, model, load_renames(model))  # for callers without eval's header check (analyze)
    if integers:
        raise ModelLoadError(f"{path}: {integers}")
    return model


def non_finite_tensors(model) -> list[str]:
    """The names of ``model``'s floating-point parameters that hold NaN or inf (buffers may hold -inf masks)."""
    return [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]


def _finite_as_stored(path: Path, names: list[str]) -> bool | None:
    """Whether the tensors ``names`` are finite as the folder's safetensors files store them (read one at a time, in their
    file dtype), or None where the files do not hold them all under these names (pickle weights, renamed tensors)."""
    from safetensors import safe_open

    wanted, finite = set(names), {}
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as stored:
                for name in wanted & set(stored.keys()):
                    finite[name] = bool(torch.isfinite(stored.get_tensor(name)).all())
        except Exception:  # noqa: BLE001 - a file that does not read: the model loaded, so no answer from it, not an error
            return None
    return all(finite.values()) if set(finite) == wanted else None


def check_finite_weights(model, path: Path, dtype: str = "float32") -> None:
    """ModelLoadError, one line naming the tensors, when ``model``'s weights hold NaN or inf: every number computed
    from them (a loss, a slot's use) would describe those values, not the model. ``dtype``: what the model was loaded in.
    A cast is blamed only where the stored weights are finite: float16 makes a weight past 65504 inf (trial102 R03), and
    bfloat16 one past 3.39e38 (trial104), but no cast makes a NaN or inf the file holds."""
    broken = non_finite_tensors(model)
    if not broken:
        return
    said = f"{printable(str(path))}'s weights hold non-finite values (NaN or inf) in {len(broken)} tensor(s), e.g. {', '.join(broken[:3])}"
    stored = _finite_as_stored(path, broken)
    if stored and dtype != "float32":
        largest = torch.finfo(getattr(torch, dtype)).max
        raise ModelLoadError(f"{said}, which are finite as stored but not as loaded in {dtype}: a value past {dtype}'s range "
                             f"({largest:g}) becomes inf; run with --dtype float32")
    if stored is None and dtype != "float32":  # the stored values unread: the cast may have done it, or not
        raise ModelLoadError(f"{said}, as loaded in {dtype}: a value past {dtype}'s range ({torch.finfo(getattr(torch, dtype)).max:g}) "
                             "becomes inf; run with --dtype float32, and if they hold them then too, check the model with "
                             "midus-surgery verify")
    raise ModelLoadError(f"{said}: nothing computed from them says what the model learned; "
                         "check it with midus-surgery verify, and use an earlier export or checkpoint")


def load_tokenizer(path: Path, trust_remote_code: bool = False, how_to_allow: str = ALLOW_CODE):
    from transformers import AutoTokenizer

    from midus_surgery.io.tokenizer_files import has_tokenizer_files, odd_tokenizer_files

    if not Path(path).is_dir():  # transformers would take the name for a Hub repository and retry the network
        raise ModelLoadError(f"{printable(str(path))} is not a directory")
    if odd := odd_tokenizer_files(path):
        raise ModelLoadError(f"{path}: {odd}: replace it with the tokenizer's own file")
    if not trust_remote_code and not has_tokenizer_files(path):
        # transformers' own error blames a missing sentencepiece install
        raise ModelLoadError(f"{path} holds no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.*, *.model...): "
                             "copy them from the model it was made from")
    own = None if trust_remote_code else _own_tokenizer_code(path)
    try:
        with quiet_library_panic():
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            except ValueError:
                if not (own and (Path(path) / "tokenizer.json").is_file()):
                    raise
                # tokenizer_class names the folder's own class too, which AutoTokenizer will not build without running its
                # code: the stock fast tokenizer reads the same tokenizer.json (trial66: an exit 2 where the docs promise this)
                from transformers import PreTrainedTokenizerFast

                tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except BaseException as exc:  # noqa: BLE001 - transformers raises many kinds here, the Rust tokenizers a panic (trial49)
        if not isinstance(exc, Exception) and not is_library_panic(exc):
            raise
        if trust_remote_code and (config_class := _own_config_failed(path, exc)):  # AutoTokenizer builds the config first
            raise ModelLoadError(f"{path}: its own config class {config_class} (config.json auto_map AutoConfig) could not be "
                                 f"loaded ({one_line(exc, 300, whole=True)})") from None
        raise ModelLoadError(f"{path}: no usable tokenizer ({one_line(exc, 300, whole=True)})") from None
    if own and (str(Path(path).resolve()), own) not in _NOTED_CODE:
        _NOTED_CODE.add((str(Path(path).resolve()), own))
        print(f"note: {path}: its tokenizer names code of its own ({own}), not run: the stock {type(tokenizer).__name__} "
              f"tokenizes instead and may split text otherwise than the model's own would (to run it: {how_to_allow})",
              file=sys.stderr)
    return tokenizer


def _own_config_failed(path: Path, exc: BaseException) -> str | None:
    """The folder's own config class (auto_map AutoConfig, 'module.Class') when ``exc`` names its module or class: a
    missing class was said as "no usable tokenizer"."""
    from midus_surgery.io.json_text import loads_as_transformers

    try:
        auto_map = loads_as_transformers((Path(path) / "config.json").read_text()).get("auto_map") or {}
        ref = auto_map.get("AutoConfig") if isinstance(auto_map, dict) else None
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(ref, str) or "." not in ref:
        return None
    module, _, name = ref.split("--")[-1].rpartition(".")
    said = str(exc)
    return ref if isinstance(exc, (AttributeError, ImportError)) and (name in said or module in said) else None


def _own_tokenizer_code(path: Path) -> str | None:
    """The tokenizer classes a model folder's tokenizer_config.json (or config.json) maps to its own code
    (auto_map AutoTokenizer), as one text; None when it names none. Read as JSON: nothing runs."""
    for name in ("tokenizer_config.json", "config.json"):
        try:
            text = read_small_text(Path(path) / name)
            data = loads_as_tokenizer_config(text) if name == "tokenizer_config.json" else loads_as_transformers(text)
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else None
        classes = [c for c in (entry if isinstance(entry, list) else [entry]) if isinstance(c, str) and c]
        if classes:
            return ", ".join(classes)
    return None


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL (float64) over the predicted positions, and how many there are."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(targets)
    if attention_mask is not None:
        keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
        nll = nll.masked_fill(~keep, 0.0)
        count = int(keep.sum())
    else:
        count = targets.numel()
    return nll.double().sum(), count


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    tokens: int  # predicted tokens: those the perplexity averages over (a window's first token is read, not predicted)
    sequences: int
    seconds: float
    tokens_read: int  # tokens the forward passes read: the predicted ones and the first of each block or window
    tokens_read_per_s: float  # tokens_read / seconds

    def to_json(self) -> dict:
        return asdict(self)


def _finish(nll: float, count: int, sequences: int, seen: int, seconds: float) -> EvalResult:
    loss = nll / count if count else float("nan")
    # exp overflows a float past a loss of ~709; a NaN loss stays NaN (not "inf", which reads as merely bad)
    return EvalResult(loss, float("inf") if loss > 700 else math.exp(loss), count, sequences, seconds, seen,
                      seen / seconds if seconds > 0 else 0.0)


@torch.no_grad()
def evaluate_batches(model, batches: Iterable[tuple[np.ndarray, np.ndarray | None]], *, device, autocast=contextlib.nullcontext,
                     reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, progress=None) -> EvalResult:
    """Token-weighted NLL over (ids, mask) batches; ``reduce`` sums across processes."""
    from midus_surgery.model.hml import prepare_kernels

    was_training = model.training
    model.eval()
    prepare_kernels(model, device)  # a first build of the CPU kernels (~30 s) is not the model's speed (trial40)
    started = time.perf_counter()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nll, predicted, sequences, tokens read
    try:
        for ids, mask in batches:
            ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
            mask_t = None if mask is None else torch.as_tensor(mask, dtype=torch.long, device=device)
            with autocast():
                nll, count = token_nll(model, ids_t, mask_t)
            totals += torch.tensor([float(nll), count, ids_t.shape[0], ids_t.numel() if mask_t is None else int(mask_t.sum())],
                                   dtype=torch.float64, device=device)
            if progress is not None:
                progress.update(ids_t.shape[0])
    finally:
        model.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    nll, count, seqs, seen = totals.tolist()
    return _finish(nll, int(count), int(seqs), int(seen), time.perf_counter() - started)


def block_batches(blocks, batch_size: int, rank: int = 0, world: int = 1, max_blocks: int | None = None):
    """Batches of packed blocks; process ``rank`` takes every ``world``-th block."""
    n = len(blocks) if max_blocks is None else min(len(blocks), max_blocks)
    mine = list(range(rank, n, world))
    for i in range(0, len(mine), batch_size):
        yield blocks.batch(mine[i:i + batch_size]), None


def eval_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; otherwise a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this machine has no CUDA device (use --device cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported")
    return dev


def document_windows(stream, block_size: int, max_windows: int | None = None) -> list[np.ndarray]:
    """Each document cut into non-overlapping windows of ``block_size`` tokens, read to its end. A document one token
    longer than whole windows left that token alone, read by no window and said nowhere (trial155 F1): its last window
    starts one token earlier instead (two tokens, one predicted), so the same number of tokens is predicted and every
    token is read. (With windows of 2 tokens there is no earlier start: the lone token stays unread, counted by run_eval.)"""
    windows = []
    for doc in stream.documents():
        cuts = list(range(0, len(doc), block_size)) + [len(doc)]
        reaches_end = max_windows is None or len(windows) + len(cuts) - 1 <= max_windows  # else no window was cut short for it
        if len(doc) > block_size and len(doc) % block_size == 1 and block_size > 2 and reaches_end:
            cuts[-2] -= 1
        for start, end in zip(cuts, cuts[1:]):
            if end - start >= 2:
                windows.append(doc[start:end])
            if max_windows is not None and len(windows) >= max_windows:
                return windows
    return windows


def document_batches(windows: list[np.ndarray], batch_size: int, pad_id: int, rank: int = 0, world: int = 1):
    """Right-padded batches of document windows with attention masks."""
    mine = windows[rank::world]
    order = sorted(range(len(mine)), key=lambda i: -len(mine[i]))  # similar lengths together: less padding
    for i in range(0, len(order), batch_size):
        group = [mine[j] for j in order[i:i + batch_size]]
        width = max(len(w) for w in group)
        ids = np.full((len(group), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for row, w in enumerate(group):
            ids[row, :len(w)] = w
            mask[row, :len(w)] = 1
        yield ids, mask


def check_vocabulary(stream, model, model_dir: Path) -> None:
    """DataError, one line, when ``model_dir``'s tokenizer gave ``stream`` an id past ``model``'s embedding (a base whose
    config shrank its vocabulary under its tokenizer): the embedding would fail on it mid-run."""
    from midus_surgery.train import data as D

    vocab = model.get_input_embeddings().weight.shape[0]
    if stream.meta.get("max_token", -1) >= vocab:
        raise D.DataError(f"the tokenizer of {model_dir} produces id {stream.meta['max_token']}, outside the model's vocabulary of {vocab}")


def run_eval(model_dir: Path, data: list[str], *, block_size: int | None = None, per_document: bool = False, batch_size: int = 4,
             max_blocks: int | None = None, dtype: str = "float32", text_field: str = "text",
             dir_glob: Iterable[str] = DIR_GLOB, cache_dir: Path | None = None,
             trust_remote_code: bool = False, progress: bool = True, threads: int | None = None, device: str = "auto",
             tokenizer=None, allow_pickle: bool = False) -> dict:
    """``midus-surgery eval``: perplexity of ``model_dir`` on ``data``, on ``device`` (auto: CUDA when there is one).
    block_size: tokens per block or window; None: 512, or the model's positions when it has fewer. tokenizer:
    ``model_dir``'s, already loaded (``check_model_loads``'s); None: loaded here."""
    from midus_surgery.io.progress import progress_bar
    from midus_surgery.train import data as D

    if threads:
        torch.set_num_threads(threads)
    model_dir = check_model_dir(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}")
    run_on = eval_device(device)
    cache = D.token_cache_location(Path(cache_dir) if cache_dir else None,
                                 inputs=[("the model", model_dir), *((f"data ({p})", input_root(p)) for p in data)],
                                 data_folders=[(f"the data folder of {p}", data_folder(p)) for p in data])
    tokenizer_given = tokenizer is not None  # check_model_loads gave it, its header check made
    if tokenizer is None:
        tokenizer = load_tokenizer(model_dir, trust_remote_code)
    stream = D.prepare_corpus(list(data), Path.cwd(), tokenizer, dir_glob=dir_glob, text_field=text_field,
                              cache_dir=cache, progress=progress,
                              what="eval data", tokenizer_source=str(model_dir))
    if nul := D.nul_note(stream):
        print(f"note: {nul}", file=sys.stderr)  # beside the result, not in it: --json's stdout is one JSON value
    model = load_causal_lm(model_dir, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, progress=progress,
                           allow_pickle=allow_pickle, headers_checked=tokenizer_given).to(run_on)
    check_vocabulary(stream, model, model_dir)
    if block_size is None:
        block_size = min(DEFAULT_EVAL_BLOCK, (position_limit(model) or (DEFAULT_EVAL_BLOCK, ""))[0])
    too_long = context_problem(model, block_size)
    if too_long:
        raise ModelLoadError(f"--block-size: {too_long}")
    if per_document:
        windows = document_windows(stream, block_size, None if max_blocks is None else max_blocks + 1)  # one more: were there more?
        if not windows:
            raise D.DataError("eval data: no document has two tokens to predict from")
        limited = max_blocks is not None and len(windows) > max_blocks
        windows = document_windows(stream, block_size, max_blocks) if limited else windows
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else D.eos_id(tokenizer)
        batches, total = document_batches(windows, batch_size, pad), len(windows)
    else:
        blocks, _ = D.split(stream, None, block_size, 0.0, what="eval data", block_option="--block-size")
        batches, total = block_batches(blocks, batch_size, max_blocks=max_blocks), min(len(blocks), max_blocks or len(blocks))
        limited = total < len(blocks)
    # the tokens after the last block or window read are not scored: said with the result, not dropped unsaid (trial146 F5);
    # with --max-blocks, all those after the last one it reads (trial155 F1: 0 was given, with thousands after it)
    tail = len(stream) - (sum(len(w) for w in windows) if per_document else total * block_size)
    with progress_bar(total, "eval", enabled=progress, unit="seq") as bar:
        result = evaluate_batches(model, batches, device=run_on, progress=bar)
    return {"model": str(model_dir), "mode": "documents" if per_document else "blocks", "block_size": block_size,
            "dtype": dtype, "device": str(run_on), **result.to_json(), "corpus_tokens": len(stream), "tokens_after_the_last_block": tail,
            "stopped_at_max_blocks": limited,
            "corpus_files": len(stream.meta.get("files", [])),
            "token_cache": str(stream.path),
            # which token ids the data became: models whose tokenizers cut or number it otherwise are not comparable per token
            "corpus_sha1": hashlib.sha1(np.ascontiguousarray(stream.tokens, dtype=np.int64).tobytes()).hexdigest()}
