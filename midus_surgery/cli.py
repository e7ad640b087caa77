"""The ``midus-surgery`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
import threading
import warnings
from collections import Counter
from pathlib import Path

from midus_surgery.errors import (
    FILE_TOO_LARGE,
    MachineError,
    MidusError,
    Problem,
    RecipeError,
    Terminated,
    UsageError,
    control_character_in_name,
    file_too_large,
    one_line,
    printable,
)
from midus_surgery.io.json_text import strict_json
from midus_surgery.units import human_count


class _LazyConsole:
    """A rich Console built on first use: ``apply`` prints plain lines and never imports rich
    (~30 ms of the start-up that dominates apply on a small model)."""

    def __init__(self, **kwargs):
        self._kwargs = kwargs
        self._console = None

    def __getattr__(self, name):
        if self._console is None:
            from rich.console import Console

            # emoji=False: rich replaced ":fire:" in a recipe's name with its emoji, markup or not (trial104)
            self._console = Console(highlight=False, soft_wrap=True, emoji=False, **self._kwargs)
        return getattr(self._console, name)


class _ErrorConsole(_LazyConsole):
    """stderr. Under ``torchrun`` / ``accelerate launch`` every process says its own error, most often the same
    line as its peers (a config problem): a process other than the first tags its lines with its rank, so the
    repeats read as what they are, and a line only one process says is told apart (trial74 F8)."""

    def print(self, *objects, **kwargs):
        if objects and isinstance(objects[0], str):
            # every line tagged (a refusal of several problems read as the first process's past its first line: trial80 N3),
            # and a name the user typed holding ESC or CR shown as its escape, not coloring the terminal (N5)
            tag = "" if self.__dict__.get("_mid_line") else _rank_tag()  # a line begun by the print before: tagged there
            if kwargs.get("markup") and tag:
                tag = tag.replace("[", "\\[")  # rich would read "[rank 1]" as a style
            lines = objects[0].split("\n")
            text = "\n".join(f"{tag}{line if kwargs.get('markup') else printable(line)}" for line in lines)
            objects = (text, *objects[1:])
        self.__dict__["_mid_line"] = not kwargs.get("end", "\n").endswith("\n")
        return self.__getattr__("print")(*objects, **kwargs)


def _rank_tag() -> str:
    """``[rank N] `` in a process other than the first of a multi-process launch (torchrun and accelerate set
    RANK and WORLD_SIZE), else ""."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return f"[rank {rank}] " if rank.isdigit() and world.isdigit() and int(world) > 1 and int(rank) > 0 else ""


out = _LazyConsole()
err = _ErrorConsole(stderr=True)


def _threads(text: str) -> int:
    """--threads: 1 to 4 per CPU of this machine. 100000 made torch fail to map its threads' stacks, which eval then
    reported as its weights failing to load (trial70)."""
    value = _int_at_least(1)(text)
    most = 4 * (os.cpu_count() or 1)
    if value > most:
        raise argparse.ArgumentTypeError(f"at most {most} (4 per CPU of this machine's {os.cpu_count() or 1}), got {value}")
    return value


def _tokens(count: int) -> str:
    """'1 token', '2,048 tokens'."""
    return f"{count:,} token{'' if count == 1 else 's'}"


def _folder_to_write(text: str, *, new_names_only: bool = False) -> str:
    """--out, --cache-dir: named as output.dir must be, without control characters (a newline split every line naming
    it; an escape sequence reached the terminal in the "wrote" line: trial83 F6), and no folder to make named with blanks
    at an end. ``new_names_only``: the control characters too only in the folders to make (a token cache is written into,
    and one an earlier version filled under such a name is the user's: trial157)."""
    from midus_surgery.io.output_dir import new_folder_names, padded_new_folder

    if not text.strip():  # "": the current folder, refused only because it held an input, or written into (apply --out "")
        raise argparse.ArgumentTypeError(f"{_no_path(text)} (an unset shell variable?); name the folder to write")
    if _cwd_gone() and not os.path.isabs(text):  # pathlib's traceback (trial154 L6)
        raise argparse.ArgumentTypeError(f"{text!r}: {CWD_GONE}")
    try:
        where = Path(text).resolve() if new_names_only else Path(text).absolute()  # a cache is made where it resolves (trial158 F3)
    except RuntimeError:  # pathlib's "Symlink loop from ..." (trial159 F1)
        raise argparse.ArgumentTypeError(f"{text!r} reaches a link that leads back to itself") from None
    why = next(filter(None, map(control_character_in_name, new_folder_names(where) if new_names_only else [text])), None)
    if why:
        raise argparse.ArgumentTypeError(printable(why))
    padded = padded_new_folder(where)  # --cache-dir "c ": no output check sees the cache folder made (trial153 M3)
    if padded:
        raise argparse.ArgumentTypeError(f"{text!r} would make a folder named {padded!r}, with blanks at its start or end (a stray "
                                         "space, or a variable of blanks?): name it without them")
    return text


CWD_GONE = "the current folder no longer exists (deleted while the shell was in it): cd into one that does, and run the command again"


def _cwd_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def _given_path(what: str):
    """An argparse type: a path that is not the empty text. Path("") is the current folder: `--data "$HELDOUT"` with the
    variable unset read every file under it as held-out text, `--base ""` and `--cache-dir ""` fell back to their defaults,
    exit 0 without a word (trial138 F2). ``what``: what to give instead, said in the refusal."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{_no_path(text)} (an unset shell variable?); {what}")
        return text
    return parse


def _no_path(text: str) -> str:
    """What a path argument of nothing, or of nothing but blanks (`--out "$A $B"` with both unset), is called."""
    return "an empty path" if text == "" else f"a path of only blanks ({text!r})"


_model_path = _given_path("name the model folder (an empty one would be the current folder)")
_recipe_path = _given_path("name the recipe YAML file")
_data_path = _given_path("name the files, folders or globs to read (an empty one would read every file in the current folder)")


def _cache_folder(text: str) -> str:
    """--cache-dir: a folder to write (_folder_to_write), not the empty text (that fell back to the default cache)."""
    return _folder_to_write(_given_path("name the token cache's folder, or leave --cache-dir out for the default one")(text),
                            new_names_only=True)


def _model_folder_to_write(text: str) -> str:
    """apply --out: a folder to write (_folder_to_write) that will hold a model, so its name must be UTF-8: bytes from the
    command line that are not made a folder the tokenizers and safetensors libraries cannot read back (trial102 R06). Only
    here: a token cache or an analysis is read by Python alone (trial103)."""
    from midus_surgery.errors import model_folder_name_problem

    text = _folder_to_write(text)
    if problem := model_folder_name_problem(text):  # escaped once there (it was escaped, then quoted: 'o\\udcff': trial104)
        raise argparse.ArgumentTypeError(problem)
    return text


def _seed(text: str) -> int:
    """An argparse type: a seed numpy takes, 0 to 2**32 - 1 (lm-eval's ValueError came only after the first model
    loaded, blamed on it)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"between 0 and 2**32 - 1 ({2**32 - 1}), got {value}")
    return value


def _field_name(text: str) -> str:
    """An argparse type: a JSONL field name, not empty (an empty one read the `text` field without a word)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty field name (the JSONL field holding the text; default: text)")
    return text


def _int_at_least(low: int):
    """An argparse type: an integer of at least ``low`` (a zero batch or block is a usage error, not a traceback
    nor a NaN result)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"at least {low}, got {value}")
        return value
    return parse


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}x" if b else "-"


def _recipe_warnings(planned) -> list[str]:
    """The warnings apply gives as it copies the base's tokenizer code (a file it will not copy), given by validate and
    plan before it at the same level: they said it as a note, apply as a warning (trial121 F3)."""
    from midus_surgery.compiler.base import resolve_base
    from midus_surgery.emit.emitter import tokenizer_code_left

    ref = resolve_base(planned.loaded)
    if ref.exists and ref.is_gguf:  # its tokenizer loads through transformers, which cannot read such a file: apply writes none
        from midus_surgery.io.tokenizer_files import tokenizer_config_unreadable

        if why := tokenizer_config_unreadable(ref.directory / "tokenizer_config.json"):
            return [f"apply will write no tokenizer (the GGUF's tokenizer_config.json cannot be read: {printable(why)})"]
    # a GGUF's code is copied only when trusted (what would harm its load is refused before)
    if not ref.exists or (ref.is_gguf and not planned.loaded.recipe.base.trust_remote_code):
        return []
    from midus_surgery.compiler.custom_code import base_code_in_output
    from midus_surgery.io.tokenizer_files import hub_load_warnings

    carried = base_code_in_output(ref, planned.plan, planned.loaded.recipe.base.trust_remote_code)[0]
    return tokenizer_code_left(ref.directory) + hub_load_warnings(ref.directory, carried)


def _pickle_only_base(loaded) -> str | None:
    """What apply will ask for when the base's weights are pickle only (validate reads no weights)."""
    from midus_surgery.compiler.base import resolve_base

    ref = resolve_base(loaded)
    from midus_surgery.io.tensor_source import holds_only_pickle_weights

    if ref.is_gguf or not ref.exists or not holds_only_pickle_weights(ref.directory):
        return None
    return f"{ref.directory} holds only pickle .bin weights: apply reads them only with --allow-pickle (and then with weights_only=True)"


def shared_bank_words(plan) -> str | None:
    """With memory.share_bank the memory layers' rows leave out the latent bank they share: where it is counted."""
    from midus_surgery.model.midus_names import SHARED_BANK

    bank = plan.shared_bank_params
    if not bank:
        return None
    return (f"shared latent bank ({SHARED_BANK}.weight): {human_count(bank)} parameters, counted once in the totals and in no "
            f"layer's row (the {len(plan.memory_layers)} memory layers read it)")


def _copy_word(recipe) -> str:
    """What a recipe calls its plain copies: `transformer` when its layout says that (the older name) and never
    `copy`, else `copy`; validate's count uses the recipe's own word."""
    said = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("kind"), str):
                said.add(node["kind"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(recipe.layout.model_dump(exclude_unset=True))
    return "transformer" if "transformer" in said and "copy" not in said else "copy"


def cmd_validate(args) -> int:
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import check_planned

    failed = 0
    for path in args.recipes:
        try:
            planned = check_planned(plan_recipe(path))
            earlier_output = _check_output_location(planned.loaded)
        except MachineError:
            raise  # the machine, not this recipe: one error line, not INVALID
        except MidusError as exc:
            failed += 1
            err.print("[bold red]INVALID[/] ", markup=True, end="")
            err.print(printable(str(path)), markup=False)
            for line in _message_lines(exc).splitlines():
                err.print(f"  {line}", markup=False)
            continue
        plan = planned.plan
        kinds = Counter(layer.kind for layer in plan.layers if layer.inserted)
        copy_word = _copy_word(planned.loaded.recipe)
        summary = ", ".join(f"{n} {copy_word if k == 'copy' else k}" for k, n in sorted(kinds.items()))
        out.print("[bold green]OK[/] ", markup=True, end="")
        out.print(f"{printable(str(path))}: {plan.base_num_layers} -> {plan.num_hidden_layers} layers ({summary})", markup=False)
        for note in _recipe_notes(planned, earlier_output, start=True):
            out.print(f"  note: {note}", markup=False)
        for warning in _recipe_warnings(planned):
            out.print(f"  warning: {warning}", markup=False)
    return 2 if failed else 0


def _recipe_notes(planned, earlier_output: str | None, *, start: bool) -> list[str]:
    """validate's notes, which plan says too (trial98 F3: plan left out the first and last three): apply's need of
    --allow-pickle, a memory: section no block uses, the plan's own notes, an earlier output at output.dir."""
    notes = [_pickle_only_base(planned.loaded)]
    if "memory" in planned.loaded.recipe.model_fields_set and not any(layer.kind == "memory" for layer in planned.plan.layers):
        notes.append("the recipe sets memory:, but no block is a memory block; it is not used")
    return [note for note in notes + _plan_notes(planned, start=start) + [earlier_output] if note]


# a memory block this many times its base block's parameters is flagged: the memory defaults are
# sized for a 1B model, and a recipe copied to a small base multiplies its size without a word
OVERSIZED_MEMORY = 10


def _tokenizer_ids(planned) -> tuple[int, int] | str | None:
    """(tokens, the largest id) the base directory's tokenizer.json gives (added tokens included); None without
    one; why it does not load, as one line, for one that does not (apply copies it with a warning). The Rust
    tokenizers reader runs no code."""
    from midus_surgery.compiler.base import resolve_base
    from midus_surgery.emit.emitter import read_tokenizer_json

    path = resolve_base(planned.loaded).directory / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer, problem = read_tokenizer_json(path)
    if tokenizer is None:
        return problem
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    return (len(ids), max(ids)) if ids else None


def _index_beside_single_file(ref) -> str | None:
    """A base folder holding model.safetensors and an index of shards too: transformers reads
    model.safetensors, and so does apply; the shards are not read (trial49: apply read the shards)."""
    if not ref.exists or ref.is_gguf:
        return None
    if (ref.directory / "model.safetensors").is_file() and (ref.directory / "model.safetensors.index.json").is_file():
        return (f"{ref.directory} holds model.safetensors and model.safetensors.index.json: transformers loads model.safetensors, "
                "and so does apply; the index and its shards are not read (remove the one that is not the model)")
    return None


def _base_layers_out_of_order(plan) -> str | None:
    """The base's own layers (each one's `base` use) out of their order: valid, but no up-scaling
    method does it, and slices listed in the wrong order do it silently (trial52)."""
    originals = [layer for layer in plan.layers if layer.kind == "base"]
    for before, after in zip(originals, originals[1:]):
        if after.source < before.source:
            return (f"the output runs base layer {after.source} (output layer {after.index}) after base layer {before.source} (output "
                    f"layer {before.index}): the base's own layers are out of their order, which no up-scaling method does; slices listed "
                    "in the wrong order?")
    return None


def _base_without_weights(ref) -> str | None:
    """validate and plan read a base's config alone; a folder with no weights at all is said before apply finds it so (trial52)."""
    if not ref.exists or ref.is_gguf:
        return None
    from midus_surgery.io.tensor_source import pickle_weight_files

    if any(ref.directory.glob("*.safetensors")) or pickle_weight_files(ref.directory):
        return None
    return f"{ref.directory} holds no weights (.safetensors files): validate and plan read its config.json alone; apply needs the weights"


def _base_code(ref, plan, trusted: bool) -> str | None:
    """A base with code of its own that the output carries (what config.json's kept auto_map and every entry of
    tokenizer_config.json's name, and what they import relatively): apply copies it, never running it, and keeps a
    reference into another Hub repository, but a MIDUS output is loaded with trust_remote_code=True where midus-surgery
    is not installed, and that load runs it (trial99 S1, trial102 R08; every entry, not AutoTokenizer's alone: trial111)."""
    from midus_surgery.compiler.custom_code import base_code_in_output
    from midus_surgery.io.tokenizer_files import is_module_file_name, reference_place

    files, repos = base_code_in_output(ref, plan, trusted)
    # every name escaped, as it is the file's text (a newline or ESC[8m in one forged the note's lines and hid the rest of
    # it: trial104), and one that is no module name said so
    names = [printable(name)[:80] + ("" if is_module_file_name(name) else " (not a Python module name: suspicious)") for name in files]
    places = [reference_place(repo).format(printable(repo)[:300]) for repo in repos]  # a Hub repository, or a local folder (a path: longer)
    if not names and not places:
        return None
    what = ", ".join([*names, *places])
    copies = "copies it into the output" if not repos else "keeps the reference" if not names else "copies and keeps them"
    hub = any(place.startswith("code of the Hub") for place in places)
    local = ("; the output does not hold a local folder's code: that load reads it from the same path, on any machine where "
             "it exists" if not all(place.startswith("code of the Hub") for place in places) else "")
    return (f"the base has code of its own that the output carries ({what}, named by the auto_map of its config.json or "
            f"tokenizer_config.json): apply {copies}, and a load of the output with trust_remote_code=True (AutoTokenizer, "
            f"AutoProcessor...), as a MIDUS output is loaded without midus-surgery installed, {'downloads and ' if hub else ''}"
            f"runs it{local}; read it before you load or publish the output")


def _left_out_base_tensors(planned, ref) -> str | None:
    """apply's note on base tensors the architecture does not have, said before apply (trial56), from the
    safetensors headers; not for a checkpoint transformers converts on load (its names are not the model's)."""
    if not ref.exists or ref.is_gguf or not any(ref.directory.glob("*.safetensors")):
        return None
    from midus_surgery.compiler.plan import base_load_renames
    from midus_surgery.emit.emitter import left_out_words, unread_base_tensors
    from midus_surgery.io.tensor_source import SafetensorsSource

    renames = base_load_renames(planned.config)
    if renames is None:
        return None
    source = SafetensorsSource(ref.directory, planned.plan.name_prefixes, renames)
    try:
        left = unread_base_tensors(planned, source)
    finally:
        source.close()
    return left_out_words(left) if left else None


def _plan_notes(planned, start: bool, apply: bool = False) -> list[str]:
    """What a valid plan does that its author may not have meant: base layers pruned on purpose,
    memory that does not start as the identity (``start``: plan says that in its own line), memory
    blocks far larger than the blocks they extend. ``apply``: less what apply's writing says itself (base
    tensors left out, a tokenizer that does not load) or refuses (a base without weights)."""
    from midus_surgery.compiler.base import resolve_base
    from midus_surgery.compiler.plan import EVERY_NTH_LISTS, every_nth_keys_unsaid, window_layers_boundary

    plan, recipe = planned.plan, planned.loaded.recipe
    notes = []
    dropped = plan.dropped_layers
    if dropped:
        notes.append(f"base layer{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))} left out of the output (allow_dropped_layers)")
    ref = resolve_base(planned.loaded)  # once, for the notes on the base folder's files
    both = _index_beside_single_file(ref)
    if both:
        notes.append(both)
    unordered = _base_layers_out_of_order(plan)
    if unordered:
        notes.append(unordered)
    weightless = None if apply else _base_without_weights(ref)
    if weightless:
        notes.append(weightless)
    base_code = _base_code(ref, plan, recipe.base.trust_remote_code)
    if base_code:
        notes.append(base_code)
    left = None if apply else _left_out_base_tensors(planned, ref)
    if left:
        notes.append(left)
    if plan.inserted_before:
        earlier = ", ".join(f"{i} ({kind})" for i, kind in sorted(plan.inserted_before.items()))
        notes.append(f"the base is an output of `midus-surgery apply`: its layers {earlier} were inserted by that apply or one before it. They are base layers "
                     "to this recipe, and midus_plan.json records them, so `train` with freeze: base trains them with this recipe's blocks")
    if start and plan.function_preserving is None and plan.memory_layers and recipe.memory.init == "random":
        notes.append("memory.init: random: the memory blocks start from random values, so the output does not start as the base's "
                     "function (verify then skips its identity check and shows both perplexities)")
    if plan.lists_by_length:  # a guess that cannot be checked: said, so a list that is not about layers can be fixed by hand
        keys = ", ".join(plan.lists_by_length)
        notes.append(f"config.json's {keys} ha{'s' if len(plan.lists_by_length) == 1 else 've'} as many entries as the base has layers, and neither "
                     "the config class nor the name says what they hold: taken for one entry a layer and rewritten through the layer map; "
                     "if not per layer, restore the base's value in the output's config.json")
    types = plan.config.get("layer_types")
    sliding = [i for i, t in enumerate(types) if "sliding" in str(t)] if isinstance(types, list) else []
    if sliding and "max_window_layers" in plan.config and window_layers_boundary(plan.config) is None:
        notes.append(f"the output's sliding-window layers ({', '.join(map(str, sliding[:12]))}{' ...' if len(sliding) > 12 else ''}) are "
                     f"not 'every layer from N on', so max_window_layers ({plan.config['max_window_layers']}, kept) cannot say them: "
                     "transformers reads layer_types, but a tool that reads max_window_layers instead would build another attention pattern")
    unsaid = every_nth_keys_unsaid(plan.config)
    for key in [k for k in unsaid if not (k.startswith("_") and k[1:] in unsaid)]:  # Gemma-3 states it twice: said once
        notes.append(f"the output's {key} ({plan.config[key]}, kept) cannot say the new layout's {EVERY_NTH_LISTS[key]} (it makes layer i "
                     f"special where (i + 1) % {plan.config[key]} == 0): transformers reads {EVERY_NTH_LISTS[key]}, but a tool that reads "
                     f"{key} instead would build another pattern")
    ids = _tokenizer_ids(planned)
    vocab = plan.config.get("vocab_size")
    if isinstance(ids, str):  # apply's writing warns of it itself
        notes += [] if apply else [f"the base's tokenizer.json does not load ({ids}): apply copies it as it is, and the output's "
                                   "tokenizer will not load either (eval and train need one); fix or replace it"]
    elif ids is not None and isinstance(vocab, int) and ids[1] >= vocab:  # by the largest id: a tokenizer's ids need not be 0..n-1
        notes.append(f"the base's tokenizer.json has {ids[0]:,} tokens with ids up to {ids[1]:,} but its config's vocab_size is {vocab:,}: "
                     f"text whose ids reach {vocab:,} or more cannot be embedded (train and eval refuse such data); a tokenizer of another model?")
    from midus_surgery.emit.emitter import emit
    from midus_surgery.emit.replica import moved_layer_difference

    # a DUS layout on a base whose layers read their index (a plan apply made from the safetensors headers has no config to build
    # a replica from: the header planner takes only bases whose layers do not)
    moved = moved_layer_difference(planned, emit) if planned.config is not None else None
    if moved:
        notes.append(moved)
    originals = {layer.source: n for layer, n in zip(plan.layers, plan.layer_params) if layer.kind == "base"}
    sizes = [(n, originals[layer.source]) for layer, n in zip(plan.layers, plan.layer_params) if layer.kind == "memory" and originals.get(layer.source)]
    if sizes:
        n, block = max(sizes, key=lambda pair: pair[0] / pair[1])
        if n > OVERSIZED_MEMORY * block:
            m = recipe.memory
            notes.append(f"a memory block has {human_count(n)} parameters, {n / block:.0f}x the base block it extends ({human_count(block)}): "
                         f"the bank has n_subkeys^2 = {m.n_subkeys ** 2:,} rows of latent_dim {m.latent_dim} (defaults 256 and 256, the paper's "
                         "arithmetic for Llama-3.2-1B); smaller memory.n_subkeys / latent_dim suit a small base")
    return notes


def _start_line(planned) -> str | None:
    """Whether the output starts as the base's function, and why; None when nothing is inserted."""
    plan = planned.plan
    if plan.function_preserving is not None:
        return ("yes (checked on a tiny random replica of the base)" if plan.function_preserving
                else "NO (found on a tiny random replica; accepted by accept_function_change)")
    kinds = {layer.kind for layer in plan.layers if layer.inserted}
    if "copy" in kinds and plan.accepted_change:
        return f"no: plain copies change it (as in DUS and SOLAR), and NO for the identity blocks beside them: {plan.accepted_change} (accepted by accept_function_change)"
    if "copy" in kinds:
        return "no: plain copies change it (as in DUS and SOLAR)"
    if "memory" in kinds and planned.loaded.recipe.memory.init == "random":
        return "no: memory.init: random starts the memory blocks from random values"
    return None


def _check_output_location(loaded) -> str | None:
    """``output.dir`` held to apply's rule (as with --overwrite, which replaces only an earlier apply
    output), as a located problem: validate's OK means apply will not refuse the place. Returns a note when
    the place holds an earlier output, which apply replaces only with --overwrite (trial82 F6: OK, then refused)."""
    from midus_surgery.compiler.base import resolve_base
    from midus_surgery.emit.emitter import check_apply_output
    from midus_surgery.io.output_dir import OutputError

    try:
        out = check_apply_output(loaded, resolve_base(loaded), None, overwrite=True, probe=False)
        if out.is_dir() and any(out.iterdir()):
            return f"output.dir {printable(str(out))} holds an earlier output of midus-surgery apply: apply replaces it only with --overwrite"
        return None
    except OutputError as exc:
        raise RecipeError([loaded.problem(("output", "dir"), str(exc))]) from None
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop: the path cannot be looked at
        raise RecipeError([loaded.problem(("output", "dir"), f"cannot use this path: {getattr(exc, 'strerror', None) or exc}")]) from None


def cmd_plan(args) -> int:
    from midus_surgery.compiler.planner import plan_recipe
    from midus_surgery.emit.emitter import check_planned

    try:
        planned = check_planned(plan_recipe(args.recipe))  # errors: main() prints them and exits non-zero
    except MidusError as exc:
        if args.json and not isinstance(exc, MachineError):  # a JSON reader gets the problems as data too (stdout), a person the lines (stderr)
            problems = exc.problems if isinstance(exc, RecipeError) else [Problem(str(args.recipe), "", str(exc))]
            print(json.dumps({"valid": False, "problems": [dataclasses.asdict(p) for p in problems]}, indent=2))
        raise
    try:
        earlier_output = _check_output_location(planned.loaded)  # validate's check of output.dir, and its note
    except RecipeError as exc:  # plan writes nothing, and apply --out may write elsewhere: a note, not a refusal (trial102 R12)
        earlier_output = f"{exc.problems[0].message}; apply refuses it unless given --out elsewhere"
    loaded, config, anatomy, plan = planned.loaded, planned.config, planned.anatomy, planned.plan
    if args.json:
        data = {"valid": True, **plan.to_json()}  # a script asks .valid of either answer
        if not args.tensors:
            data.pop("tensors")
        data["notes"] = _recipe_notes(planned, earlier_output, start=True)  # what validate notes: pruned layers, random memory...
        data["warnings"] = _recipe_warnings(planned)  # what apply warns of (tokenizer code it will not copy)
        print(json.dumps(data, indent=2))
        return 0

    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    # the name as text: a newline in it printed lines it chose, and brackets were read as markup (a traceback: trial103)
    # model_type and a chained base's inserted_before are the base's file text too: never markup (a MarkupError, a link: trial111)
    out.print(f"[bold]{escape(printable(str(args.recipe)))}[/]: {escape(printable(str(config.model_type)))}, {plan.base_num_layers} -> {plan.num_hidden_layers} layers",
              markup=True)
    if anatomy is not None:
        out.print(f"anatomy: {anatomy.describe()}", markup=False)
    zeroed = _zeroed_in_blocks(plan)
    if zeroed:
        out.print(f"zero at the start in inserted blocks: {', '.join(zeroed)}", markup=False)
    start = _start_line(planned)
    if start is not None:
        out.print(f"starts as the base's function: {start}", markup=False)
    table = Table(title="Layer map", show_lines=False)
    for col in ("out", "source", "kind", "params"):
        table.add_column(col, justify="right" if col != "kind" else "left")
    style = {"base": "dim", "copy": "cyan", "identity": "yellow", "memory": "bold magenta"}
    for layer, n in zip(plan.layers, plan.layer_params):
        before = f" [dim](was {escape(printable(str(plan.inserted_before[layer.source])))})[/]" if layer.source in plan.inserted_before else ""
        table.add_row(str(layer.index), str(layer.source), f"[{style[layer.kind]}]{layer.kind}[/]{before}", human_count(n))
    out.print(table)
    shared = shared_bank_words(plan)
    if shared:
        out.print(shared, markup=False)

    counts = Table(title="Counts")
    for col in ("", "base", "DUS equivalent", "this plan", "plan / DUS"):
        counts.add_column(col, justify="right")
    p, f = plan.params, plan.flops_per_token
    counts.add_row("parameters", human_count(p["base"]), human_count(p["base"] + p["dus_added"]), human_count(p["total"]), _ratio(p["total"], p["base"] + p["dus_added"]))
    counts.add_row("added parameters", "-", human_count(p["dus_added"]), human_count(p["added"]), _ratio(p["added"], p["dus_added"]))
    counts.add_row(f"FLOPs/token (ctx {loaded.recipe.flops_seq_len})", human_count(f["base"]), human_count(f["dus"]), human_count(f["plan"]), _ratio(f["plan"], f["dus"]))
    out.print(counts)
    for note in _recipe_notes(planned, earlier_output, start=False):
        out.print(f"note: {note}", markup=False)
    for warning in _recipe_warnings(planned):
        out.print(f"warning: {warning}", markup=False)
    if args.tensors:
        tensors = Table(title="Tensor map")
        for col in ("output tensor", "shape", "from"):
            tensors.add_column(col)
        for t in plan.tensors:
            origin = t.source if t.rule == "copy" else (f"{t.source} (zeroed)" if t.source else t.rule)
            tensors.add_row(Text(printable(t.name)), "x".join(map(str, t.shape)), Text(printable(str(origin))))  # names: never markup
        if out.is_terminal:
            out.print(tensors)
        else:  # piped (grep, a file), rich cut the names at 80 columns (trial52): the table as wide as its rows
            from rich.console import Console

            Console(highlight=False, soft_wrap=True, width=100_000, emoji=False).print(tensors)
    from midus_surgery.compiler.header_plan import plan_from_headers

    _, why_full = plan_from_headers(loaded)  # reads config.json and the safetensors headers only
    out.print("apply: plans from the safetensors headers (copy-only; neither torch nor transformers imported)" if why_full is None
              else f"apply: plans through transformers ({why_full})", markup=False)
    return 0


def _zeroed_in_blocks(plan) -> list[str]:
    """The tensors, named within a layer, that inserted blocks start with at zero: zeroed copies
    (LLaMA-Pro's projections) and new memory tensors initialised to zero."""
    prefix = plan.layers_path + "."
    names = {f"{t.name[len(prefix):].split('.', 1)[1]} ({'new' if t.source is None else 'zeroed copy'})"
             for t in plan.tensors if t.rule == "zeros" and t.name.startswith(prefix)}
    return sorted(names)


def _print_check(check) -> None:
    mark = "[yellow]SKIP[/]" if check.skipped else "[bold green]PASS[/]" if check.ok else "[bold red]FAIL[/]"
    out.print(f"{mark} {check.name}: ", markup=True, end="")
    out.print(check.detail, markup=False)


def _run_verify(path, base, trust_remote_code: bool) -> int:

    from midus_surgery.emit.verify import verify
    from midus_surgery.io.hf_output import transformers_quiet

    # a checklist: transformers' load / save bars for each model would bury it, and its GGUF reader's bare bar too
    with transformers_quiet(progress=False):
        checks = verify(Path(path), Path(base) if base else None, trust_remote_code=trust_remote_code, report=_print_check)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        err.print(f"verify failed: {', '.join(failed)}", markup=False)
        return 1
    skipped = [c.name for c in checks if c.skipped]
    passed = len(checks) - len(skipped)
    out.print(f"verify: all {passed} checks passed" + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else ""), markup=False)
    if not (Path(path) / "midus_plan.json").is_file():
        out.print("  note: no midus_plan.json, so this is not an output of `midus-surgery apply`: only what any causal LM must do "
                  "was checked", markup=False)
    from midus_surgery.io.tokenizer_files import has_tokenizer_files

    if not has_tokenizer_files(Path(path)):
        out.print("  note: no tokenizer files: the checks ran on random token ids, and AutoTokenizer.from_pretrained fails on this "
                  "folder; copy the base's tokenizer files into it before publishing", markup=False)
    return 0


def cmd_apply(args) -> int:
    import time

    from midus_surgery.compiler.base import resolve_base
    from midus_surgery.compiler.planner import plan_for_apply
    from midus_surgery.emit.emitter import check_apply_output, check_base_code, emit
    from midus_surgery.io.tensor_source import check_base_weights_there
    from midus_surgery.recipe.schema import load_recipe

    started = time.perf_counter()
    loaded = load_recipe(args.recipe)
    base = resolve_base(loaded)
    check_apply_output(loaded, base, args.out, args.overwrite)  # a bad --out fails now, not after the plan's seconds
    if base.exists:  # a base not there is the plan's to say, at its line in the recipe
        check_base_weights_there(base)  # a base without weights fails now too (trial93 F8: 16 s for a 70B config)
    planned, why_full = plan_for_apply(loaded, full=args.full_plan)
    plan_done = time.perf_counter()
    plan = planned.plan
    print(f"{printable(str(args.recipe))}: {plan.base_num_layers} -> {plan.num_hidden_layers} layers, {human_count(plan.params['total'])} parameters", flush=True)
    check_base_code(planned)  # before the notes: one named the base code it would copy, and the next line refused it (trial114)
    for note in _plan_notes(planned, start=True, apply=True):  # what validate and plan would have said (trial72 N7: apply said none)
        print(f"note: {note}", file=sys.stderr, flush=True)
    result = emit(planned, out_dir=args.out, overwrite=args.overwrite, allow_pickle=args.allow_pickle, progress=not args.quiet)
    done = time.perf_counter()
    print(f"wrote {printable(str(result.out_dir))}: {result.num_tensors} tensors, {result.num_bytes / 2**20:.1f} MiB in {result.shards} shard(s), "
          f"{done - started:.2f} s (plan {plan_done - started:.2f} s, writing {done - plan_done:.2f} s); "
          + ("planned from the safetensors headers" if why_full is None else f"planned with transformers ({why_full})")
          + (f"; base read {result.base_read}" if result.base_read else ""))
    if args.verify:
        # exit 1 either way, and the output said to be there: its own exit 2 read as "a problem in the recipe, nothing
        # written", and apply's 1 as "nothing half-written kept", while a whole output stood there (trial150 M1)
        try:
            failed = _run_verify(result.out_dir, None, trust_remote_code=planned.loaded.recipe.base.trust_remote_code)  # the user's own recipe
        except (MidusError, OSError) as exc:  # a model it cannot check, a full disk for its round trip: the output stays as written
            said = str(exc) if isinstance(exc, MidusError) else _os_error_text(exc)
            err.print(f"verify could not check it: {printable(said)}", markup=False)
            failed = 1
        if failed:
            err.print(f"the output is written, whole, at {printable(str(result.out_dir))}: the lines above say what verify found",
                      markup=False)
        return failed
    return 0


def _not_scored(result: dict) -> str:
    """What eval --data's result line says of the tokens after the last block or window it read."""
    tail = result.get("tokens_after_the_last_block")
    if not tail:
        return ""
    if result.get("stopped_at_max_blocks"):  # more blocks or windows were there: --max-blocks stopped it (trial156 4)
        return f" (stopped there by --max-blocks: the {_tokens(tail)} after the last one read not scored)"
    if result["mode"] == "documents":  # windows of 2 tokens: a document's last token alone in a window predicts nothing
        return f" ({_tokens(tail)} alone at a document's end: not read)"
    return f" (the last {_tokens(tail)} fill no block: not scored)"


def _os_error_text(exc: OSError) -> str:
    """A system error in one line, with the file it is about: "Permission denied" alone did not say which (trial154 L1)."""
    files = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    return f"{exc.strerror or exc}" + (f": {files}" if files else "")


def cmd_verify(args) -> int:
    return _run_verify(args.model, args.base, trust_remote_code=args.trust_remote_code)


def cmd_schema(args) -> int:
    from midus_surgery.recipe.schema import recipe_json_schema_text

    sys.stdout.write(recipe_json_schema_text())
    return 0


def cmd_train(args) -> int:
    from midus_surgery.train.config import config_reference_markdown, load_train_config

    if args.keys:
        sys.stdout.write(config_reference_markdown())
        return 0
    if not args.config:
        from midus_surgery.errors import UsageError

        raise UsageError("train needs a config file (see `midus-surgery train --keys` for every key)")
    loaded = load_train_config(args.config, [*args.overrides, *(["log.progress=false"] if args.quiet else [])])
    from midus_surgery.train.runner import Runner, train

    if args.dry_run:
        runner = Runner(loaded)
        runner.dry_run()
        if runner.acc.is_main_process:
            text = " and ".join(what for what, _, _ in runner.untokenised)
            print("dry run: nothing was written, no weights were read (their headers only); " +
                  (f"{text} {'are' if len(runner.untokenised) > 1 else 'is'} read as text when the run tokenises "
                   f"{'them' if len(runner.untokenised) > 1 else 'it'}, first thing: a file that is not text, or too short, is "
                   "found then" if text else "the same command without --dry-run trains"))
        return 0

    result = train(loaded)
    if not result.is_main:
        return 0
    final = result.final_eval or {}
    ppl = f", held-out ppl {final['eval_ppl']:.3f}" if final else ""
    print(f"done: {result.steps:,} step{'' if result.steps == 1 else 's'}, {result.tokens:,} tokens{ppl}; model in {printable(str(result.export_dir))}")
    return 0


# eval's flags that only one of its two modes reads (flag -> argparse dest)
EVAL_MODE_FLAGS = {
    "--tasks": {"--include-path": "include_path", "--allow-task-code": "allow_task_code", "--limit": "limit",
                "--num-fewshot": "num_fewshot", "--seed": "seed"},
    "--data": {"--block-size": "block_size", "--per-document": "per_document", "--max-blocks": "max_blocks",
               "--text-field": "text_field", "--cache-dir": "cache_dir"},
}


def cmd_eval(args) -> int:
    from midus_surgery.downstream.harness import TaskError

    if (args.data is None) == (args.tasks is None):
        given, tail = ("both were given; ", ", not both") if args.data is not None else ("", "")
        raise TaskError(f"eval: {given}give --data (held-out perplexity) or --tasks (lm-evaluation-harness tasks){tail}")
    mode, other = ("--tasks", "--data") if args.tasks is not None else ("--data", "--tasks")
    # --data and --tasks take every path after them: "eval base --data heldout out/dus" scored base on out/dus's model card
    # too, and "eval --data heldout out/dus" said no model was given (trial98 F1, F2)
    swallowed = _model_dir_after(args.data if args.data is not None else args.tasks, mode, "eval MODEL_DIR...")
    if swallowed:
        raise TaskError(f"eval: {swallowed}")
    if not args.model:
        raise TaskError(f"eval: no MODEL_DIR given (eval MODEL_DIR... {mode} ...)")
    ignored = [flag for flag, dest in EVAL_MODE_FLAGS[other].items() if getattr(args, dest) is not None and getattr(args, dest) is not False]
    if ignored:  # silently dropped, they would make the user believe the run was limited, seeded or cached as asked
        raise TaskError(f"eval: {', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} to {other} only, not {mode}")
    resolved = [Path(m).resolve() for m in args.model]
    twice = next((m for i, m in enumerate(args.model) if resolved[i] in resolved[:i]), None)
    if twice is not None:  # "eval base ./base" scored it twice under one label (trial73 F9h)
        first = args.model[resolved.index(Path(twice).resolve())]
        raise TaskError(f"eval: {twice} is {first} again: name each model once")
    if args.tasks is not None:
        return _eval_tasks(args)
    _check_data_links(args.data)
    import torch

    from midus_surgery.train.evaluate import ModelFailed, check_model_loads, eval_device, out_of_memory, run_eval, unforeseen, unforeseen_failure

    eval_device(args.device)  # a device this machine lacks: said before any model is read
    # every model checked as far as it goes without reading its weights, before the first evaluation; its tokenizer kept
    tokenizers = [check_model_loads(model, trust_remote_code=args.trust_remote_code, block_size=args.block_size, allow_pickle=args.allow_pickle)
                  for model in args.model]
    block_size = args.block_size if args.block_size is not None else _shared_eval_block(args.model, args)
    results = []
    for model, tokenizer in zip(args.model, tokenizers):  # each model's weights read once, to be evaluated
        try:
            result = run_eval(model, args.data, block_size=block_size, per_document=args.per_document,
                              batch_size=args.batch_size, max_blocks=args.max_blocks, dtype=args.dtype, text_field=args.text_field or "text",
                              cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code,
                              progress=not (args.quiet or args.json), threads=args.threads, device=args.device, tokenizer=tokenizer,
                              allow_pickle=args.allow_pickle)
        except (Exception, KeyboardInterrupt) as exc:
            # what the checks could not see (a tensor's bytes, a converting load, memory): the results before it are kept
            if results:  # the data were read: what they were read as is said with the scores (trial137 F1)
                _json_read_as_text(args.data)
            _eval_report(results, args)
            if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
                raise out_of_memory(model, exc, eval_device(args.device)) from None
            if isinstance(exc, MidusError) and len(args.model) > 1:
                raise ModelFailed(model, exc) from None
            if unforeseen(exc):  # a RuntimeError in its forward: one line (under the results before it), not a traceback
                raise ModelFailed(model, unforeseen_failure(model, exc)) from None
            raise
        results.append(result)
        if not args.json:
            print(f"{printable(result['model'])}: perplexity {result['perplexity']:.4f} (loss {result['loss']:.4f} nats/token) over "
                  f"{result['tokens']:,} predicted tokens in {result['sequences']} {'block' if result['mode'] == 'blocks' else 'document window'}"
                  f"{'' if result['sequences'] == 1 else 's'} of <= {result['block_size']} tokens"
                  + _not_scored(result)
                  + "; "
                  f"{result['tokens_read_per_s']:,.0f} tokens read/s ({result['dtype']} on {result['device']}, {result['seconds']:.1f} s)")
        if result["loss"] != result["loss"]:  # NaN: not a score, a broken model or a dtype that overflows (--json too: trial50)
            print(f"note: {printable(result['model'])}: the loss is not a number: its weights hold NaN or inf, or its activations overflow "
                  f"in {result['dtype']}", file=sys.stderr)
    _json_read_as_text(args.data)  # once scored: a refusal of the data or the cache stays the one line it is
    _eval_report(results, args)
    not_scored = [printable(r["model"]) for r in results if r["loss"] != r["loss"]]
    if not_scored:  # after every model's result: a script that checks the exit status took NaN for a score (exit 0)
        raise MidusError(f"eval: no perplexity for {', '.join(not_scored)}: the loss is not a number (the note above says why)")
    overflowed = [r for r in results if r["perplexity"] == float("inf")]
    if overflowed:  # a finite loss past ~709 nats: e^loss overflows, "perplexity": null in --json, and exit 0 read as a score
        said = ", ".join(f"{printable(r['model'])} (loss {r['loss']:,.1f} nats/token)" for r in overflowed)
        raise MidusError(f"eval: no perplexity for {said}: e^loss overflows past a loss of 709; a loss this far above the "
                         "log of the vocabulary size is a broken model (weights or activations far out of range)")
    return 0


def _shared_eval_block(models: list[str], args) -> int | None:
    """eval --data of several models without --block-size: one block size for all, the smallest of their defaults (512,
    or a model's positions when fewer), said in a note when they differ. Each at its own had scored one model over 128-token
    blocks and another over 64 on other tokens, side by side without a word; None leaves each model its default. The
    positions are read as run_eval reads them, from the model's config class (an alias such as RWKV's context_length
    counts: config.json's keys as written missed it, and a model was then asked for more blocks than it has positions)."""
    from midus_surgery.errors import MidusError
    from midus_surgery.train.evaluate import DEFAULT_EVAL_BLOCK, model_positions

    if len(models) < 2:
        return None
    defaults = {}
    for model in models:
        try:
            stated = model_positions(Path(model), trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
        except (MidusError, OSError, ValueError):  # check_model_loads read it already; as a guard only
            stated = None
        defaults[model] = min(DEFAULT_EVAL_BLOCK, stated[0] if stated else DEFAULT_EVAL_BLOCK)
    if len(set(defaults.values())) == 1:
        return None
    smallest = min(defaults.values())
    each = ", ".join(f"{printable(m)}: {n}" for m, n in defaults.items())
    print(f"note: every model is scored in blocks of {smallest} tokens, the smallest of their default block sizes ({each}), "
          "so that their perplexities cover the same windows; --block-size sets another", file=sys.stderr)
    return smallest


def _eval_report(results: list[dict], args) -> None:
    """After eval --data's models, or after those scored before one failed: the note on tokenizers that make other
    token ids, and with --json the results, one object for one model given, a list for several (a failure: those
    scored before it, in order; nothing when none was)."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["corpus_sha1"], []).append(r)
    if len(groups) > 1:  # trial54/56: compared per token without a word
        # models that share token ids are named together: those are comparable with each other
        counts = "; ".join(f"{', '.join(r['model'] for r in group)}: {group[0]['corpus_tokens']:,} tokens" for group in groups.values())
        shared = any(len(group) > 1 for group in groups.values())
        print(f"note: the models' tokenizers turn the data into different token ids ({counts}): a perplexity is per token, "
              f"so {'only those named together are comparable' if shared else 'theirs are not comparable'}", file=sys.stderr)
    if args.json and results:
        print(strict_json(results[0] if len(args.model) == 1 else results, indent=2))
    sys.stdout.flush()  # before the error line on stderr


def _eval_tasks(args) -> int:
    """eval --tasks: lm-evaluation-harness on every model, one table (or one JSON)."""
    import torch

    from midus_surgery.downstream.harness import TaskError, format_table, run_tasks

    if args.threads:
        torch.set_num_threads(args.threads)

    tasks = [t.strip() for entry in args.tasks for t in entry.split(",") if t.strip()]  # "a, b": ' b' reached lm-eval
    if not tasks or any(not entry.replace(",", "").strip() for entry in args.tasks):  # lm-eval said so after the first model loaded
        raise TaskError("--tasks: an empty task name (--tasks NAME..., space or comma separated)")
    try:
        result = run_tasks(args.model, tasks, include_path=args.include_path or [], allow_task_code=args.allow_task_code,
                           limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device,
                           seed=0 if args.seed is None else args.seed, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                           progress=not (args.quiet or args.json), allow_pickle=args.allow_pickle)
    except BaseException as exc:  # one of several failed, Ctrl-C, a full disk: the models scored before it are printed
        partial = getattr(exc, "partial", None)  # (the same table or JSON), then its error, or "interrupted"
        if partial is not None:
            print(strict_json(partial, indent=2) if args.json else format_table(partial), flush=True)
            _not_numbers_notes(partial["models"], args.dtype)
        raise
    print(strict_json(result, indent=2) if args.json else format_table(result), flush=True)
    broken = _not_numbers_notes(result["models"], args.dtype)
    if broken:  # after the table, as eval --data says a NaN loss: the exit status must not take it for a score
        raise MidusError(f"eval: no scores for {', '.join(printable(r['model']) for r in broken)}: log-likelihoods that are not "
                         "numbers (the note above says why)")
    return 0


def _not_numbers_notes(rows: list[dict], dtype: str) -> list[dict]:
    """A note for each scored model some of whose log-likelihoods are NaN or inf; those models."""
    broken = [r for r in rows if r["loglikelihoods_not_numbers"]]
    for r in broken:
        print(f"note: {printable(r['model'])}: {r['loglikelihoods_not_numbers']:,} of the {r['loglikelihoods']:,} log-likelihoods "
              f"its scores stand on are not numbers: its weights hold NaN or inf, or its activations overflow in {dtype}",
              file=sys.stderr)
    return broken


def _model_dir_after(values: list[str], flag: str, synopsis: str) -> str | None:
    """The first of ``values`` (what ``flag`` took) that is a folder transformers would load, config.json beside weights,
    as the message that says so; None when there is none."""
    for value in values:
        folder = Path(value)
        try:
            found = (folder / "config.json").is_file() and any(next(folder.glob(pattern), None) for pattern in
                                                                ("*.safetensors", "pytorch_model*.bin", "*.gguf"))
        except OSError:  # unreadable: its own error comes later, where it is read
            found = False
        if found:
            return (f"{printable(value)} follows {flag}, which takes every path after it, but it is a model directory (config.json "
                    f"beside weights): name the model{'s' if synopsis.endswith('...') else ''} first ({synopsis} {flag} ...)")
    return None


def _json_read_as_text(data) -> None:
    """A note for each --data file named *.json: it is read as plain text, its braces and keys scored with the text (JSON
    records, one a line, are read as JSONL only from .jsonl and .ndjson files); a perplexity of 52.9 against the
    records' 66.0 came without a word."""
    import glob

    from midus_surgery.train.config import DIR_GLOB
    from midus_surgery.train.data import DataError, resolve_inputs

    for given in data if isinstance(data, (list, tuple)) else [data]:
        if given is None:
            continue
        # the files the data reader reads for it: a quoted glob ('recs/**/*.json', '~/recs/*') reaches the tool unexpanded
        try:
            read = resolve_inputs([str(given)], Path.cwd(), DIR_GLOB, "--data")
        except (DataError, OSError):  # said where the data were read
            read = []
        for p in read:
            if p.name.lower().endswith(".json") and p.is_file():
                shown = str(given) if not glob.has_magic(str(given)) else os.path.relpath(p) if not Path(given).is_absolute() else str(p)
                print(f"note: {printable(shown)} is read as plain text, braces and keys included (JSON records, one a line, are read "
                      "as records from a .jsonl or .ndjson file)", file=sys.stderr)


def _check_data_links(data) -> None:
    """--data that is a link loop or a broken link: the data error train gives for one (exit 3), said before any model
    is read (eval and analyze said pathlib's own words, exit 2; trial63)."""

    from midus_surgery.train.data import check_data_links

    check_data_links([Path(p) for p in (data if isinstance(data, (list, tuple)) else [data]) if p is not None], what="--data")


def cmd_analyze(args) -> int:

    import numpy as np

    from midus_surgery.downstream.analyze import run_analysis

    swallowed = _model_dir_after(args.data, "--data", "analyze MODEL_DIR")
    if swallowed:
        raise UsageError(f"analyze: {swallowed}")
    if args.model is None:
        raise UsageError("analyze: no MODEL_DIR given (analyze MODEL_DIR --data ...)")
    _check_data_links(args.data)

    result = run_analysis(args.model, args.data, Path(args.out), block_size=args.block_size, max_blocks=args.max_blocks,
                          max_memory_blocks=args.max_memory_blocks, batch_size=args.batch_size, device=args.device,
                          dtype=args.dtype, progress=not args.quiet, threads=args.threads,
                          fixed_retrieval=Path(args.fixed_retrieval) if args.fixed_retrieval else None,
                          importance=not args.slots_only, text_field=args.text_field, cache_dir=args.cache_dir, allow_pickle=args.allow_pickle,
                          overwrite=args.overwrite)
    _json_read_as_text(args.data)  # once analysed: a refusal stays the one line it is
    rows, usages = result["head_importance"], result["slot_usage"]
    print(f"{printable(result['model'])}: held-out loss {result['held_out']['loss']:.4f} over {result['held_out']['blocks']} blocks of "
          f"{result['held_out']['block_size']} tokens; {result['what']}" + (", loss increase when zeroed (max, mean per layer):" if rows else ":"))
    for layer in rows or usages:
        deltas, usage = rows.get(layer), usages.get(layer)
        worth = f"max {_signed(max(deltas))} (head {int(np.argmax(deltas))}), mean {_signed(np.mean(deltas))}" if deltas else ""
        used = (f"slots used {np.mean(usage['used_fraction']):.1%}, entropy {np.mean(usage['entropy_vs_uniform']):.2f} of uniform, "
                f"top 1% {np.mean(usage['top1pct_share']):.1%}, |memory|/|residual| {usage['memory_to_residual_norm']:.3f}") if usage else ""
        print(f"  layer {layer}: {'; '.join(x for x in (worth, used) if x)}")
    fixed = result["fixed_retrieval"]
    if fixed:
        print(f"fixed retrieval: held-out loss {fixed['frozen_loss']:.4f} ({fixed['model']}, memory.retrieval: frozen) against "
              f"{fixed['learned_loss']:.4f} learned ({fixed['difference']:+.4f})")
    for note in result.get("notes", []):
        print(note)
    pngs = ["head_importance.png"] * bool(rows) + ["slot_usage.png"] * bool(usages)
    print(f"wrote {printable(args.out)} (analysis.json{''.join(', ' + p for p in pngs)})")
    return 0


def _signed(value: float) -> str:
    """A loss difference with its sign: four decimals, or two significant digits below 1e-4 (-1.1e-05 printed as -0.0000
    read as a sign on zero; trial79 F3)."""
    return f"{value:+.4f}" if value == 0 or abs(value) >= 1e-4 else f"{value:+.1e}"


def _add_train_commands(subparsers) -> None:
    """The train and eval subcommands."""
    p = subparsers.add_parser("train", help="continued pre-training of a model directory from a YAML config (accelerate)",
                              description="Train from a YAML config. Any key can be overridden: `midus-surgery train run.yaml optim.lr=1e-4 freeze=base`. "
                                          "Several processes or GPUs: `accelerate launch --multi_gpu --num_processes N -m midus_surgery.cli train run.yaml` "
                                          "or `torchrun --nproc_per_node N -m midus_surgery.cli train run.yaml` (without --multi_gpu, accelerate "
                                          "launch starts one process).")
    p.add_argument("config", nargs="?", metavar="CONFIG", type=_given_path("name the training config (YAML)"), help="the training config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted-key overrides, values read as YAML (e.g. optim.lr=3e-4 data.block_size=256)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--keys", action="store_true", help="print every config key with its default and meaning (Markdown), then exit")
    p.add_argument("--dry-run", action="store_true", help="check the config, model, data and outputs as a start does and say what would "
                   "run (steps, parameter groups, model state in memory), then exit; writes nothing, reads no weights (their headers only), tokenises nothing")
    p.set_defaults(func=cmd_train)

    # the model folders are optional to argparse only so that cmd_eval can say, when --data took them, that it did: the
    # usage line says them as they must be given
    p = subparsers.add_parser("eval", help="held-out perplexity (--data) or downstream tasks (--tasks, lm-evaluation-harness) of causal LM directories",
                              usage="midus-surgery eval [-h] MODEL_DIR [MODEL_DIR ...] (--data PATH [PATH ...] | --tasks TASK [TASK ...]) [options]",
                              description="Several models are evaluated one after the other on the same data or tasks, with the same seed. "
                                          "Every model is checked first without reading its weights (config, tokenizer, the weights' headers "
                                          "against the architecture), then loaded once. One that still fails later ends the command (non-zero "
                                          "exit, one error line naming it) after the results of the models before it are printed: their "
                                          "lines, or with --json the list of their results.")
    p.add_argument("model", nargs="*", metavar="MODEL_DIR", type=_model_path, help="one or more model folders (config.json beside the weights), given "
                   "before --data or --tasks, which take every path after them")
    p.add_argument("--data", nargs="+", metavar="PATH", type=_data_path, help="held-out perplexity on text files, directories, globs, JSONL, or a token cache directory")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="lm-evaluation-harness task names (space or comma separated; needs the eval extra: "
                   "pip install -e \".[eval]\"); tasks of --include-path folders too")
    p.add_argument("--include-path", action="append", metavar="DIR", type=_given_path("name the folder of task YAMLs"), help="a folder of lm-eval task YAMLs (e.g. the offline suite of tools/make_task_suite.py); repeatable")
    p.add_argument("--allow-task-code", action="store_true", help="let --include-path tasks run Python (!function, includes, HF evaluate metrics) and render their templates unsandboxed")
    p.add_argument("--limit", type=float, default=None, help="--tasks: at most this many items per task (a fraction below 1)")
    p.add_argument("--num-fewshot", type=_int_at_least(0), default=None, help="--tasks: few-shot examples (default: each task's own)")
    p.add_argument("--seed", type=_seed, default=None, help="--tasks: the seed of every random choice lm-eval makes (default 0)")
    p.add_argument("--block-size", type=_int_at_least(2), help="tokens per block / window (default 512, or the model's positions when fewer)")
    p.add_argument("--per-document", action="store_true", help="evaluate each document on its own (windows of --block-size) instead of packed blocks")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--max-blocks", type=_int_at_least(1), default=None, help="evaluate at most this many blocks / windows")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype to run the model in (default float32)")
    p.add_argument("--text-field", default=None, type=_field_name, help="the JSONL field holding the text (default: text)")
    p.add_argument("--cache-dir", default=None, type=_cache_folder,
                   help="token cache (default: $MIDUS_CACHE/tokens or ~/.cache/midus-surgery/tokens)")
    p.add_argument("--device", default="auto", help="auto (default: the first CUDA device when there is one, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (refused above 4 x the CPUs os.cpu_count() reports)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model directory's own modeling code (config.json auto_map; without it such a model is refused)")
    p.add_argument("--allow-pickle", action="store_true", help="read model folders whose weights are pickle .bin files alone (with weights_only=True; without it they are refused)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("analyze", help="what a MIDUS model's memory does on held-out text: head importance, slot usage (JSON + PNG)",
                              usage="midus-surgery analyze [-h] MODEL_DIR --data PATH [PATH ...] --out DIR [options]",
                              description="Head importance (held-out loss when one memory head is zeroed; for a model without "
                                          "memory, the inserted blocks' attention heads) and slot usage per Memory block.")
    p.add_argument("model", nargs="?", metavar="MODEL_DIR", type=_model_path, help="the model folder (required), given before --data, which takes every path "
                   "after it")  # optional to argparse: cmd_analyze says whether --data took it
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", type=_data_path, help="held-out text: files, directories, globs, JSONL")
    p.add_argument("--out", required=True, metavar="DIR", type=_folder_to_write,
                   help="where analysis.json and the PNGs go (a new directory, or an earlier analysis with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier analysis in --out")
    p.add_argument("--block-size", type=_int_at_least(2), help="tokens per block (default 256, or the model's positions when fewer)")
    p.add_argument("--max-blocks", type=_int_at_least(1), default=16, help="held-out blocks per measurement (default 16)")
    p.add_argument("--max-memory-blocks", type=_int_at_least(1), default=None, help="analyse only the first N Memory (or inserted) blocks")
    p.add_argument("--slots-only", action="store_true", help="slot usage only, no head importance (one held-out pass instead of one per head)")
    p.add_argument("--text-field", default="text", type=_field_name, help="the JSONL field holding the text (default: text)")
    p.add_argument("--cache-dir", default=None, type=_cache_folder,
                   help="token cache (default: $MIDUS_CACHE/tokens or ~/.cache/midus-surgery/tokens)")
    p.add_argument("--fixed-retrieval", metavar="MODEL_DIR", type=_given_path("name the frozen-retrieval run's export, or leave "
                   "--fixed-retrieval out"), help="a model trained like MODEL_DIR but with memory.retrieval: frozen: "
                   "its held-out loss on the same blocks, against the learned retrieval's")
    p.add_argument("--batch-size", type=_int_at_least(1), default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype to run the model in (default float32)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (refused above 4 x the CPUs os.cpu_count() reports)")
    p.add_argument("--allow-pickle", action="store_true", help="read model folders whose weights are pickle .bin files alone (with weights_only=True; without it they are refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_analyze)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="midus-surgery", description="Memory-Infused Depth Up-Scaling: compile YAML recipes into deeper models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check recipes against their base models' configs and safetensors headers (no weights read)",
                       description="Check each recipe against its base model's config (and, when the weights are there, their "
                                   "safetensors headers), that its identity and memory blocks start as the base's function (on a tiny "
                                   "random replica), and that output.dir is a place apply may write. Nothing is written.",
                       epilog=RECIPE_EXITS)
    p.add_argument("recipes", nargs="+", metavar="RECIPE", type=_recipe_path, help="recipe YAML files (each checked and reported on its own)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="print the layer map, parameter and FLOP counts of a recipe (headers only, no weights read)",
                       description="Print what apply would write: the layer map, the block anatomy, whether the output starts as "
                                   "the base's function, parameter and FLOP counts against plain DUS, and validate's notes. "
                                   "Nothing is written and no weights are read.", epilog=RECIPE_EXITS)
    p.add_argument("recipe", metavar="RECIPE", type=_recipe_path, help="one recipe YAML file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--tensors", action="store_true", help="include the tensor map")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("apply", help="emit the up-scaled model a recipe describes",
                       description="Stream the base weights into the up-scaled model the recipe describes (sharded safetensors, "
                                   "config, tokenizer, model card, initialised memory), after saying the notes validate would say. "
                                   "The output is written into a hidden folder beside it and renamed into place when whole.",
                       epilog=RECIPE_EXITS + "; 1: the machine stopped it (a full disk), nothing half-written kept, or with --verify: "
                              "the output is written, whole, and a verify check failed or could not run (the lines above say which)")
    p.add_argument("recipe", metavar="RECIPE", type=_recipe_path, help="one recipe YAML file")
    p.add_argument("--out", type=_model_folder_to_write, help="output directory, relative to the current directory as every path on the command line (default: the recipe's "
                   "output.dir, relative to the recipe's folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory that midus-surgery wrote (it carries a .midus-surgery marker); "
                        "a directory the tool did not write, an input, the current directory or a file is never replaced")
    p.add_argument("--allow-pickle", action="store_true", help="read pickle .bin base weights (with weights_only=True)")
    p.add_argument("--verify", action="store_true", help="run `verify` on the output right after emitting it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--full-plan", action="store_true",
                   help="plan through transformers even where the safetensors headers suffice (debugging; also MIDUS_SURGERY_FULL_PLAN=1)")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("verify", help="load an emitted model and check it (tensors, identity at start, KV cache, reload)",
                       description="Load a model directory and check it, each check one line (PASS, FAIL, or SKIP saying why): "
                                   "every tensor loaded, rows of a batch independent, the logits at start the base's (bit for "
                                   "bit, also with the base's norms perturbed), every copied tensor the base's, per-layer config "
                                   "lists remapped, KV-cache generation, a save and reload. Nothing is written beside the model.",
                       epilog="exit status: 0 every check passed (or was skipped, saying why); 1: a check failed; 2: the model "
                              "cannot be checked (it does not load, or runs its own code without --trust-remote-code)")
    p.add_argument("model", metavar="MODEL_DIR", type=_model_path, help="the model directory to check (an apply or train output, or any "
                                                      "causal LM directory transformers loads)")
    p.add_argument("--base", type=_given_path("name the base model's folder, or leave --base out for the one recorded at apply time"),
                   help="the base model to compare logits with (default: the one recorded at apply time)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the model's own modeling code (auto_map), and the base's: read it first")
    p.set_defaults(func=cmd_verify)

    _add_train_commands(sub)

    p = sub.add_parser("schema", help="print the recipe JSON Schema (for editors and tools)",
                       description="Print the JSON Schema of recipes (the same as docs/recipe.schema.json): editors with a "
                                   "YAML language server complete and check recipes from it.")
    p.set_defaults(func=cmd_schema)
    return parser


RECIPE_EXITS = "exit status: 0 valid; 2: a problem in the recipe, each said with its file:line:col"


def parse_arguments(argv: list[str] | None = None):
    """The parsed command line. train's key=value overrides may also follow its options
    (`train run.yaml --quiet optim.lr=1e-4`): argparse stops filling a positional list at the
    first option and would call the rest unrecognised."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    needs_no_folder = getattr(args, "func", None) is cmd_schema or getattr(args, "keys", False)
    if _cwd_gone() and not needs_no_folder:  # torch, transformers and every relative path fail without it (trial156 3, trial158 F1)
        err.print(f"error: {CWD_GONE}", markup=False)
        sys.exit(2)
    if unknown and getattr(args, "func", None) is cmd_train and all("=" in a and not a.startswith("-") for a in unknown):
        args.overrides = [*args.overrides, *unknown]
    elif unknown:  # said with the command's own usage (`plan A B` printed the top-level one; trial77 F11)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    return _dispatch(parse_arguments(argv))


def _dispatch(args) -> int:
    try:
        try:
            with warnings.catch_warnings():
                # transformers' deprecation notices (a base config's rope_scaling) came before the one line a refused
                # input gets, with a path into site-packages: noise the user cannot act on through this tool
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
                return args.func(args)
        except BaseException:
            _ignore_sigterm()  # a launcher's SIGTERM to the survivors must not cut the one-line report below into a traceback
            raise
    except RecipeError as exc:
        err.print(str(exc), markup=False)
        return exc.exit_code
    except MidusError as exc:
        err.print(f"error: {_message_lines(exc)}", markup=False)
        return exc.exit_code
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        # a path the user gave cannot hold what the command writes there (a folder under a file, a
        # read-only place): the checks before the work name most such paths; these are the rest
        err.print(f"error: cannot write {exc.filename}: {exc.strerror}", markup=False)
        return 2
    except OSError as exc:
        if exc.errno in FULL_DISK_ERRNOS:
            return _disk_full(exc, command=args.func)
        if exc.errno == errno.EPIPE:
            return _reader_gone()
        if isinstance(exc, FileNotFoundError) and _cwd_gone():  # a relative path met anywhere: pathlib's traceback (trial156 3)
            err.print(f"error: {CWD_GONE}", markup=False)
            return 2
        if exc.filename is None:
            raise
        # a path the system will not make or open (/proc/x: FileNotFoundError on mkdir): one line too
        err.print(f"error: cannot make or open {exc.filename}: {exc.strerror}", markup=False)
        return 2
    except RuntimeError as exc:
        if not str(exc).startswith("Symlink loop from"):  # pathlib's resolve() on a path that links to itself
            raise
        err.print(f"error: {exc}: a path given (or reached through a link) points back at itself", markup=False)
        return 2
    except KeyboardInterrupt as exc:
        _ignore_sigterm()  # a second Ctrl-C or SIGTERM now would interrupt the report: chained tracebacks, exit 1 (trial40)
        after = f": {exc.midus_note}" if getattr(exc, "midus_note", None) else ""  # what was finished when it came
        if isinstance(exc, Terminated):
            err.print(("hung up" if exc.signum == signal.SIGHUP else "terminated") + after, markup=False)
            return 128 + exc.signum
        err.print("interrupted" + after, markup=False)
        return 130
    except Exception as exc:  # noqa: BLE001 - a full disk reaches us through safetensors' and torch's own errors too
        if "No space left on device" not in str(exc) and "Disk quota exceeded" not in str(exc) and not file_too_large(exc):
            raise
        return _disk_full(exc, command=args.func)


def _message_lines(exc: MidusError) -> str:
    """The error as printed: a recipe's problems as they are (their places and values are written escaped; a problem may
    end with a second line of advice, the anatomy's), any other error as one line with its control characters escaped: a
    newline in a path such a message names (eval --data, verify --base) printed a second line the name chose (trial99 M3,
    trial102 R11), escaped here once, whatever message carries it."""
    return str(exc) if isinstance(exc, RecipeError) else printable(str(exc))


FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: one file past a size limit (ulimit -f, FAT32)


def _disk_full(exc: BaseException, *, command=None) -> int:
    """A write that ran out of space, or past the size one file may have: one line. Outputs are written
    into hidden partial folders, so nothing half-written is left in place; a training run resumes from
    its last whole checkpoint."""
    # a copy's error names its source first and the file it was writing second (filename2)
    target = getattr(exc, "filename2", None) or getattr(exc, "filename", None)
    where = f" writing {target}" if target else ""
    if file_too_large(exc):
        # the weights are sharded at a size the user sets: the way under such a limit (trial97 F7: the export said none)
        smaller = {cmd_apply: " (or a smaller output.shard_size, which keeps each file under it)",
                   cmd_train: " (or a smaller export.shard_size, which keeps each weights file of the export under it, and "
                              "resume: auto)"}.get(command, "")
        err.print(f"error: {FILE_TOO_LARGE}{where}; nothing half-written was kept: raise the limit or write to another file "
                  f"system{smaller}, and run again", markup=False)
        return 1
    err.print(f"error: the disk is full{where} ({one_line(exc, 200)}); nothing half-written was kept: free space and run again",
              markup=False)
    return 1


def _reader_gone() -> int:
    """The reader of the output went away (``| head``): stop quietly, as a Unix tool that SIGPIPE
    ends does (exit 141), with nothing half-written left (the same clean-up as any failure ran on
    the way here). stdout goes to /dev/null first, or the interpreter's last flush raises again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test's captured output)
        pass
    return 141


def _on_sigterm(signum, frame) -> None:
    Terminated.last = stop = Terminated(signum)
    raise stop


def _deliver_again(unraisable) -> None:
    """``sys.unraisablehook``: a Ctrl-C (or SIGTERM, SIGHUP) whose handler ran inside a weakref callback or a
    ``__del__`` is dropped by Python, which only prints such an exception: one landing while the garbage collector
    ran torch's weakref callbacks (loading a GGUF base) was lost, and apply went on, wrote its output and exited 0
    (trial82 F2). The signal is sent again, from a thread so that it reaches the main thread's own code once the
    callback is over (one landing in another callback comes back here). Other such exceptions are printed as before."""
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)
        return
    signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
    again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
    again.daemon = True  # the program may end before it fires: then there is nothing left to interrupt
    again.start()


def _ignore_sigterm() -> None:
    """From here the program only reports and exits: a SIGTERM now (torchrun stops every process once
    one has failed) or a second Ctrl-C would raise inside the report or the interpreter's shutdown. Only
    where ``run`` installed the handlers: ``main`` called in-process leaves the caller's signals as they are."""
    if signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        return
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signum != signal.SIGHUP or signal.getsignal(signum) is _on_sigterm:
            signal.signal(signum, signal.SIG_IGN)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The tool's own warnings (``midus-surgery: ...``: the CPU kernels unavailable, the slower path taken) as one
    "warning:" line on stderr, not Python's file:line and source line; other libraries' as Python shows them."""
    text = str(message)
    if not text.startswith("midus-surgery"):  # as Python's own showwarning writes it
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    text = text.removeprefix("midus-surgery").lstrip(": ")
    err.print(f"warning: {printable(' '.join(text.split()))}", markup=False)



def run() -> None:
    """The program's entry point (the console script and ``python -m midus_surgery.cli``).

    A successful ``apply`` exits without the interpreter's teardown (``os._exit``, as mypy does):
    freeing pydantic's and the plan's objects one by one took ~30 ms, a tenth of applying a small
    model, and by then apply has closed, renamed and reported everything it wrote."""
    try:
        args = parse_arguments()
    except KeyboardInterrupt:  # Ctrl-C while the command's modules import: one line, as during the work (trial143 F4)
        err.print("interrupted", markup=False)
        sys.exit(130)
    sys.unraisablehook = _deliver_again
    warnings.showwarning = _show_warning
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:  # not under nohup, which asked for it to be ignored
        signal.signal(signal.SIGHUP, _on_sigterm)
    code = _dispatch(args)
    _ignore_sigterm()
    if code == 0 and args.func is cmd_apply:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


if __name__ == "__main__":
    run()
