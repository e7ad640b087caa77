"""What an ``--include-path`` task folder may do without ``--allow-task-code``: describe data, nothing more.

lm-eval reads task YAMLs with a loader of its own, and several of their entries run Python:

- a ``!function`` tag (also when spelt through a ``%TAG`` directive or verbatim, ``!<!function>``)
  imports a file beside the YAML, or any importable module;
- ``include:`` reads another YAML, wherever it lies, with the same loader;
- a metric lm-eval does not know (or any with ``hf_evaluate: true``) goes to HF evaluate's
  ``load``, which imports a metric script from a local path;
- every ``doc_to_*`` template renders in a Jinja environment that is not sandboxed, where
  ``{{ cycler.__init__.__globals__.os.system(...) }}`` runs a command.

So, unless the user passes ``--allow-task-code``: every YAML in the folders (and everything they
include) is composed, not constructed, and refused at the first tag outside YAML's core schema,
the first metric lm-eval does not know, or ``hf_evaluate``; and for the run lm-eval renders its
templates in jinja2's ``SandboxedEnvironment`` (``sandboxed_templates``), which refuses a template
that reaches for Python's internals, and (bounded here) one that would run without end.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

from midus_surgery.errors import MidusError, one_line
from midus_surgery.io.output_dir import kernel_file_system
from midus_surgery.io.small_files import read_small_text, regular_file_problem

ALLOW = "pass --allow-task-code if you trust this folder"
TASK_YAML_BYTES = 4 << 20  # a task description is a few KB; lm-eval's largest are tens of KB
# The tags YAML's safe loader builds data from; anything else is the loader's (lm-eval's) to interpret.
CORE_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in
                      ("str", "int", "float", "bool", "null", "seq", "map", "merge", "timestamp", "binary", "set", "omap", "pairs"))


class TaskError(MidusError):
    """Downstream evaluation cannot start: no lm-eval, an unknown task, a task folder that would run code."""

    exit_code = 2


def check_task_folders(paths: list[Path], allow_code: bool) -> None:
    """Each of ``paths`` is a folder; without ``allow_code``, every task YAML in it only describes data."""
    for path in paths:
        if not path.is_dir():
            raise TaskError(f"--include-path {path}: not a directory")
    if allow_code:
        return
    seen: set[Path] = set()
    roots = [path.resolve() for path in paths]
    for path in paths:
        for yaml_file in sorted({*path.rglob("*.yaml"), *path.rglob("*.yml")}):
            _check_task_yaml(yaml_file, seen, roots)


def task_files(paths: list[Path]) -> dict[str, list[Path]]:
    """Task name -> the YAML files (resolved, each once) in ``paths`` that define it (a ``task:`` at a document's top). Read
    as nodes, nothing built, so a YAML with tags (allowed code) is read too; unreadable files are skipped
    (check_task_folders says why, where it reads them)."""
    import yaml

    found: dict[str, list[Path]] = {}
    files = {f.resolve() for path in paths for f in (*path.rglob("*.yaml"), *path.rglob("*.yml"))}  # a folder given twice, or in another
    for file in sorted(files):
        try:
            documents = list(yaml.compose_all(read_small_text(file, TASK_YAML_BYTES), Loader=yaml.SafeLoader))
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
            continue
        for node in documents:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == "task" and isinstance(value, yaml.ScalarNode):
                        found.setdefault(value.value, []).append(file)
    return found


def _check_task_yaml(file: Path, seen: set[Path], roots: list[Path]) -> None:
    import yaml

    file = file.resolve()
    if file in seen:
        return
    seen.add(file)
    try:
        # a regular file of a task's size: a named pipe waited forever, /dev/zero grew to a MemoryError (trial73 F3)
        text = read_small_text(file, TASK_YAML_BYTES)
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))  # nodes with their tags, nothing built
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{file}: cannot read it ({one_line(exc, 200, whole=True)})") from None
    except yaml.YAMLError as exc:  # lm-eval would skip the file without a word, then not know its task
        raise TaskError(f"{file}: not valid YAML ({one_line(exc, 200, whole=True)}); fix it, or move it out of the task folder") from None
    except RecursionError:
        raise TaskError(f"{file}: nested deeper than the YAML reader goes; not a task description") from None
    for document in documents:
        _refuse_tags(file, document)
        _refuse_alias_bombs(file, document)
    visited: set[int] = set()  # aliases share one object: walked once each (nested aliases doubled the walk per level)
    for config in yaml.safe_load_all(text):  # core tags only, checked above
        _check_entries(file, config, seen, visited, roots)


def _refuse_tags(file: Path, root) -> None:
    import yaml

    stack, visited = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        if node.tag not in CORE_TAGS:
            what = "lm-eval imports Python for !function" if node.tag.endswith("function") else "only plain YAML data is read"
            raise TaskError(f"{file}:{node.start_mark.line + 1}: tag {node.tag} ({what}); {ALLOW}")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(item for pair in node.value for item in pair)


def _check_entries(file: Path, config, seen: set[Path], visited: set[int], roots: list[Path]) -> None:
    """Includes (checked in turn), metrics, regexes and the data it reads, in the task and in any task a group defines
    inline."""
    if not isinstance(config, (dict, list)) or id(config) in visited:
        return
    visited.add(id(config))  # also ends a list that holds itself (&l [*l]), a RecursionError traceback (trial73 F3)
    if isinstance(config, list):
        for item in config:
            _check_entries(file, item, seen, visited, roots)
        return
    _check_data(file, config, roots)
    _check_regexes(file, config)
    includes = config.get("include")
    for include in includes if isinstance(includes, list) else [includes] if includes is not None else []:
        target = Path(str(include))
        target = target if target.is_absolute() else file.parent / target  # exactly as lm-eval's load_yaml resolves it
        if not target.is_file():  # refused rather than skipped: whatever lm-eval would open instead is unchecked
            raise TaskError(f"{file}: include {include!r} is not a file ({target}); {ALLOW}")
        if not _inside(target.resolve(), roots):  # include: /etc/passwd was read and merged into the task (trial92 F3)
            raise TaskError(f"{file}: include {include!r} ({target.resolve()}) lies outside the task folders "
                            f"(--include-path: give its folder as another if you trust it); {ALLOW}")
        _check_task_yaml(target, seen, roots)
    for metric in config.get("metric_list") if isinstance(config.get("metric_list"), list) else []:
        if isinstance(metric, dict):
            name = metric.get("metric")
            if metric.get("hf_evaluate"):
                raise TaskError(f"{file}: metric {name!r} with hf_evaluate: HF evaluate's load can import a metric script; {ALLOW}")
            if not isinstance(name, str) or not _known_metric(name):
                raise TaskError(f"{file}: metric {name!r} is not one of lm-eval's; lm-eval would hand it to HF evaluate's load, "
                                f"which can import a metric script; {ALLOW}")
    for value in config.values():
        if isinstance(value, (dict, list)):
            _check_entries(file, value, seen, visited, roots)


# dataset_kwargs that choose where datasets connects and with which credentials: storage_options.hf.endpoint sent the
# user's Hugging Face token to a server the task named (trial92 F2)
CONNECTION_KWARGS = ("storage_options", "token", "use_auth_token", "download_config", "trust_remote_code")
# the schemes a data-only task may read through: the Hub and the web (fetched), archives' members, and local files, which
# must lie in its folder; fsspec's others (local://, memory://, sftp://...) reached /proc past a prefix check (trial92 F1)
FETCHED_SCHEMES = frozenset({"hf", "http", "https"})
ARCHIVE_SCHEMES = frozenset({"zip", "tar", "gzip", "bz2", "xz", "zstd", "lz4"})
LOCAL_SCHEMES = frozenset({"file", "local"})
EXPANDED_YAML_NODES = 100_000  # a task description has hundreds of entries; aliases may not multiply them past this


def _check_data(file: Path, config: dict, roots: list[Path]) -> None:
    """What a task reads and where HF datasets writes for it: its data files lie in the task folders (any file the user
    can read, a token or an ssh key, became task rows: trial92 F3), are regular files off the kernel's file systems
    (/proc/self/environ was copied into the datasets cache, world-readable, trial73 F1), and its dataset_kwargs choose
    neither where datasets writes (cache_dir made folders anywhere, F2) nor where it connects or with what; a packaged
    builder that reads other files than its data files is refused (checked_data_reads checks what a Hub name resolves to)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    builder = config.get("dataset_path")
    if isinstance(builder, str) and builder in _PACKAGED_DATASETS_MODULES and builder not in DATA_ONLY_BUILDERS:
        raise TaskError(f"{file}: dataset_path {builder!r}: {_builder_refusal(builder)}; {ALLOW}")
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict):
        return
    if "cache_dir" in kwargs:
        raise TaskError(f"{file}: dataset_kwargs.cache_dir {kwargs['cache_dir']!r}: where HF datasets writes is the user's to choose "
                        f"(HF_DATASETS_CACHE), not a task's; {ALLOW}")
    for key in CONNECTION_KWARGS:
        if key in kwargs:
            raise TaskError(f"{file}: dataset_kwargs.{key}: where HF datasets connects, and with which credentials, is the user's "
                            f"to choose, not a task's; {ALLOW}")
    files = kwargs.get("data_files")
    named = [name for entry in (files.values() if isinstance(files, dict) else [files])
             for name in (entry if isinstance(entry, list) else [entry]) if isinstance(name, str)]
    if isinstance(kwargs.get("data_dir"), str):
        named.append(kwargs["data_dir"])
    for name in named:
        local, refused = _local_part(name)
        if refused:
            raise TaskError(f"{file}: dataset_kwargs {name!r}: {refused}; {ALLOW}")
        if local is None:
            continue
        path = Path(local) if Path(local).is_absolute() else file.parent / local
        if not os.path.lexists(path):
            continue  # a pattern, or not there (harness._check_data_files says so for a suite's; the read is checked too)
        odd = _local_read_problem(path, roots)
        if odd and (moved := moved_suite(file, config, name)):
            raise TaskError(moved)
        if odd:
            raise TaskError(f"{file}: dataset_kwargs {name!r} ({path.resolve()}): {odd}; a task folder names data files; {ALLOW}")


def moved_suite(yaml_file: Path, config: dict, data: str) -> str | None:
    """Why a suite's task (a YAML make_task_suite wrote: ``metadata.data_sha256``, its data beside it) that reads ``data``
    from another folder cannot run: it was copied or moved, and still names its original's data. Said before the task
    folder's own rule (give the data's folder as another --include-path, or --allow-task-code), which led to "defined in 2
    task files", or to the original's items scored without a word."""
    metadata = config.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("data_sha256"), str):
        return None
    path = Path(data) if Path(data).is_absolute() else yaml_file.parent / data
    if path.parent.resolve() == yaml_file.parent.resolve():
        return None
    return (f"{yaml_file}: this task suite was copied or moved from {path.parent}: it still reads that folder's data ({path}); "
            f"rebuild the suite where it is (python tools/make_task_suite.py TEXT --out {yaml_file.parent})")


def _local_part(name: str) -> tuple[str | None, str | None]:
    """(the local path ``name`` reads, or None for the Hub, the web or an archive's member; why it is refused, or None).
    Each ``::``-joined part of an fsspec chain is looked at (zip://member::local:///path/archive.zip)."""
    from fsspec.core import split_protocol

    local = None
    for part in name.split("::"):
        scheme, rest = split_protocol(part)
        scheme = scheme.lower() if scheme else None
        if scheme is None or scheme in LOCAL_SCHEMES:
            local = rest
        elif scheme not in FETCHED_SCHEMES | ARCHIVE_SCHEMES:
            return None, f"reads through {scheme}://, which a data-only task may not (local files in its folder, hf://, http(s)://)"
    return local, None


def _local_read_problem(path: Path, roots: list[Path]) -> str | None:
    """Why a task may not read local ``path`` (a file or a folder), or None: it lies in one of ``roots``, off the kernel's
    file systems, and a file is a regular one."""
    real = path.resolve()
    kernel = kernel_file_system(real)
    if kernel:
        return f"it lies on the kernel's {kernel} file system, not data"
    if not _inside(real, roots):
        return ("it lies outside the task folders (--include-path), and a task reads only its own data (give its folder as "
                "another --include-path if you trust it)")
    return None if real.is_dir() else regular_file_problem(real)


def _inside(real: Path, roots: list[Path]) -> bool:
    return any(real == root or real.is_relative_to(root) for root in roots)


def _refuse_alias_bombs(file: Path, root) -> None:
    """A document whose aliases expand past EXPANDED_YAML_NODES entries: 761 bytes of nested aliases under metadata: passed,
    and lm-eval expanded them while collecting the results, until killed (trial92 F5). Counted on the composed nodes
    (an alias is the node it names), each once."""
    import yaml

    sizes: dict[int, int] = {}
    stack = [(root, False)]
    while stack:  # post-order without recursion: deep nesting is refused by the reader, not here
        node, done = stack.pop()
        if id(node) in sizes and not done:
            continue
        if done:
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else [])
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[id(node)] > EXPANDED_YAML_NODES:
                raise TaskError(f"{file}: its aliases expand to over {EXPANDED_YAML_NODES:,} entries, more than a task "
                                f"description has; {ALLOW}")
            continue
        sizes[id(node)] = 1
        stack.append((node, True))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((c, False) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend((c, False) for pair in node.value for c in pair)


def _check_regexes(file: Path, config: dict) -> None:
    """The regexes lm-eval's metrics and filters run (regexes_to_ignore, regex_pattern): one that nests repeats,
    ``(.*.*)*X``, backtracks without end on a model's answer (trial92 F4), and re cannot be stopped."""
    for key, value in config.items():
        if "regex" not in str(key).lower():
            continue
        for pattern in value if isinstance(value, list) else [value]:
            if isinstance(pattern, str) and _nested_repeat(pattern):
                raise TaskError(f"{file}: {key} {pattern[:80]!r} repeats a part that itself repeats, which can backtrack "
                                f"without end on a model's answer; {ALLOW}")


def _nested_repeat(pattern: str) -> bool:
    r"""Whether ``pattern`` has a repeat inside a repeat that can match one text in more than one way: the shape of
    catastrophic backtracking. An inner repeat of a variable count (``*``, ``+``, ``{1,3}``) always can; a fixed count
    (``(,\d{3})*``) only beside an alternation in the same repeated part (``(a{3}|a{2})*``: 2 s at 60 characters,
    trial97 F5; the thousands separator itself runs, trial95 F10). A pattern re cannot read is left to lm-eval, which
    says so."""
    import re._parser as parser

    try:
        tree = parser.parse(pattern)
    except Exception:  # noqa: BLE001 - re's own error comes from lm-eval
        return False
    repeats = {parser.MAX_REPEAT, parser.MIN_REPEAT, getattr(parser, "POSSESSIVE_REPEAT", parser.MAX_REPEAT)}

    def has_branch(items) -> bool:
        for op, arg in items:
            if op is parser.BRANCH:
                return True
            if op in repeats and has_branch(arg[2]):
                return True
            if op is parser.SUBPATTERN and has_branch(arg[-1]):
                return True
            if op in (parser.ASSERT, parser.ASSERT_NOT) and has_branch(arg[1]):
                return True
        return False

    def walk(items, inside: bool, branchy: bool) -> bool:
        """``inside``: within a repeat of more than one; ``branchy``: that repeat's part holds an alternation."""
        for op, arg in items:
            if op in repeats:
                low, high, sub = arg
                if inside and (high > low or branchy):
                    return True
                repeated = high > 1
                if walk(sub, inside or repeated, branchy or (repeated and has_branch(sub))):
                    return True
            elif op is parser.SUBPATTERN and walk(arg[-1], inside, branchy):
                return True
            elif op is parser.BRANCH and any(walk(branch, inside, branchy) for branch in arg[1]):
                return True
            elif op in (parser.ASSERT, parser.ASSERT_NOT) and walk(arg[1], inside, branchy):
                return True
        return False

    return walk(tree, False, False)


@contextlib.contextmanager
def checked_data_reads(task_folders: list[Path] = ()):
    """While open, HF datasets reads only what a data-only task may: local files in ``task_folders`` (the
    --include-path folders) or in the Hugging Face caches (a Hub dataset read offline), regular and off the kernel's
    file systems, and the Hub or the web; each dataset's data files are checked as datasets resolved them, before any is
    read, and a local folder it would walk (``data_dir``, a ``path``) before it walks it (``data_dir: /`` walked the whole
    file system: trial92 F6). The YAML check above sees a task's literal paths only; a pattern (``/proc/self/envir[o]n``),
    a ``data_dir``, a path relative to the working directory or an included YAML's entries resolve only here (trial83:
    the environment again reached the datasets cache; a named pipe waited forever)."""
    import datasets.config
    import datasets.load
    from huggingface_hub import constants

    roots = [Path(p).resolve() for p in (*task_folders, constants.HF_HUB_CACHE, datasets.config.HF_DATASETS_CACHE)]
    resolve = datasets.load.load_dataset_builder  # what load_dataset calls to resolve the files it will read

    def resolved_then_checked(*args, **kwargs):
        dataset = kwargs.get("path", args[0] if args else "?")
        if kwargs.get("storage_options"):
            raise TaskError(f"a task's {dataset!r} dataset sets storage_options (where HF datasets connects, with which "
                            f"credentials); {ALLOW}")
        for what, name in _folders_it_walks(dataset, kwargs.get("data_dir")):
            _check_data_file(f"{dataset!r} dataset's {what}", name, roots)
        builder = resolve(*args, **kwargs)
        kind = _builder_kind(builder)
        if kind not in DATA_ONLY_BUILDERS:
            raise TaskError(f"a task's {dataset!r} dataset: {_builder_refusal(kind)}; {ALLOW}")
        for split, names in (getattr(builder.config, "data_files", None) or {}).items():
            if not names:  # a pattern that matched only what is not a file (a named pipe): an empty split datasets fails on unsaid
                raise TaskError(f"a task's {dataset!r} dataset's {split} split finds no data file (its pattern matches no "
                                f"regular file)")
            for name in names:
                _check_data_file(f"{dataset!r} dataset's {split} split", str(name), roots)
        return builder

    with mock.patch.object(datasets.load, "load_dataset_builder", resolved_then_checked):
        yield


# HF datasets' builders that read their data files and nothing else; `cache` reads a Hub dataset prepared before (offline).
# Others open what no check sees: `harbor` reads the instruction.md beside its task.toml, which a link made any file the
# user can read (/proc/self/environ too) into task rows (trial95 F1); the *folder builders follow metadata paths.
DATA_ONLY_BUILDERS = frozenset({"arrow", "csv", "json", "parquet", "text", "cache"})


def _builder_refusal(kind: str) -> str:
    return (f"HF datasets' {kind!r} builder opens files besides the data files it is given (a data-only task reads "
            f"{', '.join(sorted(DATA_ONLY_BUILDERS - {'cache'}))} files, or a Hub dataset of them)")


def _builder_kind(builder) -> str:
    """The packaged builder ``builder`` is (``datasets.packaged_modules.json.json`` -> ``json``), or its module's name."""
    module = type(builder).__module__
    prefix = "datasets.packaged_modules."
    return module[len(prefix):].split(".")[0] if module.startswith(prefix) else module


def _folders_it_walks(dataset, data_dir) -> list[tuple[str, str]]:
    """The local folders datasets would list for ``load_dataset(dataset, data_dir=data_dir)``: a dataset that is a local
    folder, and its data_dir, or a packaged builder's (text, json...) data_dir (a Hub dataset's lies in its repository)."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    walked = []
    local = isinstance(dataset, str) and os.path.isdir(dataset)
    if local:
        walked.append(("path", dataset))
    if isinstance(data_dir, str):
        if os.path.isabs(data_dir) or dataset in _PACKAGED_DATASETS_MODULES:
            walked.append(("data_dir", data_dir))
        elif local:
            walked.append(("data_dir", os.path.join(dataset, data_dir)))
    return walked


def _check_data_file(what: str, name: str, roots: list[Path]) -> None:
    """``name``: one file (or folder) datasets resolved: a local path, a URL it fetches (``hf://``, ``https://``), or an
    archive's member; other schemes refused."""
    local, refused = _local_part(name)
    if refused:
        raise TaskError(f"a task's {what} {name}: {refused}; {ALLOW}")
    if local is None or not os.path.lexists(local):
        return  # fetched, or not there: datasets says so
    odd = _local_read_problem(Path(local), roots)
    if odd:
        raise TaskError(f"a task's {what} reads {name} ({Path(local).resolve()}): {odd}; a task folder names data files; {ALLOW}")


def _known_metric(name: str) -> bool:
    import lm_eval.api.metrics  # noqa: F401 - registers lm-eval's metrics
    from lm_eval.api.registry import metric_registry

    return name in metric_registry


@contextlib.contextmanager
def sandboxed_templates():
    """lm-eval renders its task templates in jinja2's SandboxedEnvironment while this is open."""
    import lm_eval.utils as lm_utils
    from jinja2 import Environment

    current = getattr(lm_utils, "env", None)
    if not isinstance(current, Environment) or not callable(getattr(lm_utils, "apply_template", None)):
        raise TaskError("this lm-eval renders task templates where midus-surgery cannot sandbox them; pass --allow-task-code "
                        "to render them unsandboxed if you trust every task's templates")
    with mock.patch.object(lm_utils, "env", bounded_sandbox_like(current)):
        yield


def bounded_sandbox_like(current):
    """A sandboxed environment with ``current``'s loader, settings and filters (lm-eval's regex_replace), each render's
    work bounded (below)."""
    from jinja2.sandbox import SandboxedEnvironment

    sandbox = _bounded_sandbox(SandboxedEnvironment)(loader=current.loader, undefined=current.undefined,
                                                     keep_trailing_newline=current.keep_trailing_newline)
    sandbox.filters.update(current.filters)
    if "regex_replace" in sandbox.filters:
        sandbox.filters["regex_replace"] = _regex_replace_in_time
    # a filter's width or count (indent(1.5e9), center, batch) past what a document needs: refused before it allocates
    sandbox.filters.update({name: _bounded_filter(name, f) for name, f in sandbox.filters.items()})
    return sandbox


# What one render of a sandboxed template may do. A task's template formats one document: a few loops over its fields
# and choices. jinja2's sandbox caps each range() at 100,000 items, not their nesting, and neither a string repeated
# nor a regex's backtracking: a template of two nested ranges ran until killed (trial73 F8).
RENDER_RANGE_ITEMS = 1_000_000  # all the range() items of one render, together
RENDER_TEXT = 10_000_000  # characters (or items) one `*` may make, and the largest number a call or a `%` format takes
REGEX_SECONDS = 2.0  # one regex_replace
RENDER_SECONDS = 10.0  # one render, wall time: what the bounds above do not see (a macro calling itself, loops over a string)


def _bounded_sandbox(base):
    """``base`` (jinja2's SandboxedEnvironment) with the work one render may do bounded (above); past a bound the render
    raises TemplateTooCostly, a SecurityError, which the run reports in one line."""
    import re
    import weakref

    from jinja2 import Template
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import safe_range

    class TemplateTooCostly(SecurityError):
        pass

    class BoundedTemplate(Template):
        def render(self, *args, **kwargs):
            with _time_limit(RENDER_SECONDS, TemplateTooCostly):
                return super().render(*args, **kwargs)

    class BoundedSandbox(base):
        intercepted_binops = frozenset({"*", "**", "%"})
        template_class = BoundedTemplate

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._range_items = weakref.WeakKeyDictionary()  # render context -> range() items made in it

        def call(self, __context, __obj, *args, **kwargs):
            if __obj is safe_range:
                made = self._range_items.get(__context, 0) + len(range(*args))
                if made > RENDER_RANGE_ITEMS:
                    raise TemplateTooCostly(f"a template's range() calls make over {RENDER_RANGE_ITEMS:,} items in one render "
                                            "(nested loops?)")
                self._range_items[__context] = made
            # a width or count past what a document needs (center(1.5e9), zfill, lipsum(2e6)): refused before the call
            # allocates it in one step, which no time limit interrupts
            big = _past_render_text([*args, *kwargs.values()])
            if big is not None:
                raise TemplateTooCostly(f"a template calls {getattr(__obj, '__name__', type(__obj).__name__)} with {big:,}, over "
                                        f"{RENDER_TEXT:,}")
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            if (operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
                    and (right > 4096 or left.bit_length() * right > 1 << 20)):
                raise TemplateTooCostly(f"a power of {right} in a template: over 4,096 powers, or a number of over 2**20 bits")
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > RENDER_TEXT:
                        what = f"a text of {len(seq):,} characters" if isinstance(seq, str) else f"a list of {len(seq):,} items"
                        raise TemplateTooCostly(f"a template repeats {what} {times:,} times (over {RENDER_TEXT:,})")
            if operator == "%" and isinstance(left, str) and any(int(w) > RENDER_TEXT for w in re.findall(r"%[-+ #0]*(\d{8,})", left)):
                raise TemplateTooCostly(f"a template formats with a width over {RENDER_TEXT:,}")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


@contextlib.contextmanager
def _time_limit(seconds: float, error: type[Exception]):
    """Raise ``error`` in this thread if the block runs past ``seconds`` of wall time (SIGALRM: the main thread only, where
    lm-eval renders; elsewhere no limit). An earlier timer or handler is put back after."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise error(f"a template render ran past {seconds:g} s (a loop or recursion past what a document needs?)")

    previous = signal.signal(signal.SIGALRM, stop)
    earlier = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if earlier[0]:
            signal.setitimer(signal.ITIMER_REAL, *earlier)


def _past_render_text(values: list):
    """The first number among ``values`` past RENDER_TEXT (a width, a count), else None."""
    return next((v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) > RENDER_TEXT), None)


def _bounded_filter(name: str, f):
    """``f`` refusing a number past RENDER_TEXT among its arguments after the value it filters (its pass_context /
    pass_environment marks kept: functools.wraps copies them)."""
    import functools

    from jinja2.exceptions import SecurityError

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        big = _past_render_text([*args[1:], *kwargs.values()])
        if big is not None:
            raise SecurityError(f"a template's filter {name} is given {big:,}, over {RENDER_TEXT:,}")
        return f(*args, **kwargs)

    return bounded


def _regex_replace_in_time(string, pattern, repl, count: int = 0):
    """lm-eval's regex_replace filter (re.sub) with a time limit: a pattern that backtracks without end, ``(a+)+$`` on 40
    a's and a '!', ran until killed (trial73 F8). The ``regex`` module (transformers' own dependency) reads re's syntax."""
    import regex
    from jinja2.exceptions import SecurityError

    try:
        return regex.sub(pattern, repl, string, count=count, timeout=REGEX_SECONDS)
    except TimeoutError:
        raise SecurityError(f"regex_replace with {str(pattern)[:80]!r} ran past {REGEX_SECONDS:g} s on one document "
                            "(a pattern that backtracks without end?)") from None
