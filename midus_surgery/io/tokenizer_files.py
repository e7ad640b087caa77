"""Which files of a model folder are its tokenizer's (read as names only: nothing is opened but to check its kind), and the
code its tokenizer_config.json names (read as JSON, never imported)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from midus_surgery.io.json_text import loads_as_tokenizer_config
from midus_surgery.io.small_files import file_kind, regular_file_problem

TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece", "special_tokens_map", "added_tokens")


def has_tokenizer_files(directory: Path) -> bool:
    return any(p.name.startswith(TOKENIZER_FILE_PREFIXES) for p in Path(directory).iterdir())


def odd_tokenizer_files(directory: Path) -> str | None:
    """Why a model folder's tokenizer files cannot be read (one that is a named pipe, a device or a folder), or None.
    transformers opens tokenizer_config.json as it finds it: a pipe there made eval wait forever (trial66)."""
    odd = [p.name for p in sorted(Path(directory).iterdir()) if p.name.startswith(TOKENIZER_FILE_PREFIXES) and regular_file_problem(p)]
    return (f"{', '.join(odd[:3])} {'is' if len(odd) == 1 else 'are'} not a regular file (a named pipe, a device or a folder), "
            "so no tokenizer reads it") if odd else None


def tokenizer_auto_map(config: Path):
    """tokenizer_config.json's ``auto_map`` as transformers' tokenizer loader reads the file (plain ``json.load``: a number
    past a float's range is infinity there, not an error), the older list form as {"AutoTokenizer": the list}; None where
    it holds none or transformers could not read it either. One reader for every question about the tokenizer's code:
    where a stricter reader refused the file over an unrelated 1e400, every check of its code was skipped while
    transformers loaded it and ran that code (trial129 F1)."""
    try:
        if not config.is_file():
            return None
        auto_map = loads_as_tokenizer_config(config.read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(auto_map, list):  # the older form, which transformers 5 still reads: the AutoTokenizer pair itself (trial103)
        return {"AutoTokenizer": auto_map}
    return auto_map if isinstance(auto_map, dict) else None


def _tokenizer_code_refs(config: Path) -> list[str]:
    """The references a tokenizer_config.json's ``auto_map`` holds (``tok.MyTokenizer``, ``owner/repo--tok.MyTokenizer``),
    of every entry: transformers reads more than AutoTokenizer's from it (AutoProcessor.from_pretrained takes its
    AutoProcessor entry: trial111), and apply copies them all, so every one is named (escaped: a decoy of trial104)."""
    auto_map = tokenizer_auto_map(config) or {}
    return [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]


MAX_MODULE_BYTES = 4 * 2**20  # a Python module beside a tokenizer: kilobytes; read whole to find its imports


def relative_import_files(module: Path) -> list[str]:
    """The names of the files beside ``module`` that it imports relatively (``from .helper import X`` -> helper.py), and
    theirs, as transformers finds them (read as text, never imported): it runs them with the module (trial111).
    Every name transformers would open is returned, one that is no module name inside the base too (``from .sub/../x``,
    ``from ./tmp/x``: its regex reads docstrings as well), so that the caller holds it to code_file_problem's rule."""
    from transformers.dynamic_module_utils import get_relative_imports  # its own regex: no name slips between the two

    directory = module.parent  # transformers opens f"{module_dir / m}.py" for every name, nested imports too
    found: list[str] = []
    todo = [module.name]
    while todo:
        name = todo.pop()
        # a regular file of a module's size only (code_file_problem): a named pipe there hung validate, plan and apply,
        # a link to /dev/zero ended in a MemoryError (trial113, trial114)
        if code_file_problem(directory, name, entry=name == module.name):  # a helper's mark is no bar (code_file_problem)
            continue
        try:
            imports = get_relative_imports(str(directory / name))
        except (OSError, ValueError):  # a file it does not hold (named, so the copy warns of it), or one that is no UTF-8 text
            continue
        for new in sorted(f"{m}.py" for m in imports):
            if new not in found and new != module.name:
                found.append(new)
                todo.append(new)
    return found


def tokenizer_code_files(config: Path) -> list[str]:
    """The module files a tokenizer_config.json's ``auto_map`` names (``tok.MyTokenizer`` -> tok.py), with the files they
    import relatively: a tokenizer with its own code loads (with trust_remote_code) only with them beside it. A reference
    into another Hub repository (``owner/repo--tok.MyTokenizer``) is that repository's, not the folder's.
    The names are the file's text: show them through printable()."""
    names = set(tokenizer_entry_modules(config))
    for name in sorted(names):
        names.update(relative_import_files(config.parent / name))  # read only where code_file_problem allows
    return sorted(names)


def tokenizer_entry_modules(config: Path) -> list[str]:
    """The module files a tokenizer_config.json's ``auto_map`` names itself (not through a relative import): those a loader
    opens first, parsing them before it runs them (code_file_problem's ``entry``)."""
    # transformers reads a reference as exactly "module.Class" (a module file beside the config): nothing else loads;
    # ".Tok" names the module "" (the file .py), which transformers opens as it opens any other
    # AutoTokenizer given as one string: the module transformers opens indexing it (entry_module: "t.Tok" the file .py),
    # and the module the string names where that is a module's name (t.py, which a pair written from it needs); ".Tok"
    # opens nothing, so its ".py" is neither named nor carried
    auto_map = tokenizer_auto_map(config) or {}
    refs = [r for key, value in auto_map.items() for r in (value if isinstance(value, list) else [value])
            if isinstance(r, str) and not (key == "AutoTokenizer" and isinstance(value, str)
                                           and not is_module_file_name(str(reference_module(r))))]
    names = {n for n in map(reference_module, refs) if n and "/" not in n and "\\" not in n}
    module = entry_module(auto_map.get("AutoTokenizer"))  # a bare string's: the module its second character names
    if module and "/" not in module and "\\" not in module:
        names.add(module)
    return sorted(names)


def tokenizer_code_users(directory: Path) -> dict[str, list[str]]:
    """For each module file tokenizer_config.json's ``auto_map`` names (and each of their relative imports), the entries
    that need it ("AutoProcessor", "AutoTokenizer's slow entry"): what will not load without it."""
    auto_map = tokenizer_auto_map(directory / "tokenizer_config.json") or {}
    users: dict[str, list[str]] = {}
    for key, value in auto_map.items():
        for ref, label in _entry_users(key, value):
            module = reference_module(ref)
            if module is None:
                continue
            imports = relative_import_files(directory / module) if "/" not in module and "\\" not in module else []
            for name in [module, *imports]:
                if label not in users.setdefault(name, []):
                    users[name].append(label)
    return users


def _entry_users(key, value) -> list[tuple[str, str]]:
    """(reference, the label of what needs its module) for each reference of one ``auto_map`` entry a loader opens.
    AutoTokenizer's is read as entry_module reads it ("t.Tok" blamed t.py on it, which it never opens): the
    reference it takes, labelled "AutoTokenizer", and a pair's other (slow) slot, "AutoTokenizer's slow entry"; a bare
    string's characters past the second, or a list's items past the pair, it never opens, and none is labelled."""
    if key != "AutoTokenizer":
        return [(ref, str(key)) for ref in (value if isinstance(value, list) else [value])]
    taken = entry_reference(value)
    found = [(taken, "AutoTokenizer")] if taken is not None else []
    if isinstance(value, (list, tuple)) and len(value) > 1 and value[1] is not None:
        found.append((value[0], "AutoTokenizer's slow entry"))
    return found


def auto_tokenizer_entry(directory: Path):
    """tokenizer_config.json's ``auto_map`` AutoTokenizer entry as transformers 5 takes it (the older list form is the
    entry itself), or None."""
    return (tokenizer_auto_map(directory / "tokenizer_config.json") or {}).get("AutoTokenizer")


def entry_module(entry) -> str | None:
    """The module file AutoTokenizer opens for an auto_map ``entry``, as transformers 5 picks it
    (models/auto/tokenization_auto.py, dynamic_module_utils.get_class_from_dynamic_module), or None where it opens none
    (it fails first, or the reference is another repository's). It indexes the entry as a [slow, fast] pair, taking the
    fast slot unless it is null, a bare string too: "t.Tok"[1] is ".", the module "" (the file .py), which it reads and
    runs; a string whose second character is no '.' fails before any file is opened, as does one shorter than two."""
    return reference_module(entry_reference(entry))


def reference_module(reference) -> str | None:
    """The module file beside tokenizer_config.json an auto_map reference names ("tok.Tok" -> tok.py; ".Tok" -> .py, which
    transformers opens as any other), or None: no reference, another repository's or folder's ("x--tok.Tok"), or no
    "module.Class" shape, which loads nothing."""
    if not isinstance(reference, str) or "--" in reference or reference.count(".") != 1:
        return None
    return reference.split(".")[0] + ".py"


def entry_reference(entry) -> str | None:
    """The reference AutoTokenizer takes from an auto_map ``entry`` (entry_module's rule), or None where it takes none.
    A "repo--module.Class" one is read from that Hub repository, or from that folder where one of that name exists (a
    path before the "--" is a folder transformers reads and runs code from: trial129 F0)."""
    if not isinstance(entry, (list, tuple, str)) or len(entry) < 2:
        return None
    reference = entry[1] if entry[1] is not None else entry[0]
    return reference if isinstance(reference, str) else None


def auto_tokenizer_files(directory: Path) -> list[str]:
    """The code files ``AutoTokenizer.from_pretrained(directory, trust_remote_code=True)`` opens, as transformers 5 picks
    them (entry_module): the AutoTokenizer entry's module, with its relative imports. Other entries (AutoProcessor...)
    are read by other loaders, not by this one (trial121 F2). Names with '/' are kept: transformers would open them, so
    the caller refuses them."""
    module = entry_module(auto_tokenizer_entry(directory))
    return [module, *relative_import_files(directory / module)] if module else []


def code_file_problem(directory: Path, name: str, *, hazards_only: bool = False, entry: bool = True) -> str | None:
    """Why apply does not carry (nor read) the base's code file ``name``, as words that follow the name ("is a device, not a
    regular file"), or None: a regular file of a module's size inside the base (a Hub cache snapshot's link into its blobs
    is), in UTF-8 as transformers reads it. The one rule for what is read, copied, and named by the note and the card, for
    config.json's code and the tokenizer's alike: a link leading out was named as copied and left behind (trial113); a pipe
    hung the config path, and /dev/zero or a 1 GiB file ended in a MemoryError there, while the tokenizer path copied the
    1 GiB whole (trial114); a Latin-1 tokenizer module was copied without a word into an output whose tokenizer then failed
    with a bare codec error (trial121 F1).
    ``hazards_only``: only what must stop a reader that opens the file (transformers loading a GGUF's tokenizer code): a
    name leading elsewhere, no regular file (a pipe hangs it), a link leading out, text that is not UTF-8 (a codec error
    naming no file), a file over the size bound (it cannot be checked: its own imports are never read here, and a pipe or
    a link leading out behind it was opened by transformers, a 1 GiB one read whole and copied into its cache). A missing
    file is None then: transformers says so itself, and apply warns that it is not copied (trial121 F2).
    ``entry``: the module an ``auto_map`` reference names, which transformers parses (check_imports' ast.parse) before
    it runs it, and which fails there on a byte-order mark; a relative import (``entry=False``) is imported by importlib,
    which strips the mark, so a mark is no bar there (a helper that loaded was refused)."""
    from midus_surgery.errors import MidusError
    from midus_surgery.io.tensor_source import inside_base

    if "/" in name or "\\" in name:  # transformers would open a path below, above or outside the base (an absolute one)
        return "is not a module name inside the base"
    try:
        info = os.stat(directory / name)
    except (OSError, ValueError):  # missing, a broken link, a name too long to be a file's (ENAMETOOLONG: trial113)
        return None if hazards_only else "is not a file in the base directory"
    if not stat.S_ISREG(info.st_mode):
        return f"is {file_kind(info.st_mode)}, not a regular file"
    if info.st_size > MAX_MODULE_BYTES:  # never read here, not even for its encoding
        if hazards_only:  # its imports unread: what transformers would open behind it is unchecked
            return (f"is {info.st_size:,} bytes, more than the {MAX_MODULE_BYTES:,} a Python module is read up to, so it "
                    "cannot be checked (its own imports are not read)")
        return f"is {info.st_size:,} bytes, more than the {MAX_MODULE_BYTES:,} a Python module is read or copied up to"
    try:
        inside_base(directory, name, f"the base's {name}")
    except MidusError:
        return "is a link leading out of the base directory"
    return _not_utf8(directory / name, entry)


def _not_utf8(path: Path, entry: bool = True) -> str | None:
    """Why transformers cannot read ``path`` (a small regular file), or None: it reads every module and relative import as
    UTF-8 (a coding cookie notwithstanding), and its bare codec error named no file; a byte-order mark it keeps in the
    text, and the ``entry`` module it loads then fails with a SyntaxError naming no file (a relative import's mark is
    stripped by importlib, which runs it)."""
    try:
        if path.read_bytes().decode("utf-8").startswith("\ufeff") and entry:  # ast.parse of its text: "invalid non-printable character"
            return "starts with a UTF-8 byte-order mark (U+FEFF) that transformers does not strip when it reads a module"
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}), as transformers reads a module"
    except OSError as exc:  # unreadable (its permissions), or gone since the stat
        return f"could not be read ({exc.strerror})"
    return None


def tokenizer_code_problems(directory: Path) -> dict[str, str | None]:
    """For each tokenizer code file of ``directory`` (tokenizer_code_files), why apply does not copy it
    (code_file_problem), or None. A module some code imports relatively is held to a relative import's rule, even where
    an entry names it too: the code importing it loads with it, and without it does not."""
    config = directory / "tokenizer_config.json"
    names = tokenizer_code_files(config)
    entries = tokenizer_entry_modules(config)
    imported = {i for name in entries for i in relative_import_files(directory / name)}
    return {name: code_file_problem(directory, name, entry=name in entries and name not in imported) for name in names}


def tokenizer_code(directory: Path) -> tuple[list[str], list[str]]:
    """(the tokenizer code files apply copies from ``directory``, those its tokenizer_config.json names that it cannot:
    code_file_problem says why)."""
    problems = tokenizer_code_problems(directory)
    return [name for name, problem in problems.items() if problem is None], [name for name, problem in problems.items() if problem]


def is_module_file_name(name: str) -> bool:
    """Whether ``name`` (``tok.py``) is a Python module's file, as transformers imports ``tok.MyTokenizer``: any other name
    (a newline, an escape sequence) is no code a tokenizer needs, only text meant to be shown (trial104)."""
    return name.endswith(".py") and name.removesuffix(".py").isidentifier()


def tokenizer_code_repos(config: Path) -> list[str]:
    """The other Hub repositories whose code a tokenizer_config.json's ``auto_map`` names (``owner/repo--tok.MyTokenizer``):
    the output keeps the reference, and a load with trust_remote_code=True downloads and runs that code (trial102 R08)."""
    return sorted({r.split("--", 1)[0] for r in _tokenizer_code_refs(config) if "--" in r})


def reference_place(repo: str) -> str:
    """What a "repo--module.Class" reference's part before "--" names, as transformers reads it (get_cached_module_file:
    a local folder where one of that name exists, from the working directory, else a Hub repository), in words for
    the note and the card: "/abs/path--tok.Tok" was called code of a Hub repository, and nothing is downloaded; the
    output keeps the reference, so a trusted load of it runs that folder's code wherever the folder exists."""
    try:
        local = os.path.isdir(repo)
    except (OSError, ValueError):  # a NUL, a name too long to be a path's
        local = False
    return "code of the local folder {}, outside the base" if local else "code of the Hub repository {}"


def tokenizer_config_unreadable(config: Path) -> str | None:
    """Why transformers' tokenizer loader cannot read ``config`` (a tokenizer_config.json), in its own words, or None: it
    opens the file as UTF-8 and reads it with plain ``json.load``, so a byte-order mark, a byte that is not UTF-8 or
    nesting too deep fails it. A GGUF base's tokenizer is loaded through it, and apply then writes none: validate and
    plan said OK without a word of it."""
    import json

    try:
        if not config.is_file():
            return None
        with open(config, encoding="utf-8") as handle:
            json.load(handle)
    except (ValueError, RecursionError) as exc:  # a UnicodeDecodeError or a JSONDecodeError is a ValueError
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    except OSError:
        return None
    return None


def hub_load_warnings(directory: Path, names: list[str]) -> list[str]:
    """One warning for each of ``names`` (code files the output carries, in ``directory``, already held to code_file_problem's
    rule: small regular files) that starts with a UTF-8 byte-order mark. A helper's mark is no bar to a load from a folder
    (Python strips it when it imports the module, code_file_problem's ``entry``), but transformers' Hub branch parses every
    module it fetches, relative imports included (check_imports' ast.parse), and fails on it: an output that loads here
    would not load once published."""
    from midus_surgery.errors import printable

    marked = []
    for name in names:
        try:
            with open(directory / name, "rb") as handle:
                if handle.read(3) == b"\xef\xbb\xbf":
                    marked.append(name)
        except OSError:
            continue
    return [f"the base's code {printable(name)[:80]} starts with a UTF-8 byte-order mark: copied, and a load of the output from its "
            "folder runs it (Python strips the mark of a module it imports), but a load from the Hub parses every module first and "
            "fails on the mark (SyntaxError: invalid non-printable character U+FEFF): remove its first 3 bytes before publishing "
            "the output" for name in marked]
