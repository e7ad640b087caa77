"""The emitter: executes a Plan by streaming tensors from the base into output shards.

Memory stays bounded by one tensor plus the memory module being initialised: each shard is
streamed to disk tensor by tensor (``shard_writer``), copied base tensors move file-to-file,
and new tensors are initialised deterministically from the recipe seed and their module's name.
The output directory appears whole or not at all: everything is written into a hidden sibling
directory that is renamed into place at the end, and removed on any failure.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from midus_surgery.compiler.base import BaseRef, resolve_base
from midus_surgery.compiler.custom_code import base_code_entries
from midus_surgery.compiler.plan import PLAN_FILE, Plan, TensorEntry
from midus_surgery.compiler.planned import PlannedRecipe
from midus_surgery.emit.card import write_model_card
from midus_surgery.errors import BaseModelError, MachineError, MidusError, RecipeError, is_library_panic, one_line, printable, quiet_library_panic, shown
from midus_surgery.io.dtypes import DTYPE_OF_TAG, ITEMSIZE, TAGS, torch_dtype
from midus_surgery.io.output_dir import add_to_marker, atomic_directory, check_output_dir, file_system_type, give_default_mode, read_marker
from midus_surgery.io.progress import progress_bar
from midus_surgery.io.shard_writer import ShardItem, write_shard
from midus_surgery.io.small_files import regular_file_problem
from midus_surgery.io.stored_dtypes import is_float_tag
from midus_surgery.io.tensor_source import check_matches_config, inside_base, open_base_tensors
from midus_surgery.io.tokenizer_files import (
    auto_tokenizer_entry,
    auto_tokenizer_files,
    hub_load_warnings,
    tokenizer_code,
    tokenizer_code_problems,
    tokenizer_code_users,
)
from midus_surgery.model import copy_modeling_files
from midus_surgery.model.midus_names import AUTO_MAP, HML_MODULE, SHARED_BANK
from midus_surgery.recipe.schema import LoadedRecipe
from midus_surgery.units import human_bytes

# torch and tqdm are imported where tensors are materialised or a progress bar is drawn: a
# copy-only `apply` whose plan came from the safetensors headers never imports torch.

COPY_WORKERS = 2  # shards written at once when every tensor is a file-to-file copy (see _write_copy_shards_in_parallel)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class EmitResult:
    out_dir: Path
    num_tensors: int
    num_bytes: int
    shards: int
    base_read: str | None = None  # how the base was read when not file by file (TensorSource.how)


def output_dtype(planned: PlannedRecipe) -> str:
    """The dtype name of the written weights ("bfloat16")."""
    wanted = planned.loaded.recipe.output.dtype
    return planned.base_dtype if wanted == "auto" else wanted


def shard_tensors(entries: list[TensorEntry], dtype: str, shard_bytes: int) -> list[list[TensorEntry]]:
    """Greedy, in plan order: a new shard starts when the next tensor would overflow this one."""
    size = ITEMSIZE[TAGS[dtype]]
    shards: list[list[TensorEntry]] = [[]]
    filled = 0
    for entry in entries:
        nbytes = entry.numel * size
        if shards[-1] and filled + nbytes > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += nbytes
    return shards


class MemoryInit:
    """Builds each new memory module once, initialised from (seed, module name), and hands out its tensors."""

    def __init__(self, planned: PlannedRecipe, dtype: str):
        from midus_surgery.model.modeling_midus import _name_seed  # the model's own rule: same seed + name, same bytes

        self._name_seed = _name_seed
        self._planned = planned
        self._dtype = dtype
        self._module_name: str | None = None
        self._tensors: dict = {}  # parameter name -> torch.Tensor

    def _build(self, module_name: str) -> dict:
        from midus_surgery.compiler.plan import build_hml, config_value
        from midus_surgery.model.hml import LatentBank

        mem = self._planned.loaded.recipe.memory
        seed = self._name_seed(self._planned.loaded.recipe.seed, module_name)
        if module_name == SHARED_BANK:
            module = LatentBank(mem.n_subkeys, mem.latent_dim)
            module.reset_parameters(seed=seed, zero=mem.init == "zero_bank")
        else:
            plan = self._planned.plan
            index = module_name[len(plan.layers_path) + 1:].split(".", 1)[0]  # '<layers_path>.<i>.<ffn>.hml'
            block = plan.midus["memory_blocks"][index]
            module = build_hml(config_value(self._planned.config, "hidden_size"), (block["heads"], block["head_dim"]), mem, device="cpu")
            module.reset_parameters(seed=seed)
        return {name: t.detach().to(torch_dtype(self._dtype)) for name, t in module.state_dict().items()}  # buffers too

    def get(self, tensor_name: str):
        if tensor_name.startswith(SHARED_BANK + "."):
            module_name, param = SHARED_BANK, tensor_name[len(SHARED_BANK) + 1:]
        else:
            marker = f".{HML_MODULE}."
            head, _, param = tensor_name.partition(marker)
            module_name = head + f".{HML_MODULE}"
        if module_name != self._module_name:  # plan order keeps a module's tensors together
            self._tensors = self._build(module_name)
            self._module_name = module_name
        return self._tensors[param]


def emitted_config(plan: Plan, dtype: str) -> dict:
    """config.json: the rewritten base config, under model type ``midus`` when it has memory blocks."""
    config = dict(plan.config)
    config.pop("torch_dtype", None)
    config.pop("_name_or_path", None)  # where the base was read from (custom code is found there): not the output's
    config.pop("_model_name_or_path", None)  # transformers' GGUF reader: the GGUF's own model name, not the output's
    config["dtype"] = dtype
    if config.get("num_nextn_predict_layers"):
        # the output carries no multi-token-prediction weights (the causal LM has no modules for them; the plan's config
        # keeps the base's count, which says where they were): a server reading this key would look for missing layers
        config["num_nextn_predict_layers"] = 0
    if not plan.memory_layers:
        if not config.get("architectures") and (named := _causal_lm_class_name(config.get("model_type"))):
            config["architectures"] = named  # a GGUF base's config names none; serving tools read architectures[0]
        return config  # a stock architecture, just deeper
    base_type = config.pop("model_type")
    config.pop("architectures", None)
    return {
        "model_type": "midus",
        "architectures": ["MidusForCausalLM"],
        # MIDUS's classes, and the base's entries that build no model (its own tokenizer: AutoTokenizer): the base's
        # auto_map replaced MIDUS's, and the output loaded only where the package is installed (trial66)
        "auto_map": {**base_code_entries(config.pop("auto_map", None)), **AUTO_MAP},
        "base_model_type": base_type,
        "midus": plan.midus,
        **config,
    }


def _causal_lm_class_name(model_type) -> list[str] | None:
    """[the causal-LM class transformers builds for ``model_type``], or None when it knows none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    return [name] if isinstance(name, str) else None


def _copy_tokenizer(ref, dest: Path, trust_remote_code: bool) -> None:
    if ref.is_gguf:
        from transformers import AutoTokenizer

        try:  # trust_remote_code explicit (the recipe's): with None transformers asks on the terminal whether to run the folder's code
            with quiet_library_panic():
                tokenizer = AutoTokenizer.from_pretrained(ref.directory, gguf_file=ref.gguf_file, trust_remote_code=trust_remote_code)
            _save_tokenizer_without_code(tokenizer, dest)
        except BaseException as exc:  # noqa: BLE001 - a base without a usable tokenizer still emits
            if not isinstance(exc, Exception) and not is_library_panic(exc):
                raise
            why = exc if isinstance(exc, Exception) else one_line(exc, 300, whole=True)  # a panic's own text names no kind
            if trust_remote_code:  # what validate and plan warned of the code, said here too (the load failed on it, maybe)
                for warning in tokenizer_code_left(ref.directory):
                    _warn(warning)
            _warn(f"no tokenizer written (the GGUF's could not be read: {why})")
            return
        if trust_remote_code:  # the code that tokenizer ran: carried as a folder base's is, by the same rule (trial113)
            _copy_tokenizer_code(ref, dest)
        return
    copied = 0
    for name in TOKENIZER_FILES:
        path = ref.directory / name
        if os.path.lexists(path) and not path.is_file():  # a pipe would block the copy, a device never ends
            _warn(f"{name} not copied: the base's {name} is not a regular file (a pipe, a device, a folder or a broken link); "
                  "the output's tokenizer may not load without it")
            continue
        if path.is_file():
            if not _inside(ref, name):
                continue
            shutil.copy2(ref.directory / name, dest / name)
            copied += 1
    if (dest / "tokenizer.json").is_file():
        problem = read_tokenizer_json(dest / "tokenizer.json")[1]
        if problem:  # copied as the base holds it (a newer tokenizers may read it), but said: the card tells users to load it
            _warn(f"the base's tokenizer.json does not load ({problem}); copied as it is, so the output's tokenizer does not "
                  "load either: fix or replace tokenizer.json in the output before using or publishing it")
    if not copied:
        _warn(f"{ref.directory} has no tokenizer files; the output has none either")
    _copy_tokenizer_code(ref, dest)


def _copy_tokenizer_code(ref, dest: Path) -> None:
    """The code the base's tokenizer_config.json names, copied (never imported: it runs only where a user trusts it) by
    tokenizer_code's rule, the one the note and the card name the files by; one warning for each file it leaves behind."""
    for name in tokenizer_code(ref.directory)[0]:
        shutil.copy2(ref.directory / name, dest / name)
    for warning in tokenizer_code_left(ref.directory):
        _warn(warning)


def tokenizer_code_left(directory: Path) -> list[str]:
    """A warning for each code file the base's tokenizer names that apply does not copy (code_file_problem), the one apply
    gives and validate and plan give before it (only apply said it, and the output's tokenizer did not load)."""
    # what the base holds there said, not "missing" for a device or a folder (trial114)
    entry = auto_tokenizer_entry(directory)
    string = ([f"the base's tokenizer_config.json gives auto_map AutoTokenizer as one string ({shown(entry, 80)}), not a "
               "[slow, fast] pair: the output's tokenizer will not load as meant (transformers reads the module named by "
               "its second character)"] if isinstance(entry, str) else [])
    opened, users = auto_tokenizer_files(directory), tokenizer_code_users(directory)

    def what(name: str) -> str:  # what will not load: the output's tokenizer only where AutoTokenizer opens the module
        if name in opened:
            return "the output's tokenizer"
        named = ", ".join(printable(user)[:40] for user in users.get(name, [])[:3])
        return f"code that needs it (auto_map {named})" if named else "code that needs it"

    return string + [f"the base's tokenizer names its own code in {printable(name)[:80]}, which {problem}: "
                     f"not copied, so {what(name)} will not load until a module of that name is beside it"
                     for name, problem in tokenizer_code_problems(directory).items() if problem]


def _save_tokenizer_without_code(tokenizer, dest: Path) -> None:
    """A GGUF base's tokenizer, saved into ``dest`` without the code save_pretrained copies beside it (the caller copies
    that by the rule the note follows). A class name without "Tokenizer" (tok.Tok) is written as a bare string in
    auto_map, which AutoTokenizer cannot read back (trial113): written as the [slow, fast] pair it reads, in the slot
    transformers itself gives a class that is not named ...Fast."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=dest) as saved:
        tokenizer.save_pretrained(saved)
        for path in Path(saved).iterdir():
            if path.suffix != ".py":
                shutil.copy2(path, dest / path.name)
    config = dest / "tokenizer_config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    entry = data.get("auto_map", {}).get("AutoTokenizer") if isinstance(data.get("auto_map"), dict) else None
    if isinstance(entry, str):
        data["auto_map"]["AutoTokenizer"] = [entry, None]
        config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_tokenizer_json(path: Path):
    """(the tokenizers library's Tokenizer of ``path``, None), or (None, why it does not load, in one line).
    The Rust reader runs no code; a file it panics on (trial49: a BPE merge whose result is not in the
    vocabulary) is one that does not load, as transformers' loader, which runs the same reader, fails on it."""
    from tokenizers import Tokenizer

    try:
        with quiet_library_panic():
            return Tokenizer.from_file(str(path)), None
    except BaseException as exc:  # noqa: BLE001 - a tokenizer.json that does not parse is the file's problem, said by the caller
        if not isinstance(exc, Exception) and not is_library_panic(exc):
            raise
        return None, one_line(exc, 300, whole=True)


def _inside(ref, name: str) -> bool:
    """Whether the base's file ``name`` stays inside the base directory; a symlink leading out is
    left behind (with a warning): the output must not carry a file the base does not hold."""
    try:
        inside_base(ref.directory, name, f"the base's {name}")
    except MidusError as exc:
        _warn(f"{name} not copied: {exc}")
        return False
    return True


def _warn(message: str) -> None:
    # companions are written after the progress bar has closed: a plain line on stderr
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _write_generation_config(ref, config_dict: dict, dest: Path) -> None:
    source = ref.directory / "generation_config.json"
    if not ref.is_gguf and source.is_file() and _inside(ref, source.name):
        shutil.copy2(source, dest / "generation_config.json")
        return
    if not ref.is_gguf and os.path.lexists(source) and not source.is_file():
        # a named pipe or a broken link: replaced without a word, the base's generation settings were lost unseen (trial66)
        why = f"{source} is a broken link" if not source.exists() else regular_file_problem(source)
        _warn(f"{why}: the output's generation_config.json is derived from config.json (bos/eos/pad token ids) instead")
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    data = {k: config_dict[k] for k in keys if config_dict.get(k) is not None}
    (dest / "generation_config.json").write_text(json.dumps(data, indent=2) + "\n")


def emit(planned: PlannedRecipe, *, out_dir: Path | None = None, overwrite: bool = False, allow_pickle: bool = False, progress: bool = True) -> EmitResult:
    """Write the up-scaled model. Raises MidusError for anything the user can fix.

    Identity and memory blocks are checked to start as the identity first (replica.py): a recipe
    that would not is refused before anything is written."""
    ref = resolve_base(planned.loaded)
    planned = check_planned(planned)
    out = check_apply_output(planned.loaded, ref, out_dir, overwrite)
    prefixes = planned.plan.name_prefixes
    source = open_base_tensors(ref, allow_pickle=allow_pickle, prefixes=prefixes, model_type=planned.plan.model_type,
                               renames=planned.renames, needed=[t.source for t in planned.plan.tensors if t.source is not None], progress=progress,
                               trust_remote_code=planned.loaded.recipe.base.trust_remote_code)
    try:
        check_tied_copies(planned, source)
        replaced = _replaced_output(planned, out) if overwrite else None
        if replaced:
            _note(replaced)
        with atomic_directory(out, kind="apply", replace=overwrite, report=_note) as tmp:
            num_bytes, shards = _write_weights(planned, source, tmp, progress)
            _write_companions(planned, ref, tmp)
        left = unread_base_tensors(planned, source)
        if left:  # trial41/45: dropped without a word (transformers' load names them in a warning)
            _note(f"note: {left_out_words(left)}")
    finally:
        source.close()
    return EmitResult(out, len(planned.plan.tensors), num_bytes, shards, source.how)


def _replaced_output(planned: PlannedRecipe, out: Path) -> str | None:
    """A note when --overwrite replaces the output of another recipe: it replaces any apply's output, and
    a mistyped --out replaced another model without a word (trial52)."""
    marker = read_marker(out) if out.is_dir() else None
    recipe = str(Path(planned.loaded.source.file).resolve())
    if not marker or marker.get("recipe") in (None, recipe):  # older outputs recorded no recipe: nothing to compare
        return None
    return (f"note: --overwrite replaces {out}, the output of another recipe ({marker['recipe']}, base {marker.get('base_path', '?')}); "
            "the run stops before replacing it if anything fails")


def check_tied_copies(planned: PlannedRecipe, source) -> None:
    """A base whose config ties a tensor to another (the LM head to the embedding) but whose
    checkpoint holds both with different values: transformers loads that base untied, with its own
    head, while the output, tied as the config says, would drop it and compute another function.
    Refused before anything is written; a head saved equal to its source (as .bin checkpoints do) is fine."""
    for target, tied_to in planned.tied:
        if source.resolve(target) is None or source.resolve(tied_to) is None:
            continue
        import torch  # only here: the header planner's path imports no torch

        if not torch.equal(source.get(target), source.get(tied_to)):
            raise BaseModelError(f"the base's config ties {target} to {tied_to} (tie_word_embeddings: true), but its checkpoint holds "
                                 f"both, with different values: transformers loads it untied, and an output that follows the config "
                                 f"would drop {target} and compute another function. If the stored {target} is the one the model was "
                                 "trained with, set tie_word_embeddings: false in the base's config.json (as transformers' own warning "
                                 "asks), then apply again")


def check_planned(planned: PlannedRecipe) -> PlannedRecipe:
    """``planned`` checked to keep the base's function where it promises to (replica.py); what
    ``validate`` and ``plan`` run too, and ``emit`` before it writes."""
    from midus_surgery.emit.replica import check_function_preserving

    check_base_code(planned)
    return check_function_preserving(planned, emit)


def check_base_code(planned: PlannedRecipe) -> None:
    """The base code the output carries, refused where apply would refuse it (base_code_in_output raises), so validate and
    plan refuse it too, before they say OK (trial113). And a MIDUS output ships MIDUS's modeling files; base code the output
    carries under one of their names (a tokenizer module's `from .hml import X`, a config.json auto_map entry) was copied
    over it, and loading the output as a model ran the base's file (trial113). Refused before anything is written, and
    compared case-folded: on macOS's and Windows' file systems, where outputs are used, HML.py is hml.py (trial114)."""
    from midus_surgery.compiler.custom_code import base_code_in_output
    from midus_surgery.model.midus_names import MODELING_FILES

    files, _ = base_code_in_output(resolve_base(planned.loaded), planned.plan, planned.loaded.recipe.base.trust_remote_code)
    if not planned.plan.memory_layers:
        return
    ours = {name.casefold() for name in MODELING_FILES}
    clash = sorted(name for name in files if name.casefold() in ours)
    if clash:
        raise BaseModelError(f"the base has code of its own named like MIDUS's modeling files ({', '.join(printable(n) for n in clash)}), "
                             "which a MIDUS output ships under those names: rename the base's file (and its imports), then apply again")


def check_apply_output(loaded: LoadedRecipe, ref: BaseRef, out_dir: Path | None, overwrite: bool, probe: bool = True) -> Path:
    """The resolved output directory, checked against the output-safety rule (output_dir.py) before any work.
    probe=False: without the probe folder, for ``validate``, which writes nothing."""
    out = Path(out_dir) if out_dir is not None else loaded.resolve(loaded.recipe.output.dir)
    base = ref.directory / ref.gguf_file if ref.is_gguf else ref.directory  # a GGUF's neighbours are not the base
    inputs = [("the base model", base), ("the recipe", Path(loaded.source.file))]
    if loaded.recipe.base.config is not None:
        inputs.append(("the base config", loaded.resolve(loaded.recipe.base.config)))
    return check_output_dir(out, kind="apply", inputs=inputs, folders=[("the recipe's folder", loaded.directory)], overwrite=overwrite,
                            probe=probe)


def left_out_words(left: list[str]) -> str:
    """apply's note (and validate's) on the base tensors the output holds nothing of."""
    return (f"{len(left)} tensor(s) of the base that its architecture does not have are left out of the output, as transformers' "
            f"load leaves them out: {', '.join(shown(n) for n in left[:3])}{', ...' if len(left) > 3 else ''}")


def unread_base_tensors(planned: PlannedRecipe, source) -> list[str]:
    """The base checkpoint's tensors the output holds nothing of, less those a layout leaves out on purpose
    (allow_dropped_layers) and a tied LM head (the output ties it again)."""
    plan = planned.plan
    read = {source.resolve(t.source) for t in plan.tensors if t.source is not None}
    dropped = tuple(f"{plan.layers_path}.{i}." for i in plan.dropped_layers)
    tied = bool(plan.config.get("tie_word_embeddings"))
    return sorted(key for key, names in source.checkpoint_names().items()
                  if key not in read and not any(n.startswith(dropped) for n in names) and not (tied and names[0].endswith("lm_head.weight")))


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# File systems whose copy_file_range shares a file's blocks with its copy (reflinks) by default instead of writing them
# again: XFS made with reflink=1 (mkfs.xfs's default since 2019). ZFS's block cloning is off unless enabled (trial97 F6).
REFLINK_FILE_SYSTEMS = frozenset({"btrfs", "xfs", "bcachefs"})


def _check_room(shard_items: list, tmp: Path, base: Path) -> None:
    """Refuse, before writing, an output larger than its disk's free space (a 195 GiB apply wrote until a shared disk was
    full: trial93 F4). Only where the base's own file system can share copied blocks (reflinks: btrfs, XFS) may the
    copied tensors take no room, and there only the produced ones (cast, initialised, new) must fit for certain: a
    shortfall of the rest is a note. ext4, tmpfs and overlayfs write every byte again (trial95 F2: a note, then a full disk)."""
    total = sum(item.nbytes for items in shard_items for item in items)
    free = shutil.disk_usage(tmp).free
    if total <= free:
        return
    need = f"the output's weights take {human_bytes(total)} and the disk holding {tmp.parent} has {human_bytes(free)} free"
    produced = sum(item.nbytes for items in shard_items for item in items if item.bytes_from is None)
    kind = file_system_type(tmp)
    if _on_one_disk(base, tmp) and kind in REFLINK_FILE_SYSTEMS and produced <= free:
        _note(f"note: {need}; it fits only if {kind} shares the blocks copied from the base (reflinks)")
        return
    raise MachineError(f"{need}: free space there, or write the output elsewhere (output.dir, or --out)")


def _on_one_disk(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


def _write_weights(planned: PlannedRecipe, source, tmp: Path, progress: bool) -> tuple[int, int]:
    """Stream every planned tensor into shards; returns (bytes written, number of shards).

    A copied tensor whose bytes already sit in a base safetensors file in the output dtype moves
    file-to-file (shard_writer); anything else is materialised one tensor at a time.
    """
    plan = planned.plan
    if source.how is None:  # read file by file: pickle checkpoints are first seen here (safetensors were checked when planned)
        check_matches_config(source, [(t.source, t.shape) for t in plan.tensors if t.source is not None], plan.layers_path,
                             plan.base_num_layers, plan.config, "the base's config.json")
    dtype = output_dtype(planned)
    shards = shard_tensors(plan.tensors, dtype, planned.loaded.recipe.output.shard_bytes)
    init = MemoryInit(planned, dtype) if any(t.source is None for t in plan.tensors) else None
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] if len(shards) > 1 else ["model.safetensors"]
    weight_map: dict[str, str] = {}

    def integer_ok(name: str) -> bool:  # asked only of an integer tensor (rare): the model built once, on the meta device
        from midus_surgery.compiler.plan import base_integer_tensors

        return planned.config is not None and name in base_integer_tensors(planned.config)

    shard_items = [[_shard_item(entry, source, init, dtype, integer_ok) for entry in shard] for shard in shards]
    total_bytes = sum(item.nbytes for items in shard_items for item in items)
    _check_room(shard_items, tmp, planned.loaded.resolve(planned.loaded.recipe.base.path))
    bar = progress_bar(total_bytes, "apply", leave=True, unit="B", unit_scale=True, unit_divisor=1024) if progress else None
    try:
        try:
            _write_shards(tmp, names, shard_items, source, bar)
        except _CastOverflow as exc:
            raise RecipeError([planned.loaded.problem(("output", "dtype"), str(exc))]) from None
        for shard, file in zip(shards, names):
            give_default_mode(tmp / file)  # safetensors writes 0600
            weight_map.update((entry.name, file) for entry in shard)
    finally:
        if bar is not None:
            bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total_bytes, len(shards)


def _write_shards(tmp: Path, names: list[str], shard_items: list[list[ShardItem]], source, bar) -> None:
    """Every shard: file-to-file copies several at once, anything to materialise one shard at a time."""
    workers = min(COPY_WORKERS, os.cpu_count() or 1, len(shard_items))
    if workers > 1 and all(item.bytes_from is not None for items in shard_items for item in items):
        _write_copy_shards_in_parallel(tmp, names, shard_items, workers, bar)
    else:  # tensors to materialise (conversions, new memory): one shard at a time, bounded memory
        for items, file in zip(shard_items, names):
            write_shard(tmp / file, items, metadata={"format": "pt"}, on_bytes=bar.update if bar else None)
            source.release()


def _write_copy_shards_in_parallel(tmp: Path, names: list[str], shard_items: list[list[ShardItem]], workers: int, bar) -> None:
    """Shards made only of file-to-file copies, several at once.

    copy_file_range runs in the kernel without the GIL; with two streams the disk and the page
    cache stay busier (measured on this 2-core machine: 3B DUS output 10-12 s against 12.5-22.7 s
    one shard at a time). Each write_shard opens its own file descriptors.
    """
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        if bar is not None:
            with lock:  # tqdm's counter is not atomic
                bar.update(n)

    def write(i: int) -> None:
        write_shard(tmp / names[i], shard_items[i], metadata={"format": "pt"}, on_bytes=on_bytes)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(write, range(len(names))):  # re-raises the first failure
            pass


def _shard_item(entry: TensorEntry, source, init: MemoryInit, dtype: str, integer_ok) -> ShardItem:
    if entry.source is not None and entry.rule == "copy":
        held = source.held_tag(entry.source)
        if held is not None and not is_float_tag(held) and integer_ok(entry.source):
            dtype = DTYPE_OF_TAG[held]  # a buffer of the model's (DeepSeek-V4's tid2eid): written as the base holds it
    tag = TAGS[dtype]
    if entry.source is not None and entry.rule == "copy":
        found = source.locate(entry.source)
        if found is not None:
            where, stored_tag, shape = found
            if shape != entry.shape:
                raise MidusError(_shape_mismatch(entry, shape))
            if stored_tag == tag:
                return ShardItem(entry.name, tag, entry.shape, bytes_from=where)
    return ShardItem(entry.name, tag, entry.shape, make=lambda: _materialise(entry, source, init, dtype, integer_ok))


def _shape_mismatch(entry: TensorEntry, shape) -> str:
    return (f"base tensor {entry.source} has shape {tuple(shape)}, but its config implies {entry.shape}: "
            "the weights do not match the config")


def _write_companions(planned: PlannedRecipe, ref, tmp: Path) -> None:
    """config, modeling code, tokenizer, generation config, recipe, plan summary, model card."""
    plan, recipe = planned.plan, planned.loaded.recipe
    config_dict = emitted_config(plan, output_dtype(planned))
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, default=str) + "\n")
    if plan.memory_layers:
        copy_modeling_files(tmp)
    base_code = base_code_entries(config_dict["auto_map"]) if plan.memory_layers else config_dict.get("auto_map")
    if base_code and not ref.is_gguf:
        # the base's own code (allowed by the recipe, or auto_map entries that build nothing here):
        # the output's config names it, so it travels with the output
        from midus_surgery.compiler.custom_code import code_files

        try:
            for path in code_files(ref.directory, base_code):
                shutil.copy2(path, tmp / path.name)
        except ValueError as exc:
            raise MidusError(str(exc)) from None
    _copy_tokenizer(ref, tmp, recipe.base.trust_remote_code)
    for warning in hub_load_warnings(tmp, sorted(path.name for path in tmp.glob("*.py"))):  # the base's code, copied (ours has no mark)
        _warn(warning)
    _write_generation_config(ref, config_dict, tmp)
    recipe_text = Path(planned.loaded.source.file).read_text()
    (tmp / "midus_recipe.yaml").write_text(recipe_text)
    summary = plan.to_json(tensors=False)  # the layout and its readers: compiler/plan.py, read_plan_json
    # for `verify` without --base; in the marker, not here: midus_plan.json is published with the model
    base = planned.loaded.resolve(recipe.base.path)
    base = base / recipe.base.gguf_file if recipe.base.gguf_file else base  # a folder and its GGUF: the file (trial64)
    add_to_marker(tmp, base_path=str(base.resolve()),
                  recipe=str(Path(planned.loaded.source.file).resolve()))  # which recipe's output a later --overwrite replaces
    summary["trust_remote_code"] = recipe.base.trust_remote_code  # `verify` loads the output and the base as apply read it
    (tmp / PLAN_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(planned, recipe_text, ref, tmp)


def _materialise(entry: TensorEntry, source, init: MemoryInit, dtype_name: str, integer_ok):
    """``entry``'s tensor in ``dtype_name`` (the output dtype; a buffer of the model's stored as integers, its own).
    ``integer_ok(name)``: whether base tensor ``name`` is stored as integers by right (a buffer of the model's); any
    other integer tensor is a weight stored as integers: refused."""
    import torch

    dtype = torch_dtype(dtype_name)
    if entry.source is None:
        tensor = init.get(entry.name)
    else:
        tensor = source.get(entry.source)
        if tuple(tensor.shape) != entry.shape:
            raise MidusError(_shape_mismatch(entry, tensor.shape))
        if not tensor.is_floating_point() and entry.rule != "zeros" and not integer_ok(entry.source):  # a pickle base (headers unread)
            from midus_surgery.compiler.planner import integer_base_tensors

            raise BaseModelError(integer_base_tensors(None, [f"{entry.source} ({str(tensor.dtype).removeprefix('torch.')})"]))
        if entry.rule == "zeros":
            tensor = torch.zeros(entry.shape, dtype=dtype)
    cast = tensor.to(dtype).contiguous()  # safetensors wants contiguous tensors
    # a pass over the tensor only where the range narrows by far (float16's 65504 from float32 or bfloat16), not on
    # every conversion: bfloat16 from float32 loses the top half-percent of the range, no weight's
    narrower = cast.is_floating_point() and tensor.is_floating_point() and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max / 2
    if narrower and not torch.isfinite(cast).all():
        overflowed = torch.isfinite(tensor) & ~torch.isfinite(cast)
        if overflowed.any():  # a finite base value past the output dtype's range: it would be written as inf
            raise _CastOverflow(entry.source or entry.name, float(tensor[overflowed].abs().max()), dtype_name, float(torch.finfo(dtype).max))
    return cast


class _CastOverflow(Exception):
    """A finite base value beyond the output dtype's largest: said as the recipe's output.dtype problem."""

    def __init__(self, name: str, value: float, dtype: str, largest: float):
        super().__init__(f"{dtype} cannot hold base tensor {name}: it holds {value:.4g}, and {dtype}'s largest value is {largest:.6g}, "
                         f"so the output would hold inf; write bfloat16 (float32's range) or float32")
