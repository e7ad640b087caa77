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
    for path in paths:
        for yaml_file in sorted({*path.rglob("*.yaml"), *path.rglob("*.yml")}):
            _check_task_yaml(yaml_file, seen)


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


def _check_task_yaml(file: Path, seen: set[Path]) -> None:
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
    visited: set[int] = set()  # aliases share one object: walked once each (nested aliases doubled the walk per level)
    for config in yaml.safe_load_all(text):  # core tags only, checked above
        _check_entries(file, config, seen, visited)


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


def _check_entries(file: Path, config, seen: set[Path], visited: set[int]) -> None:
    """Includes (checked in turn), metrics and the data it reads, in the task and in any task a group defines inline."""
    if not isinstance(config, (dict, list)) or id(config) in visited:
        return
    visited.add(id(config))  # also ends a list that holds itself (&l [*l]), a RecursionError traceback (trial73 F3)
    if isinstance(config, list):
        for item in config:
            _check_entries(file, item, seen, visited)
        return
    _check_data(file, config)
    includes = config.get("include")
    for include in includes if isinstance(includes, list) else [includes] if includes is not None else []:
        target = Path(str(include))
        target = target if target.is_absolute() else file.parent / target  # exactly as lm-eval's load_yaml resolves it
        if not target.is_file():  # refused rather than skipped: whatever lm-eval would open instead is unchecked
            raise TaskError(f"{file}: include {include!r} is not a file ({target}); {ALLOW}")
        _check_task_yaml(target, seen)
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
            _check_entries(file, value, seen, visited)


def _check_data(file: Path, config: dict) -> None:
    """What a task reads and where HF datasets writes for it: its data files may not lie on the kernel's file systems
    (/proc/self/environ was copied into the datasets cache, world-readable, trial73 F1) nor be other than regular files,
    and its dataset_kwargs may not choose where datasets writes (cache_dir made folders anywhere, F2)."""
    kwargs = config.get("dataset_kwargs")
    if not isinstance(kwargs, dict):
        return
    if "cache_dir" in kwargs:
        raise TaskError(f"{file}: dataset_kwargs.cache_dir {kwargs['cache_dir']!r}: where HF datasets writes is the user's to choose "
                        f"(HF_DATASETS_CACHE), not a task's; {ALLOW}")
    files = kwargs.get("data_files")
    named = [name for entry in (files.values() if isinstance(files, dict) else [files])
             for name in (entry if isinstance(entry, list) else [entry]) if isinstance(name, str)]
    for name in named:
        path = Path(name) if Path(name).is_absolute() else file.parent / name
        if not os.path.lexists(path):
            continue  # a pattern, or not there (harness._check_data_files says so for a suite's)
        real = path.resolve()
        kernel = kernel_file_system(real)
        odd = f"it lies on the kernel's {kernel} file system, not data" if kernel else regular_file_problem(real)
        if odd:
            raise TaskError(f"{file}: dataset_kwargs.data_files {name!r} ({real}): {odd}; a task folder names data files")



@contextlib.contextmanager
def checked_data_reads():
    """While open, HF datasets reads only regular files off the kernel's file systems: each dataset's data files are
    checked as datasets resolved them, before any is read. The YAML check above sees a task's literal paths only; a
    pattern (``/proc/self/envir[o]n``), a ``data_dir``, a path relative to the working directory or an included YAML's
    entries resolve only here (trial83: the environment again reached the datasets cache; a named pipe waited forever)."""
    import datasets.load

    resolve = datasets.load.load_dataset_builder  # what load_dataset calls to resolve the files it will read

    def resolved_then_checked(*args, **kwargs):
        builder = resolve(*args, **kwargs)
        dataset = kwargs.get("path", args[0] if args else "?")
        for split, names in (getattr(builder.config, "data_files", None) or {}).items():
            if not names:  # a pattern that matched only what is not a file (a named pipe): an empty split datasets fails on unsaid
                raise TaskError(f"a task's {dataset!r} dataset's {split} split finds no data file (its pattern matches no "
                                f"regular file)")
            for name in names:
                _check_data_file(f"{dataset!r} dataset's {split} split", str(name))
        return builder

    with mock.patch.object(datasets.load, "load_dataset_builder", resolved_then_checked):
        yield


def _check_data_file(what: str, name: str) -> None:
    """``name``: one file datasets resolved (a local path, or a URL it fetches: ``hf://``, ``https://``, left to it)."""
    local = name.rsplit("::", 1)[-1]  # an archive member (zip://member::/path/archive.zip) lies in its archive
    if local.startswith("file://"):
        local = local[len("file://"):]
    elif "://" in local:
        return
    path = Path(local)
    if not os.path.lexists(path):
        return  # datasets says so
    real = path.resolve()
    kernel = kernel_file_system(real)
    odd = f"it lies on the kernel's {kernel} file system, not data" if kernel else regular_file_problem(real)
    if odd:
        raise TaskError(f"a task's {what} reads {name} ({real}): {odd}; a task folder names data files; {ALLOW}")


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
