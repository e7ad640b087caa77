"""`midus-surgery verify`: load an emitted model and check that it is what the recipe promised.

The checks, each one line: ``code`` (MIDUS outputs: the modeling files beside the weights are
this package's, byte for byte, or with --trust-remote-code are the code the checks run; see
``shipped_code_check``), ``tensors`` (every tensor on disk loaded, none missing), ``batch``
(each row's logits are those of the row run alone, at batch sizes 1, 2 and 3 and with the rows
permuted: a block that mixes rows, e.g. one that unpacks a tensor as if it were a tuple, fails),
``identity`` (function-preserving plans: the logits equal the base's bit for bit; ``logits``
otherwise), ``identity (perturbed)`` (the same with the base's norm weights and biases moved far
from their init in both models: a block that is the identity only at init fails), ``weights``
(each tensor the layer map traces to a base tensor equals it bit for bit), ``config`` (each per-layer
config list is the base's through the layer map: ``config_check``), ``kv-cache``
(greedy generation with and without the cache agree), ``kv-cache (padded batch)`` (the same for a
left-padded batch of two prompts, each also as generated alone) and ``round-trip``
(save_pretrained + reload).

Memory: one model at a time, in float32. The output runs every check that needs only it, keeps what
the base's checks compare with (its logits on the sample, its norm weights and biases) and is let
go by its round trip; then the base runs alone; then, for the perturbed identity only, the output
is loaded again. The two side by side were the peak of a verify.

Every transformers call passes an explicit ``trust_remote_code``: the caller's (the user's
``--trust-remote-code``, or for ``apply --verify`` the recipe the user wrote), never the
directory's own word (its midus_plan.json is as untrusted as the rest of it). With None,
transformers asks on the terminal whether to run a model's own code, and verify must never stop
at a prompt.
"""

from __future__ import annotations

import json
import math
import tempfile
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from midus_surgery.compiler.custom_code import BUILDING_KEYS, building_code
from midus_surgery.compiler.plan import guess_layers_path, is_inserted, plan_mismatch, read_plan_file
from midus_surgery.emit.comparable import own_memory, release_memory
from midus_surgery.errors import (
    MachineError,
    MidusError,
    UsageError,
    disk_problem,
    is_library_panic,
    load_error_line,
    not_utf8_path,
    one_line,
    printable,
    quiet_library_panic,
    temp_disk_advice,
)
from midus_surgery.io.file_digest import tensor_sha256s
from midus_surgery.io.json_text import loads_as_tokenizer_config, loads_as_transformers, loads_checked
from midus_surgery.io.output_dir import recorded_base, run_export_hint, unchanged_since_written, unfinished_output
from midus_surgery.io.small_files import read_small_text
from midus_surgery.io.tensor_source import name_groups
from midus_surgery.model.midus_names import is_memory_parameter

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
    skipped: bool = False  # nothing was compared (ok stays True: a skip fails nothing); said as SKIP, not PASS


def _skip(name: str, why: str) -> Check:
    return Check(name, True, why, skipped=True)


def _load(path: Path, gguf_file: str | None = None, *, trust_remote_code: bool = False, shipped: bool = False):
    """The model as ``AutoModelForCausalLM.from_pretrained`` loads it. ``shipped``: a MIDUS output
    through the code beside its weights, as a trust_remote_code load does where midus-surgery is not
    installed (here transformers would prefer the classes this package registers)."""
    from transformers import AutoModelForCausalLM  # MIDUS classes: registered by this package's __init__

    if shipped:
        from midus_surgery.model import shipped_causal_lm_class

        model, info = shipped_causal_lm_class(path).from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    else:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True,
                                                           trust_remote_code=trust_remote_code, **kwargs)
    return own_memory(model.eval()), info


def _weights_unlike_config(path: Path, trust_remote_code: bool) -> str | None:
    """Why the weights' files cannot be what config.json makes (a tensor of another shape), found from their headers
    before the model is allocated (a config of 400B parameters over a tiny model's weights took the machine's memory,
    trial83 F3); None otherwise, and where the headers or the config do not read: the load says why."""
    from transformers import AutoConfig, AutoModelForCausalLM  # MIDUS classes: registered by this package's __init__

    from midus_surgery.compiler.base import model_config_problems
    from midus_surgery.compiler.plan import load_renames
    from midus_surgery.io.tensor_source import stored_by_module_name, wrong_shapes

    numbers = model_config_problems(_config_dict(path))  # as eval checks them: 10^6 layers built for minutes (trial99 C3)
    if numbers:
        return f"{path}/config.json: {numbers[0]}"
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        renames = load_renames(model)
    except Exception:  # noqa: BLE001 - no config, code not allowed: the load says it as it does
        return None
    try:
        held = stored_by_module_name(path, renames)
    except MidusError as exc:
        # weights that cannot be read (a pipe, a folder, a cut file): the model cannot be checked, exit 2 as --help says,
        # in eval's words; the load said transformers' "no file named model.safetensors" or a bare SafetensorError, exit 1
        # (trial138 F6)
        raise UsageError(f"{printable(str(path))}: cannot load the weights: {exc}") from None
    except Exception:  # noqa: BLE001 - headers that do not read otherwise: the load says it as it does
        return None
    shapes = wrong_shapes({name: shape for name, (_, shape) in held.items()}, model)
    return f"{path}: the weights do not match the model's architecture: {shapes}" if shapes else None


def _gguf_unlike(path: Path) -> str | None:
    """Why a GGUF base cannot be loaded (counts its size cannot hold, no tensors, no sizes), checked as validate checks
    it before transformers' GGUF reader sees the file: that reader believes the file's counts (trial83 F2)."""
    from midus_surgery.io.tensor_source import gguf_problem

    problem = gguf_problem(path)
    return problem.removeprefix(f"{path}: ") if problem else None  # the line names the base already


def _builds_with_own_code(directory: Path, gguf: str | None) -> bool:
    """Whether the base's config.json maps its model to code of its own: only then does verify load it with
    trust_remote_code (the flag asked for the output's code). Given it, transformers also runs a folder's
    ``custom_generate/generate.py``, which a stock base may carry and no message named (trial49)."""
    if gguf:
        return False
    try:
        return bool(building_code(loads_as_transformers((directory / "config.json").read_text())))
    except (OSError, ValueError, AttributeError):  # no config.json, or not a JSON object: the load says so
        return False


def _not_a_base(path: Path) -> str | None:
    """Why ``path`` cannot be a base model to load (transformers would take it for a hub id, or fail
    deep in its loader), or None: a directory with a config.json, or a .gguf file."""
    if path.suffix.lower() == ".gguf":
        return None if path.is_file() else "no such .gguf file"
    if not path.exists():
        return "no such directory"
    if not path.is_dir():
        return "a file, not a model directory (config.json beside the weights) or a .gguf file"
    if not (path / "config.json").is_file():
        return "not a model directory (no config.json)"
    return None


def _round_to_stored_dtype(base_model, stored: str | None) -> str | None:
    """The base's weights rounded to the dtype the output stores them in, when it is narrower
    (a float32 or GGUF base written as bfloat16): the output's copies of the base's layers are the
    rounded values, so the identity is exact against the rounded base, never against the base.
    Returns the dtype name when it rounded, else None."""
    dtype = getattr(torch, stored, None) if isinstance(stored, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return None
    params = [p for p in base_model.parameters() if p.is_floating_point() and torch.finfo(p.dtype).bits > torch.finfo(dtype).bits]
    if not params:
        return None
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(dtype))
    return stored


def _tokenizer(path: Path, trust_remote_code: bool = False):
    """(tokenizer or None, why it is None where the folder has tokenizer files). Without one the checks
    run on fixed random token ids; a folder whose tokenizer files do not load is said (trial33: a garbage
    tokenizer.json, a tokenizer's own code left behind), since the card tells users to load it."""
    from transformers import AutoTokenizer

    from midus_surgery.emit.emitter import TOKENIZER_FILES
    from midus_surgery.io.tokenizer_files import odd_tokenizer_files

    if odd := odd_tokenizer_files(path):  # transformers would open a pipe and wait for a writer forever (trial66)
        return None, odd
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None, None  # cli's note says so
    try:
        with quiet_library_panic():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            tokens = len(tokenizer(PROMPT).input_ids)
        if tokens:
            return tokenizer, None
        return None, "it turns the sample prompt into no tokens"
    except BaseException as exc:  # noqa: BLE001 - an unreadable tokenizer is not the model's fault: said, not failed
        if not isinstance(exc, Exception) and not is_library_panic(exc):  # a Rust panic (trial49) is the file's fault too
            raise
        return None, f"AutoTokenizer.from_pretrained fails on it: {load_error_line(exc, 400)}"


def _safetensors_files(path: Path) -> list[str]:
    """The weight files of a model directory: its index's shards, or the one model.safetensors."""
    index = path / "model.safetensors.index.json"
    return sorted(set(loads_as_transformers(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]


def _file_tensor_names(path: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in _safetensors_files(path):
        with safe_open(str(path / file), framework="pt") as handle:
            names.update(handle.keys())
    return names


_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def dtype_mismatch(path: Path, config: dict) -> str | None:
    """Why config.json's dtype is not the stored weights' (transformers' default dtype="auto" loads
    what the config says: a bf16 model said float32 loads at twice the memory), or None."""
    stated, stored = config.get("dtype", config.get("torch_dtype")), stored_float_dtype(path)
    if not isinstance(stated, str) or stored is None or stated == stored:
        return None  # no stated dtype, or mixed storage (some quantised layouts): nothing one name could say
    return f"config.json says dtype {stated}, but the weights are stored as {stored}: a dtype=\"auto\" load gets {stated}"


def stored_float_dtype(path: Path) -> str | None:
    """The one floating-point dtype a model folder's safetensors files store (torch's name), or None (mixed, or none)."""
    from safetensors import safe_open

    stored: set[str] = set()
    for file in _safetensors_files(path):
        with safe_open(str(path / file), framework="pt") as handle:
            for name in handle.keys():
                stored.add(handle.get_slice(name).get_dtype())
    floats = {_SAFETENSORS_FLOATS[d] for d in stored if d in _SAFETENSORS_FLOATS}
    return floats.pop() if len(floats) == 1 else None


def _batch(model, tokenizer) -> torch.Tensor:
    if tokenizer is not None:
        ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids
        return ids[:, :64]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.get_text_config().vocab_size, (2, 32), generator=generator)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Next-token perplexity of ``ids`` from their ``logits`` (not a model's own loss, which some
    architectures compute over other tokens or not at all)."""
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(torch.exp(loss))


def _dropped_layers(plan: dict | None) -> list[int]:
    """The base layers the layout leaves out (allow_dropped_layers); [] without a plan."""
    if not plan:
        return []
    return sorted(set(range(int(plan.get("base_num_hidden_layers", 0)))) - {int(layer["source"]) for layer in plan["layers"]})


def function_preserving(plan: dict) -> bool:
    """True when every inserted block starts as the identity (so logits must equal the base's).
    ``plan``: as ``read_plan_file`` gives it, in today's layout whatever layout it was written in."""
    if plan.get("function_preserving") is False:  # found not to be by apply's replica check, and accepted
        return False
    init = (plan.get("midus") or {}).get("hml", {}).get("init")
    for layer in plan["layers"]:
        if layer["kind"] == "copy":
            return False
        if layer["kind"] == "memory" and init == "random":
            return False
    return True


class NeedsTrust(MidusError):
    """The model runs its own code, and the user has not allowed it."""

    exit_code = 2


def _layer_of(name: str, prefix: str) -> int | None:
    """The decoder layer a tensor name is in (``prefix``: the layers' path and a dot), or None."""
    index = name[len(prefix):].partition(".")[0] if name.startswith(prefix) else ""
    return int(index) if index.isdigit() else None


def _config_dict(out: Path) -> dict:
    """config.json as a dict; {} when it is not one (the load check then says why)."""
    try:
        config = loads_as_transformers((out / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _refuse_own_code(out: Path, plan: dict | None) -> None:
    """Without --trust-remote-code, a directory whose model is its own code is refused: transformers
    would load a stock class in its place and the checks would pass on a model nobody loads. MIDUS
    outputs map to code this package registers itself (the same code), so they are checked as they are."""
    if plan is not None and plan.get("trust_remote_code"):
        raise NeedsTrust(f"{out} was made from a base with its own modeling code (midus_plan.json: trust_remote_code), "
                         "which verify runs only when told to: read that code, then pass --trust-remote-code")
    config = _config_dict(out)  # unreadable: {}, and the load check says what is wrong with it
    auto_map = config.get("auto_map")
    # only the entries that build the config or the causal LM: a tokenizer's own class is not what the checks load
    building = {k: v for k, v in auto_map.items() if k in BUILDING_KEYS} if isinstance(auto_map, dict) else {}
    if building and config.get("model_type") != "midus":
        names = ", ".join(f"{k} -> {v}" for k, v in sorted(building.items()))
        raise NeedsTrust(f"{out}/config.json maps its model to its own code (auto_map: {names[:200]}), which verify runs only when "
                         "told to: read that code, then pass --trust-remote-code (without it transformers would check another class)")


def _other_shipped_code(out: Path, base_dir: Path | None) -> tuple[str | None, str | None]:
    """The code a MIDUS output holds besides its modeling files, in a few words: (what is not the base's, what is the base's
    own, byte for byte: a custom tokenizer apply carried over), each None when there is none. Code: other .py files, and a
    tokenizer_config.json that maps the tokenizer to code (auto_map)."""
    from midus_surgery.model.midus_names import MODELING_FILES

    def same_in_base(name: str) -> bool:
        theirs = base_dir / name if base_dir is not None else None
        try:
            return theirs is not None and theirs.is_file() and theirs.read_bytes() == (out / name).read_bytes()
        except OSError:
            return False

    def tokenizer_map(folder: Path | None):
        try:
            data = loads_as_tokenizer_config(read_small_text(folder / "tokenizer_config.json")) if folder is not None else None
        except (OSError, ValueError):
            return None
        return data.get("auto_map") if isinstance(data, dict) else None

    foreign, own = [], []
    for p in sorted(out.glob("*.py")):
        if p.name not in MODELING_FILES:
            (own if same_in_base(p.name) else foreign).append(p.name)
    auto_map = tokenizer_map(out)
    if auto_map:
        said = f"tokenizer_config.json's auto_map: {one_line(json.dumps(auto_map), 120)}"
        (own if auto_map == tokenizer_map(base_dir) else foreign).append(said)
    return ", ".join(foreign) or None, ", ".join(own) or None


def shipped_code_check(out: Path, config: dict, trust_remote_code: bool, base_dir: Path | None = None) -> Check:
    """A MIDUS output's modeling files are what ``trust_remote_code=True`` runs where midus-surgery
    is not installed; with the package imported, transformers runs the package's registered copy
    instead. So the shipped files must be the package's (byte for byte, and config.json's auto_map
    must name them), or, with --trust-remote-code, the checks run the shipped files themselves."""
    import midus_surgery
    from midus_surgery.model import shipped_code_differences
    from midus_surgery.model.midus_names import AUTO_MAP, MODELING_FILES

    missing, differ = shipped_code_differences(out)
    other, own = _other_shipped_code(out, base_dir)
    if other and not trust_remote_code:  # trust_remote_code=True, which a MIDUS output is loaded with, runs it too (trial75 F1)
        return Check("code", False, f"the folder ships code besides MIDUS's modeling files that is not its base's ({other}), which a "
                                    "load with trust_remote_code=True (as a MIDUS output is loaded where midus-surgery is not installed) "
                                    "runs; read it, then pass --trust-remote-code to check the folder as it is, or remove it")
    also = (f"; it also ships its base's own code, byte for byte ({own}), which trust_remote_code=True runs as the base's did"
            if own else "")
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    if missing or any(auto_map.get(key) != ref for key, ref in AUTO_MAP.items()):  # beside them, a base tokenizer's own entry
        what = f"{', '.join(missing)} missing" if missing else "config.json's auto_map does not name MIDUS's own classes"
        return Check("code", False, f"{what}: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) "
                                    "would not load this model's code where midus-surgery is not installed")
    if not differ:
        return Check("code", True, f"the {len(MODELING_FILES)} modeling files beside the weights are midus-surgery "
                                   f"{midus_surgery.__version__}'s own, which the checks below run{also}")
    names = ", ".join(differ) + (" differs" if len(differ) == 1 else " differ")
    # an earlier version's output, its files as that version wrote them, was said as "edited, or written by another
    # version" with no way to tell which, every version being 0.1.0 (trial152 F4)
    # (a marker can be edited too: it says what the folder records, and the check still fails: trial153 M5)
    why = ("as the folder's marker records midus-surgery wrote them: another version's, unless the marker was edited too; "
           "`apply --overwrite` with this one ships this version's" if unchanged_since_written(out, differ)
           else "edited, or written by another version")
    if trust_remote_code:
        return Check("code", True, f"{names} from midus-surgery {midus_surgery.__version__}'s copy ({why}): the checks below run "
                                   "the shipped files (--trust-remote-code)")
    return Check("code", False, f"{names} from midus-surgery {midus_surgery.__version__}'s copy ({why}), and trust_remote_code=True "
                                "loads run them: the checks below ran the package's copy instead; read the shipped files, then pass "
                                "--trust-remote-code to check them")


def verify(out: Path, base: Path | None = None, *, trust_remote_code: bool = False, report=print) -> list[Check]:
    """Run every check, reporting each as it completes; returns them all.

    trust_remote_code: run the model's (and the base's) own modeling code, as the user allowed."""
    out = Path(out)
    if not (out / "config.json").is_file():  # the name escaped: one with a newline split the line (trial99 M3)
        raise UsageError(f"{printable(str(out))} is not a model directory (no config.json){run_export_hint(out)}")
    for folder in (out, base):
        if folder is not None and (not_utf8 := not_utf8_path(folder)):
            raise UsageError(not_utf8)
    if not list(out.glob("*.safetensors")) and (pickles := sorted(p.name for p in out.glob("*.bin"))):
        # its tensor checks read the safetensors files; a traceback stood here (trial66)
        raise UsageError(f"{printable(str(out))} holds its weights as pickle files only ({', '.join(pickles[:3])}): verify reads safetensors, which "
                         "apply and train write; re-save it with save_pretrained (transformers 5 writes safetensors) to check it")
    try:
        plan = read_plan_file(out)  # None: not made by `apply`
    except MidusError as exc:  # the folder's own file is unusable: exit 2, as for no config.json (exit 1 says a check failed)
        raise UsageError(str(exc)) from None
    if base is not None and (why_not := _not_a_base(Path(base))):
        raise UsageError(f"--base {base}: {why_not}")
    recorded = recorded_base(out) if plan is not None else None
    base_path = base or (Path(recorded) if recorded else None)
    base_gone = _not_a_base(base_path) if base is None and base_path is not None else None  # moved or deleted since apply: why
    if base_gone:
        base_path = None
    if not trust_remote_code:
        _refuse_own_code(out, plan)
        if base_path is not None and base_path.suffix != ".gguf":
            _refuse_own_code(base_path, None)  # the stock class in its place would make the comparison meaningless
    trust = trust_remote_code
    checks: list[Check] = []

    def record(check: Check) -> None:
        checks.append(check)
        report(check)

    unfinished = unfinished_output(out)
    if unfinished:  # its weights may be whole and pass every check below: said first, and failed
        record(Check("whole", False, unfinished))
    shipped = False
    config = _config_dict(out)
    mismatch = plan_mismatch(plan, config) if plan is not None else None
    if mismatch:  # the layer map the checks below read would be another model's
        record(Check("plan", False, f"midus_plan.json does not describe this model: it {mismatch} (copied from another output, or edited)"))
    if config.get("model_type") == "midus":
        base_dir = base_path if base_path is not None and base_path.is_dir() else None
        code = shipped_code_check(out, config, trust, base_dir)
        record(code)
        shipped = trust and code.ok  # the files are there and the user allowed them: run them, as a load without the package does
    unlike = _weights_unlike_config(out, trust)
    if unlike:
        record(Check("load", False, unlike))
        return checks

    # The output and its base are never in memory at once (both in float32, they were the peak of a verify):
    # 1. the output alone: every check that needs only it, with what the base phase compares kept (its logits, its
    #    norm weights and biases), then its round trip, which lets it go; 2. the base alone: identity, weights, config,
    #    and whether the base fails what the output failed; 3. the output again, only for the perturbed identity.
    try:
        model, info = _load(out, trust_remote_code=trust, shipped=shipped)
    except Exception as exc:  # noqa: BLE001 - any load failure is the check's result
        record(Check("load", False, load_error_line(exc, 600)))
        return checks
    on_disk = _file_tensor_names(out)
    missing, unexpected = set(info.get("missing_keys", [])), set(info.get("unexpected_keys", []))
    if plan is not None:
        # apply writes the model's own tensor names: each tensor (each group of tied names) is on disk
        # once, nothing else is. Other directories may store renamed tensors (one per expert) that
        # transformers converts on load: its own report is what counts for them.
        groups = name_groups(model)
        missing |= {names[0] for names in groups if not on_disk & set(names)}
        unexpected |= on_disk - {name for names in groups for name in names}
    missing, unexpected = sorted(missing), sorted(unexpected)
    from midus_surgery.compiler.plan import load_renames
    from midus_surgery.io.stored_dtypes import stored_dtype_problem

    # floats stored as integers: the load casts them without a word (trial61: verify passed such a model)
    wrong_dtype = stored_dtype_problem(out, model, load_renames(model)) or dtype_mismatch(out, config)
    record(Check("tensors", not missing and not unexpected and wrong_dtype is None,
                 f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else wrong_dtype or f"{len(on_disk)} tensors on disk, all loaded"))

    # train.evaluate.non_finite_tensors's rule, written out: emit does not import train (tests/test_package_layout.py)
    non_finite = [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if non_finite:  # every check below would fail on it and blame something else (NaN != NaN)
        record(Check("finite", False, f"{len(non_finite)} tensor(s) hold NaN or inf: {', '.join(non_finite[:5])}"))
        return checks
    tokenizer, unusable = _tokenizer(out, trust)
    if unusable:
        record(_skip("tokenizer", f"the folder's tokenizer does not load ({unusable}); the checks ran on random token ids: "
                                  "fix or replace its tokenizer files before publishing"))
    ids = _batch(model, tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and ids.numel() and int(ids.max()) >= rows:
        # the embedding's IndexError was said as "the model fails to run a forward pass", blaming the model for a tokenizer
        # that is not its own; eval's words (trial138 F6)
        record(Check("tokenizer", False, f"the tokenizer of {printable(str(out))} produces id {int(ids.max())}, outside the model's "
                                         f"vocabulary of {rows}: the folder's tokenizer files are not this model's"))
        return checks
    try:
        logits = _logits(model, ids)
    except Exception as exc:  # noqa: BLE001 - a model that cannot run is the check's result
        model = None
        release_memory()
        also = _base_forward_fails(base_path, trust, ids) if base_path is not None else None
        record(Check("forward", False, f"the model fails to run a forward pass: {one_line(exc, 300)}" + (
            f"; the base {printable(str(base_path))} fails it too ({also}): the base's config or code is the cause, not the "
            "surgery" if also else "")))
        return checks
    vocab = logits.shape[-1]
    record(batch_check(model, vocab))

    trained, not_a_record = train_record(out)
    if not_a_record:  # the checks below then run as for an apply output: a record cannot excuse changed weights (trial99 W1)
        record(Check("record", False, f"{not_a_record}, so it does not excuse the output from the checks an apply output passes"))
    identity_expected = not trained and (plan is None or function_preserving(plan))
    # the base phase compares the output's norm weights and biases with the base's, to move the copies in both models
    snapshot = _norms_and_zeros(model) if base_path is not None and identity_expected and plan is not None else None
    out_class, out_config = type(model), model.config  # a fresh instance of it, if the output fails a generation check
    out_rows = model.get_input_embeddings().weight.shape[0]  # not the logits' width: CPM-Ant's and Moshi's differ from it

    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids if tokenizer is not None else ids[:1, :8]
    generation = [(check, check(model)) for check in (lambda m: cache_check(m, prompt, tokenizer), lambda m: padded_cache_check(m, vocab))]
    # the round trip loads the output a second time: what the reload must give back is kept as digests, and the output
    # is let go once saved, so that the reload is the only model in memory (the output, the base and the reload, each
    # in float32, took 22 GB for a 1.7B model: trial93 F1)
    handed, model = [model], None
    release_memory()
    round_trip = round_trip_check(handed, ids, trust, shipped=shipped)
    release_memory()  # the round trip's reload: gone before the base comes

    base_fails: dict[int, bool] = {}  # index in `generation` -> whether the base fails that check too
    if base_path is not None:
        base_model, rows = _base_phase(out, config, plan, base_path, trust, trained, identity_expected, logits, ids, out_config, out_rows,
                                       record)
        if base_model is not None:
            perturbed = None
            if identity_expected:
                perturbed = _base_perturbed(base_model, plan, snapshot, ids) if plan is not None else _skip(PERTURBED, NO_LAYER_MAP)
            for index, (check, result) in enumerate(generation):
                if not result.ok:  # what the base model itself cannot do (an architecture's generate bug) is not the output's fault
                    base_fails[index] = not check(base_model).ok
            handed, base_model = [base_model], None
            if not round_trip.ok and not round_trip_check(handed, ids, trust).ok:  # last: it lets the base go once saved
                round_trip = _skip(round_trip.name, f"the base model fails it too ({round_trip.detail})")  # RWKV rescales on save
            handed = None
            release_memory()
            if perturbed is not None:  # phase 3: the output again, its copies moved as the base's were
                record(perturbed if isinstance(perturbed, Check) else _output_perturbed(out, trust, shipped, perturbed, ids))
            for row in rows:
                record(row)
    else:
        why = (f"the base recorded at apply time, {recorded}, is not there any more ({base_gone}); give --base to compare with it"
               if base_gone else "no base given (--base) and none recorded")
        record(_skip("identity", why))
        if plan is not None:  # what the base would also have checked: the same under perturbed norms, each copied tensor bit for bit
            if not trained and function_preserving(plan):
                record(_skip(PERTURBED, "no base to compare with (see identity)"))
            record(_skip("weights", "no base to compare with (see identity)"))
            record(_skip("config", "no base to compare the per-layer config lists with (see identity)"))

    for index, (check, result) in enumerate(generation):
        if not result.ok and base_fails.get(index):
            result = _skip(result.name, f"the base model fails it too ({result.detail})")
        elif not result.ok and _stock_instance_fails(out_class, out_config, check):
            result = _skip(result.name, f"a fresh random instance of this architecture at this config fails it too, "
                                              f"so its generate path does, not the surgery ({result.detail})")
        record(result)
    record(round_trip)
    return checks


def _base_phase(out: Path, config: dict, plan: dict | None, base_path: Path, trust: bool, trained: bool, identity_expected: bool,
                logits: torch.Tensor, ids: torch.Tensor, out_config, out_rows: int,
                record) -> tuple[torch.nn.Module | None, list[Check]]:
    """Load the base (the output is no longer in memory) and record identity (or logits) against what the output phase
    kept: its ``logits`` on ``ids``, its config and its embedding table's row count (``out_rows``). Returns the base model and the weights and config rows, said after
    the perturbed identity; or (None, []) when it is not this output's base or does not load (said in the identity row)."""
    base_dir, gguf = (base_path.parent, base_path.name) if base_path.suffix == ".gguf" else (base_path, None)
    made_from, base_config = (plan or {}).get("base_num_hidden_layers"), {} if gguf else _config_dict(base_dir)
    depth = base_config.get("num_hidden_layers") or (base_config.get("text_config") or {}).get("num_hidden_layers")
    if isinstance(made_from, int) and isinstance(depth, int) and depth != made_from:  # said before a load (trial82 F12)
        record(Check("identity", False, f"the base model {base_path} has {depth} layers, and this output was made from a base of "
                                         f"{made_from}: it is not this output's base"))
        return None, []
    unlike = _gguf_unlike(base_path) if gguf else _weights_unlike_config(base_dir, trust and _builds_with_own_code(base_dir, gguf))
    if unlike:
        record(Check("identity", False, f"the base model {base_path} does not load: {unlike}"))
        return None, []
    try:
        base_model, _ = _load(base_dir, gguf, trust_remote_code=trust and _builds_with_own_code(base_dir, gguf))
    except Exception as exc:  # noqa: BLE001 - the comparison's result, said in one line
        why = "out of memory" if isinstance(exc, MemoryError) else load_error_line(exc, 300)
        record(Check("identity", False, f"the base model {base_path} does not load: {why}"))
        return None, []
    base_vocab, out_vocab = base_model.get_input_embeddings().weight.shape[0], out_rows
    if base_vocab != out_vocab:  # the output's token ids would index past the base's table
        record(Check("identity", False, f"the base model {base_path} has a vocabulary of {base_vocab:,} tokens and the output "
                                         f"{out_vocab:,}: it is not this output's base"))
        return None, []
    # the dtype the weights are stored in: a config.json that says another one fails the tensors row already, and its
    # rounding made every copy differ, said as "not the base the output was made from" (trial150 L5)
    rounded = _round_to_stored_dtype(base_model, stored_float_dtype(out) or config.get("dtype"))
    left_alone, why_not = _untrained_since_apply(out, config) if trained else (None, None)
    if plan is None:
        weights = _skip("weights", NO_LAYER_MAP)
    elif trained and left_alone is None:
        weights = _skip("weights", why_not)
    else:
        weights = weights_check(out, base_model, plan, left_alone)  # before the base runs (weights_check says why)
    try:
        base_logits = _logits(base_model, ids)
    except Exception as exc:  # noqa: BLE001
        record(Check("identity", False, f"the base model {base_dir} fails to run a forward pass: {one_line(exc, 300)}"))
        return None, []
    diff = float((logits - base_logits).abs().max())
    if identity_expected:
        against = f"the base rounded to {rounded}, the output's dtype" if rounded else "the base"
        record(Check("identity", diff == 0.0, f"max |logit difference| against {against}: {diff:g} (every inserted block starts as the identity, so it must be 0)"))
    else:
        ppl_out, ppl_base = _perplexity(logits, ids), _perplexity(base_logits, ids)
        why = (("trained since apply" if plan else "trained by `midus-surgery train`; no apply made it") if trained else f"base layer{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))} "
               f"{'are' if len(dropped) > 1 else 'is'} left out (allow_dropped_layers)"
               if (dropped := _dropped_layers(plan)) else "the recipe accepts blocks that do not start as the identity"
               if plan and plan.get("function_preserving") is False else "plain copies or random memory change the function")
        # nothing to compare the function with: identity is a SKIP (a PASS here read as "same as the base"; trial67),
        # and what is checked is that the output computes finite logits, the difference and perplexities shown
        record(_skip("identity", f"{why}: not meant to compute the base's function, so there is none to compare"))
        finite = math.isfinite(diff) and math.isfinite(ppl_out)
        record(Check("logits", finite, f"the output's logits are {'finite' if finite else 'NOT finite'}; max |logit difference| against the base: "
                                       f"{diff:.4g}; perplexity on the sample: base {ppl_base:.2f}, output {ppl_out:.2f}"))
    config_row = config_check(out_config, base_model.config, plan) if plan is not None else None
    return base_model, [weights] + ([config_row] if config_row is not None else [])


def _base_forward_fails(base_path: Path, trust: bool, ids: torch.Tensor) -> str | None:
    """Why the base fails the forward pass the output failed, or None (it runs, or does not load: nothing to say). A
    copy-only output of a base whose own config cannot run (a hand-edited head_dim) was written, and its FAIL blamed the
    output alone (trial142 F3)."""
    base_dir, gguf = (base_path.parent, base_path.name) if base_path.suffix == ".gguf" else (base_path, None)
    try:
        base_model, _ = _load(base_dir, gguf, trust_remote_code=trust and _builds_with_own_code(base_dir, gguf))
    except Exception:  # noqa: BLE001 - a base that does not load says nothing of the output's forward
        return None
    try:
        if int(ids.max()) >= base_model.get_input_embeddings().weight.shape[0]:
            return None  # not this output's vocabulary: its failure would be another one
        _logits(base_model, ids)
    except Exception as exc:  # noqa: BLE001
        return one_line(exc, 200)
    finally:
        base_model = None
        release_memory()
    return None


def round_trip_check(handed: list, ids: torch.Tensor, trust: bool, shipped: bool = False) -> Check:
    """save_pretrained, reload (through the saved code when ``shipped``): the same tensors and logits
    (``_round_trip_check``). ``handed``: a one-item list holding the model, emptied once the model is saved, so that a
    caller that keeps no other reference to it has let it go before the reload: what the reload must give back is
    kept as each tensor's digest, and the two models are never in memory at once (they were: twice the float32
    weights)."""
    try:
        model = handed.pop()
        logits = _logits(model, ids)
        before = _tensor_digests(model.state_dict())
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = None
            release_memory()
            reloaded, _ = _load(Path(tmp), trust_remote_code=trust, shipped=shipped)
            again = _logits(reloaded, ids)
    except Exception as exc:  # noqa: BLE001
        if disk_problem(exc):  # the machine's temp disk, not the model: no verdict (it read as the base's failure, exit 0)
            raise MachineError(f"cannot run the round-trip check: saving the model into {tempfile.gettempdir()} failed "
                               f"({one_line(exc, 160)}); {temp_disk_advice(exc)}, and run again") from None
        return Check("round-trip", False, f"save_pretrained + reload fails: {one_line(exc, 300)}")
    return _round_trip_check(before, _tensor_digests(reloaded.state_dict()), logits, again)


def _tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Each tensor's (dtype, shape, SHA-256 of its bytes), by name: equal digests are the same tensor bit for bit."""
    digests = tensor_sha256s(tensors)
    return {name: (t.dtype, tuple(t.shape), digests[name]) for name, t in tensors.items()}


# ----------------------------------------------------------------------------------------------
# Rows of a batch are independent

BATCH_ROWS, BATCH_LEN = 3, 12
BATCH_RTOL = 1e-4  # of the logits' scale: float rounding of differently shaped matmuls is ~1e-6 of it


def _row_ids(vocab: int, rows: int = BATCH_ROWS, length: int = BATCH_LEN) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


@contextmanager
def opened(model):
    """The model with every all-zero floating weight (ndim >= 2: an identity block's zeroed output
    projections, a memory block's zero-initialised values) filled with seeded random values
    (normal, std 1/sqrt(last dim)), restored on exit; yields how many were filled.

    A branch that adds exact zeros hides what its block does with the rows of a batch or with the
    KV cache; opened, every inserted block computes something, as it will after training."""
    filled = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and param.is_floating_point() and not param.any():
                generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                filled.append((param, param.detach().clone()))  # bit for bit back, -0.0 included
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)
    try:
        yield len(filled)
    finally:
        with torch.no_grad():
            for param, original in filled:
                param.copy_(original)


def _batch_differences(model, rows: torch.Tensor) -> tuple[float, str, float] | str:
    """(max |difference|, where, max |logit| alone) between the rows' logits in batches and alone,
    or one line saying at which batch size the forward pass fails."""
    alone = []
    for r in range(len(rows)):
        try:
            alone.append(_logits(model, rows[r:r + 1]))
        except Exception as exc:  # noqa: BLE001 - a model that cannot run is the check's result
            return f"the forward pass fails at batch size 1: {one_line(exc, 300)}"
    alone_t = torch.cat(alone)
    worst, where = 0.0, ""
    for order in ([0, 1], [1, 0], [0, 1, 2], [2, 0, 1]):
        try:
            got = _logits(model, rows[order])
        except Exception as exc:  # noqa: BLE001
            return f"the forward pass fails at batch size {len(order)}: {one_line(exc, 300)}"
        diff = float((got - alone_t[order]).abs().max())
        if not diff <= worst:  # NaN too
            worst, where = diff, f"batch size {len(order)}, rows {order}"
    return worst, where, float(alone_t.abs().max())


def batch_check(model, vocab: int) -> Check:
    """Each row's logits, in batches of 1, 2 and 3 rows and with the rows permuted, must be those
    of the row run alone, up to float rounding: ``BATCH_RTOL`` x max(1, max |logit|); as loaded,
    and ``opened`` (zero branches filled).

    A block that mixes rows passes every check made on one batch: a tensor unpacked as if it were
    a tuple (``h, _ = mlp(h)``) splits a batch of 2 along its rows, and ``mlp(h)[0]`` broadcasts
    row 0's output to every row. At batch sizes 1 or 3 the first fails outright; the second adds
    the same zeros to every row until its branch is opened.
    """
    rows = _row_ids(vocab)
    worst, tol = 0.0, 0.0
    for fill in (False, True):
        with opened(model) if fill else nullcontext() as filled:
            label = f"with its {filled} all-zero weights filled" if fill else "as loaded"
            found = _batch_differences(model, rows)
            if isinstance(found, str):
                return Check("batch", False, f"{found} ({label})")
            diff, at, scale = found
            this_tol = BATCH_RTOL * max(1.0, scale)
            if not diff <= this_tol:
                return Check("batch", False, f"a row's logits depend on the other rows of the batch ({at}, {label}): max |difference| from "
                                             f"the row run alone {diff:.3g} > tolerance {this_tol:.3g} ({BATCH_RTOL:g} x max(1, max |logit|))")
            worst, tol = max(worst, diff), max(tol, this_tol)
    return Check("batch", True, f"each row's logits at batch sizes 1, 2, 3 (rows also permuted), as loaded and with the all-zero weights filled, "
                                f"equal the row's alone: max |difference| {worst:.3g} (tolerance {BATCH_RTOL:g} x max(1, max |logit|), at most {tol:.3g})")


# ----------------------------------------------------------------------------------------------
# The identity away from the base's init

PERTURB_SCALE = 0.5  # norm weights ~1 +- 0.5, biases ~0 +- 0.5: far from any init


def _delta(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The perturbation of base tensor ``name``: the same whichever model, and whenever, it is drawn."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (PERTURB_SCALE * torch.randn(tensor.shape, generator=generator)).to(tensor.dtype)


def _base_name(name: str, layers_path: str, layer_source: dict[int, int]) -> str:
    """The base tensor output tensor ``name`` was made from (the same name outside the decoder layers)."""
    prefix = layers_path + "."
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    if not index.isdigit() or int(index) not in layer_source:
        return name
    return f"{prefix}{layer_source[int(index)]}.{rest}"


def _zeroed_out_biases(plan: dict, layers_path: str) -> set[str]:
    """The output's tensors that are biases added after a branch's output projection (``out_biases``:
    JetMoE's) in its identity and memory blocks: zero by the surgery's rule, not copies."""
    from midus_surgery.recipe.anatomy_spec import Anatomy, StackAnatomy

    stack = StackAnatomy.model_validate(plan["block_kinds"]) if plan.get("block_kinds") else None
    single = Anatomy.model_validate(plan["anatomy"]) if plan.get("anatomy") else None
    names = set()
    for entry in plan["layers"]:
        if entry["kind"] not in ("identity", "memory"):
            continue
        anatomy = single or (stack.kind_of(int(entry["source"])).anatomy if stack else None)
        names |= {f"{layers_path}.{entry['index']}.{bias}" for bias in (anatomy.out_biases if anatomy else ())}
    return names


def _zeroed_with_its_module(name: str, out_nonzero: dict[str, bool], base_sd: dict, base_name: str) -> bool:
    """An all-zero bias whose module's weight the surgery zeroed (an identity block's output
    projection): zero by the surgery's rule, not a copy, though a base at its init has a zero bias
    there too. A norm's bias (its weight copied) is a copy, and moves with the base."""
    for suffix, weight in ((".bias", ".weight"), ("_bias", "")):
        if name.endswith(suffix):
            out_nonzero_weight = out_nonzero.get(name[: -len(suffix)] + weight)
            w_base = base_sd.get(base_name[: -len(suffix)] + weight)
            if out_nonzero_weight is False and w_base is not None and w_base.any():
                return True
    return False


PERTURBED = "identity (perturbed)"
NO_LAYER_MAP = "no midus_plan.json, so which base layer each layer copies is not known"


@dataclass
class Norms:
    """What the perturbed identity check needs of the output once it is let go: its 1-D floating parameters
    (norm weights, biases; each tied tensor once, under its first name), and, per tensor name, whether any of it is
    nonzero (an all-zero bias beside a zeroed weight is the surgery's, not a copy)."""

    tensors: dict[str, torch.Tensor]
    nonzero: dict[str, bool]


@torch.no_grad()
def _norms_and_zeros(model) -> Norms:
    state = model.state_dict(keep_vars=True)
    tensors, seen = {}, set()
    for name, tensor in state.items():
        if isinstance(tensor, torch.nn.Parameter) and tensor.ndim == 1 and tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = tensor.detach().clone()
    return Norms(tensors, {name: bool(tensor.any()) for name, tensor in state.items()})


@dataclass
class Moves:
    """The copies the perturbed identity check moves: the output's tensors by name, each with the base name whose
    seeded amount it gets, and the base's perturbed logits (how many base tensors moved: ``base_count``)."""

    output: dict[str, str]
    base_count: int
    base_logits: torch.Tensor


def _copies_to_move(norms: Norms, base_model, plan: dict) -> tuple[dict[str, str], list[tuple[torch.Tensor, str]]] | Check:
    """The output's norm weights and biases that are copies of a base tensor (by the plan's layer map, equal bit for
    bit), each with the base name whose amount it gets, and the base tensors themselves: both move by the same amount.
    Tensors the surgery changed (zeroed copies) stay as they are, as a surgery of the perturbed base would leave them."""
    base_sd = base_model.state_dict(keep_vars=True)
    layers_path = plan.get("layers_path") or guess_layers_path(dict.fromkeys(norms.nonzero), len(plan["layers"]))
    if not layers_path:
        return _skip(PERTURBED, "the plan does not say where the decoder layers are")
    layer_source = {int(layer["index"]): int(layer["source"]) for layer in plan["layers"]}
    zeroed_biases = _zeroed_out_biases(plan, layers_path)
    canonical: dict[int, str] = {}  # a tied base tensor is perturbed once, by its first name's amount
    for bname, tensor in base_sd.items():
        canonical.setdefault(id(tensor), bname)

    moves: dict[str, str] = {}  # output name -> base name whose amount it gets
    base_moves: dict[int, tuple[torch.Tensor, str]] = {}
    for oname, tensor in norms.tensors.items():
        bname = _base_name(oname, layers_path, layer_source)
        btensor = base_sd.get(bname)
        if btensor is None or btensor.shape != tensor.shape or not torch.equal(btensor, tensor):
            continue  # new, or changed by the surgery: a surgery of the perturbed base leaves it so
        if not tensor.any() and (oname in zeroed_biases or _zeroed_with_its_module(oname, norms.nonzero, base_sd, bname)):
            continue
        key = canonical[id(btensor)]
        moves[oname] = key
        base_moves[id(btensor)] = (btensor, key)
    if not moves:
        return _skip(PERTURBED, "no norm weight or bias of the output is a copy of the base's")
    return moves, list(base_moves.values())


@torch.no_grad()
def _perturbed_logits(model, moved: list[tuple[torch.Tensor, str]], ids: torch.Tensor) -> torch.Tensor:
    """The model's logits with each tensor of ``moved`` moved by its key's seeded amount; restored after, bit for bit."""
    saved = [(tensor, tensor.detach().clone()) for tensor, _ in moved]
    try:
        for tensor, key in moved:
            tensor.data.add_(_delta(key, tensor))
        return _logits(model, ids)
    finally:
        for tensor, original in saved:
            tensor.data.copy_(original)


def _output_moved(model, moves: dict[str, str]) -> list[tuple[torch.Tensor, str]]:
    state = model.state_dict(keep_vars=True)
    return [(state[name], key) for name, key in moves.items()]


def _perturbed_result(diff: float, moves: Moves) -> Check:
    return Check(PERTURBED, diff == 0.0,
                 f"max |logit difference| against the base with {moves.base_count} of its norm weights and biases moved by "
                 f"{PERTURB_SCALE:g} x N(0, 1) in both models ({len(moves.output)} tensors of the output): {diff:g} (must be 0: an inserted "
                 f"block may not be the identity only at the base's init)")


def _failed_forward(exc: Exception) -> Check:
    return Check(PERTURBED, False, f"the forward pass fails with perturbed norms and biases: {one_line(exc, 300)}")


def _base_perturbed(base_model, plan: dict, norms: Norms, ids: torch.Tensor) -> Moves | Check:
    """The base half of the perturbed identity check (the output is not in memory): which copies move, and the base's
    logits with its own moved; a Check when there is nothing to compare or the base fails to run."""
    found = _copies_to_move(norms, base_model, plan)
    if isinstance(found, Check):
        return found
    moves, base_moved = found
    try:
        return Moves(moves, len(base_moved), _perturbed_logits(base_model, base_moved, ids))
    except Exception as exc:  # noqa: BLE001
        return _failed_forward(exc)


def _output_perturbed(out: Path, trust: bool, shipped: bool, moves: Moves, ids: torch.Tensor) -> Check:
    """The output half, with the base let go: the output loaded again, its copies moved as the base's were."""
    try:
        model, _ = _load(out, trust_remote_code=trust, shipped=shipped)
    except Exception as exc:  # noqa: BLE001 - it loaded a moment ago: out of memory, or the folder changed
        why = "out of memory" if isinstance(exc, MemoryError) else load_error_line(exc, 300)
        return Check(PERTURBED, False, f"the output could not be loaded again to compare ({why})")
    try:
        logits = _perturbed_logits(model, _output_moved(model, moves.output), ids)
    except Exception as exc:  # noqa: BLE001
        return _failed_forward(exc)
    return _perturbed_result(float((logits - moves.base_logits).abs().max()), moves)


def perturbed_identity_check(model, base_model, plan: dict | None, ids: torch.Tensor) -> Check:
    """The identity check again, with every 1-D floating parameter of the output that is a copy of
    a base tensor (norm weights, biases; by the plan's layer map) moved by the same seeded random
    amount in both models. A trained base's norms are not at their init (weights 1, biases 0): an
    inserted block that is the identity only there (a post-norm whose bias survives a zeroed
    branch, a branch silenced through a bias that happens to be 0) fails. Tensors the surgery
    changed (zeroed copies) stay as they are, as a surgery of the perturbed base would leave them.
    Bit-exact, like the identity check: an identity block adds exact zeros; everything else runs
    the same operations on the same numbers in both models. Both models are restored afterwards.

    ``verify`` runs the same steps with only one of the two models in memory at a time (``_base_perturbed``, then
    ``_output_perturbed``); this is them with both at hand."""
    if plan is None:
        return _skip(PERTURBED, NO_LAYER_MAP)
    moves = _base_perturbed(base_model, plan, _norms_and_zeros(model), ids)
    if isinstance(moves, Check):
        return moves
    try:
        logits = _perturbed_logits(model, _output_moved(model, moves.output), ids)
    except Exception as exc:  # noqa: BLE001
        return _failed_forward(exc)
    return _perturbed_result(float((logits - moves.base_logits).abs().max()), moves)


def _disk_tensors(path: Path):
    """(name, tensor) of every tensor in an output's safetensors files, one at a time."""
    from safetensors import safe_open

    for file in _safetensors_files(path):
        with safe_open(str(path / file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


# keys the config train records always holds (TrainConfig's required fields, and freeze, which the weights check reads);
# named here, as emit does not import train (tests/test_package_layout.py)
TRAIN_CONFIG_KEYS = ("init_from", "run_dir", "data", "tokens", "freeze")


def train_record(out: Path) -> tuple[bool, str | None]:
    """(whether ``out`` holds the record `midus-surgery train` writes on export, why its midus_train.json is not that record).
    A trained export's weights are no longer the base's, so identity and most of the weights check are skipped for it: the
    record is believed only in the shape train writes it (steps, tokens, its config), and not where the folder's marker says
    apply wrote the folder (an empty midus_train.json beside changed base layers passed every check)."""
    from midus_surgery.io.output_dir import EXPORT_KIND, MARKER, read_marker

    path = out / "midus_train.json"
    if not path.exists():
        return False, None
    try:
        summary = loads_checked(read_small_text(path))
    except (OSError, ValueError) as exc:
        return False, f"midus_train.json does not read ({load_error_line(exc, 120)})"
    if not (isinstance(summary, dict) and all(isinstance(summary.get(k), int) and not isinstance(summary.get(k), bool)
                                              for k in ("steps", "tokens")) and isinstance(summary.get("config"), dict)
            and all(k in summary["config"] for k in TRAIN_CONFIG_KEYS)):
        return False, "midus_train.json is not the record `midus-surgery train` writes (its steps, tokens and config)"
    if summary["steps"] < 1 or summary["tokens"] < 1:  # a run of no steps changed no weight (trial104: it excused every change)
        return False, (f"midus_train.json records {summary['steps']} steps and {summary['tokens']} tokens: a run of no steps "
                       "changed no weight, so it excuses none")
    marker = read_marker(out)
    if marker is not None and marker.get("kind") != EXPORT_KIND:
        return False, (f"midus_train.json says a training run exported this folder, but its {MARKER} marker says "
                       f"{printable(str(marker.get('kind')))[:40]!r} wrote it")
    return True, None


def _untrained_since_apply(out: Path, config: dict) -> tuple[str | None, str]:
    """What of a trained export no run has trained ("base", "all but memory"), as midus_train.json
    records it, or None and why its weights cannot be compared with the base's."""
    try:
        summary = loads_checked(read_small_text(out / "midus_train.json"))
    except (OSError, ValueError):
        summary = None
    kept = summary.get("unchanged_since_apply") if isinstance(summary, dict) else None
    if kept not in ("base", "all but memory"):
        return None, "trained since apply, so its weights are no longer the base's"
    stored, started = config.get("dtype"), summary.get("init_dtype")
    if stored != started:  # a frozen tensor written in another dtype than it started in: not the base's bits
        return None, f"trained since apply, and exported as {stored} from a {started} start, so even its frozen weights are not the base's bits"
    return kept, ""


def weights_check(out: Path, base_model, plan: dict, left_alone: str | None = None) -> Check:
    """Every tensor of the output that the plan's layer map traces to a base tensor is that tensor,
    bit for bit (the base rounded to the output's dtype): the copies a DUS layer map promises, and
    the base layers themselves. The logit checks cannot say this for plain copies (they change the
    function), and a same-vocabulary model that is not the base would pass them. The surgery's own
    changes are allowed where it makes them: in identity and memory blocks, a tensor it zeroed (an
    output projection) or reshaped, and tensors with new names (the memory).

    The output's tensors are read as written (apply writes the model's own names), the base's as
    loaded and not yet run: some models rescale their weights by layer index in their first
    forward pass (RWKV), so a loaded copy and its source differ once run, though the files agree.

    ``left_alone``: a trained export's frozen part ("base": every layer apply inserted trained; "all
    but memory": the memory tables trained), the only tensors compared."""
    name = "weights"
    base_sd = base_model.state_dict()
    layers_path = plan.get("layers_path") or guess_layers_path(dict.fromkeys(_file_tensor_names(out)), len(plan["layers"]))
    if not layers_path:
        return _skip(name, "the plan does not say where the decoder layers are")
    layer_source = {int(layer["index"]): int(layer["source"]) for layer in plan["layers"]}
    inserted = {int(layer["index"]) for layer in plan["layers"] if layer["kind"] in ("identity", "memory")}
    prefix = layers_path + "."
    trained_layers = {int(layer["index"]) for layer in plan["layers"] if is_inserted(layer)} if left_alone == "base" else set()

    def trained(oname: str) -> bool:
        if left_alone == "all but memory":
            return is_memory_parameter(oname)
        return _layer_of(oname, prefix) in trained_layers

    def in_inserted_block(oname: str) -> bool:
        return _layer_of(oname, prefix) in inserted

    same = changed_by_surgery = 0
    differ: list[str] = []
    skipped_trained = 0
    for oname, tensor in _disk_tensors(out):
        btensor = base_sd.get(_base_name(oname, layers_path, layer_source))
        if btensor is None:
            continue  # a tensor of the surgery's own (the memory), or a name the base does not have
        if trained(oname):
            skipped_trained += 1
            continue
        if btensor.shape == tensor.shape and torch.equal(btensor.to(tensor.dtype), tensor):
            same += 1
        elif in_inserted_block(oname) and (btensor.shape != tensor.shape or not tensor.any()):
            changed_by_surgery += 1
        else:
            differ.append(oname)
    if differ:
        # in identity and memory blocks a tensor may be the zeros apply wrote in place of the copy (trial52: an edited
        # zeroed down_proj was said to differ from what it "copies")
        # not where apply wrote no zeros (trial55: LoRA merged into the attention of random-init memory blocks): it zeroes
        # identity blocks' output projections, and a memory block's attention output only when it keeps it (query_source: hidden)
        hidden = ((plan.get("midus") or {}).get("hml") or {}).get("query_source") == "hidden"
        zeroing = {int(layer["index"]) for layer in plan["layers"] if layer["kind"] == "identity" or (layer["kind"] == "memory" and hidden)}
        zeros = (" or, in identity blocks, from the zeros apply wrote" + (" (and in memory blocks)" if hidden else "")
                 if any(_layer_of(n, prefix) in zeroing for n in differ) else "")
        return Check(name, False, f"{len(differ)} of the output's tensors differ from the base tensors the layer map says they copy{zeros} "
                                  f"(e.g. {', '.join(differ[:3])}); {same} are equal: this is not the base the output was made from, "
                                  "or the output was changed since apply")
    if not same:
        return Check(name, False, "no tensor of the output has a counterpart of the same name in the base: it is not this output's base")
    zeroed = f", {changed_by_surgery} zeroed or reshaped in identity and memory blocks" if changed_by_surgery else ""
    frozen = f" (trained since apply with freeze: {'base' if left_alone == 'base' else 'memory-only'}: the {skipped_trained} trained tensors left out)" if left_alone else ""
    return Check(name, True, f"{same} tensors equal, bit for bit, the base tensors the layer map says they copy{zeroed}{frozen}")


def config_check(out_config, base_config, plan: dict) -> Check | None:
    """Every per-layer list of the output's config (``layer_types``, ``no_rope_layers``, layer-index lists such as
    ``mlp_only_layers``) is the base's, remapped through midus_plan.json's layer map by the planner's own rule
    (``compiler.plan.remap_per_layer``): a copy of a sliding-window layer written as full attention runs another
    model, and no other check sees it (an identity block's output is zero whatever its window; DUS has no
    reference to compare logits with: trial106 F2). Both configs as their classes load them, as the model runs them.
    None when the base config has no per-layer list: nothing for the layer map to rewrite, nothing to report."""
    from midus_surgery.anatomy.config_lists import list_kinds
    from midus_surgery.compiler.layout import LayerSpec
    from midus_surgery.compiler.plan import index_list_keys, remap_per_layer

    name = "config"
    layers = [LayerSpec(int(layer["index"]), int(layer["source"]), str(layer["kind"])) for layer in plan["layers"]]
    base, out = base_config.to_dict(), out_config.to_dict()
    try:
        depth = base_config.num_hidden_layers
        expected, _ = remap_per_layer(base, depth, layers, list_kinds(base_config))
    except Exception as exc:  # noqa: BLE001 - a base config the planner's rule cannot read: said, not a traceback
        return _skip(name, f"the base's config lists cannot be remapped to compare: {one_line(exc, 200)}")
    index_lists = set(index_list_keys(base, depth))
    compared = []
    for key, want in expected.items():
        if not isinstance(want, list):  # a restated scalar (an index rule's period) or transformers' per-layer overrides
            continue
        got = out.get(key)
        got = list(got) if isinstance(got, (list, tuple)) else got
        if got == want:
            compared.append(key)
            continue
        if key not in index_lists and isinstance(got, list) and len(got) == len(want) == len(layers):
            i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
            return Check(name, False, f"config.json's {key} gives output layer {i} {got[i]!r}, but the layer map makes it from base layer "
                                      f"{layers[i].source}, whose entry is {want[i]!r} (config.json edited, or written wrong)")
        return Check(name, False, f"config.json's {key} is {one_line(repr(got), 200)}, but the base's {one_line(repr(base.get(key)), 200)} through "
                                  f"the layer map is {one_line(repr(want), 200)} (config.json edited, or written wrong)")
    if not compared:  # no row: a PASS would claim a check that compared nothing (a SKIP row on every Llama reads as a gap)
        return None
    return Check(name, True, f"{', '.join(compared)}: each output layer has its source layer's entry, as the layer map says")


# ----------------------------------------------------------------------------------------------
# KV cache with a left-padded batch

PADDED_NEW_TOKENS, PADDED_LONG, PADDED_SHORT = 8, 8, 5


def _pad_id(model, vocab: int) -> int:
    """The model's pad id (else its eos id) when inside the vocabulary, else 0."""
    for source in (model.config, getattr(model, "generation_config", None)):
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(source, key, None)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int) and 0 <= value < vocab:
                return value
    return 0


@torch.no_grad()
def padded_cache_check(model, vocab: int) -> Check:
    """Greedy generation for a left-padded batch of two prompts of different lengths, with and
    without the KV cache, must agree token for token, and each row must be what its prompt gives
    alone (a model that ignores the attention mask, or a cache path that breaks only on padded
    rows, fails); as loaded, and ``opened`` (a zero branch hides its block's cache)."""
    pad = _pad_id(model, vocab)
    rows = _row_ids(vocab, 2, PADDED_LONG)
    rows[rows == pad] = (pad + 1) % vocab  # no pad token inside a prompt
    tokens = None
    for fill in (False, True):
        with opened(model) if fill else nullcontext():
            problem, got = _padded_generation(model, rows, pad)
        if problem:
            return Check("kv-cache (padded batch)", False, f"{problem} ({'with the all-zero weights filled' if fill else 'as loaded'})")
        tokens = tokens if tokens is not None else got
    return Check("kv-cache (padded batch)", True,
                 f"greedy generation for a left-padded batch of 2 (prompts of {PADDED_LONG} and {PADDED_SHORT} tokens, pad id {pad}) agrees with "
                 f"and without KV cache and with each prompt alone, as loaded and with the all-zero weights filled: {tokens}")


def _padded_generation(model, rows: torch.Tensor, pad: int) -> tuple[str | None, list]:
    """(what is wrong or None, the batch's new tokens) for ``padded_cache_check``."""
    cut = PADDED_LONG - PADDED_SHORT
    input_ids = rows.clone()
    input_ids[1, :cut] = pad
    mask = torch.ones_like(input_ids)
    mask[1, :cut] = 0
    kwargs = dict(max_new_tokens=PADDED_NEW_TOKENS, min_new_tokens=PADDED_NEW_TOKENS, do_sample=False, pad_token_id=pad,
                  return_dict_in_generate=True, output_logits=True)
    try:
        cached = _generated(model.generate(input_ids, attention_mask=mask, use_cache=True, **kwargs))
        uncached = _generated(model.generate(input_ids, attention_mask=mask, use_cache=False, **kwargs))
        each = [_generated(model.generate(prompt, attention_mask=torch.ones_like(prompt), use_cache=True, **kwargs))
                for prompt in (rows[:1], rows[1:, cut:])]
    except Exception as exc:  # noqa: BLE001
        return f"generation for a left-padded batch of 2 fails: {one_line(exc, 300)}", []
    alone = (torch.cat([e[0] for e in each]), torch.cat([e[1] for e in each], dim=1))
    if not _same_greedy(cached, uncached):
        return f"greedy generation for a left-padded batch of 2 DIFFERS with and without KV cache (pad id {pad}): {cached[0].tolist()} vs {uncached[0].tolist()}", []
    if not _same_greedy(cached, alone):
        return f"greedy generation for a left-padded batch of 2 DIFFERS from each prompt's alone (pad id {pad}): {cached[0].tolist()} vs {alone[0].tolist()}", []
    return None, cached[0].tolist()


def _generated(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens [B, T], their raw logits [T, B, V]) of a generate() with return_dict_in_generate
    (raw: the processed scores hold -inf where min_new_tokens bans the eos)."""
    logits = torch.stack([s.float() for s in out.logits])
    return out.sequences[:, -logits.shape[0]:], logits


def _same_greedy(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Two greedy generations agree: the same tokens, or the same up to a step where both runs'
    scores are equal within float rounding and the top two are a near-tie (argmax may then go
    either way: random tiny models have many; after it, the runs have different inputs)."""
    tokens_a, scores_a = a
    tokens_b, scores_b = b
    for row in range(tokens_a.shape[0]):
        differ = (tokens_a[row] != tokens_b[row]).nonzero()
        if len(differ) == 0:
            continue
        t = int(differ[0])
        sa, sb = scores_a[t, row], scores_b[t, row]
        scale = max(1.0, float(sa.abs().max()))
        if not float((sa - sb).abs().max()) <= BATCH_RTOL * scale:  # NaN too
            return False  # the scores themselves differ: not rounding
        top = torch.topk(sa, 2).values
        if float(top[0] - top[1]) > 2 * BATCH_RTOL * scale:
            return False
    return True


def _stock_instance_fails(model_class, config, check, seeds: tuple[int, ...] = (0, 1)) -> bool:
    """Whether a freshly initialised model of the same class and config fails ``check`` too (at any
    of ``seeds``): then the architecture's own generation code does (CpmAnt's cache with left
    padding, at some random weights), and the output is not to blame. Stock architectures only: a
    MIDUS model's memory code is the surgery's own, so a fresh instance failing proves nothing."""
    if any(cls.__name__ == "MidusForCausalLM" for cls in model_class.__mro__):
        return False
    state = torch.random.get_rng_state()
    try:
        for seed in seeds:
            torch.manual_seed(seed)
            fresh = model_class(config).eval()
            if not check(fresh).ok:
                return True
    except Exception:  # noqa: BLE001 - a class that does not build from its config alone: no verdict
        return False
    finally:
        torch.random.set_rng_state(state)
    return False


@torch.no_grad()
def cache_check(model, prompt: torch.Tensor, tokenizer) -> Check:
    """Greedy generation of one prompt with and without the KV cache must agree token for token."""
    eos = getattr(model.config, "eos_token_id", None)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=eos if isinstance(eos, int) else None,
                  return_dict_in_generate=True, output_logits=True)
    try:
        cached = _generated(model.generate(prompt, use_cache=True, **kwargs))
        uncached = _generated(model.generate(prompt, use_cache=False, **kwargs))
    except Exception as exc:  # noqa: BLE001
        return Check("kv-cache", False, f"generation fails: {one_line(exc, 300)}")
    ids = cached[0][0].tolist()
    text = tokenizer.decode(cached[0][0]) if tokenizer is not None else ""
    # ids the tokenizer has no text for decode to '' (trial51): then the ids themselves say what was generated
    shown_text = repr(text) if text.strip() else f"ids {ids}"
    same = cached[0].shape == uncached[0].shape and _same_greedy(cached, uncached)
    return Check("kv-cache", same, f"greedy generation with and without KV cache {'agree' if same else 'DIFFER'}: {shown_text}")


def _round_trip_check(before: dict, after: dict, logits: torch.Tensor, again: torch.Tensor) -> Check:
    """save_pretrained + reload must give back every tensor bit for bit (``before`` and ``after``: their
    ``_tensor_digests``), and the same function.

    The logits may differ by float rounding alone: transformers saves a MoE's stacked experts one
    tensor per expert and stacks them again on load, at other memory alignments, and the CPU
    kernels round differently on differently aligned data (~1e-7 in fp32).
    """
    changed = sorted(set(before) ^ set(after)) or [k for k in before if before[k] != after[k]]
    if changed:
        return Check("round-trip", False, f"save_pretrained + reload changed {len(changed)} tensors, e.g. {changed[0]}")
    diff = float((logits - again).abs().max())
    if diff == 0.0:
        return Check("round-trip", True, "save_pretrained + reload gives identical tensors and logits")
    close = torch.allclose(logits, again, rtol=1e-5, atol=1e-5)
    return Check("round-trip", close, f"save_pretrained + reload gives identical tensors; logits {'within float rounding' if close else 'DIFFER'}: max difference {diff:g}")
