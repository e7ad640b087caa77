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
that reaches for Python's internals.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

from midus_surgery.errors import MidusError, one_line

ALLOW = "pass --allow-task-code if you trust this folder"
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
            documents = list(yaml.compose_all(file.read_text(), Loader=yaml.SafeLoader))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
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
        text = file.read_text()
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))  # nodes with their tags, nothing built
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"{file}: cannot read it ({one_line(exc, 200, whole=True)})") from None
    except yaml.YAMLError as exc:  # lm-eval would skip the file without a word, then not know its task
        raise TaskError(f"{file}: not valid YAML ({one_line(exc, 200, whole=True)}); fix it, or move it out of the task folder") from None
    for document in documents:
        _refuse_tags(file, document)
    for config in yaml.safe_load_all(text):  # core tags only, checked above
        _check_entries(file, config, seen)


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


def _check_entries(file: Path, config, seen: set[Path]) -> None:
    """Includes (checked in turn) and metrics, in the task and in any task a group defines inline."""
    if isinstance(config, list):
        for item in config:
            _check_entries(file, item, seen)
        return
    if not isinstance(config, dict):
        return
    includes = config.get("include")
    for include in includes if isinstance(includes, list) else [includes] if includes is not None else []:
        target = Path(str(include))
        target = target if target.is_absolute() else file.parent / target  # exactly as lm-eval's load_yaml resolves it
        if not target.is_file():  # refused rather than skipped: whatever lm-eval would open instead is unchecked
            raise TaskError(f"{file}: include {include!r} is not a file ({target}); {ALLOW}")
        _check_task_yaml(target, seen)
    for metric in config.get("metric_list") or []:
        if isinstance(metric, dict):
            name = metric.get("metric")
            if metric.get("hf_evaluate"):
                raise TaskError(f"{file}: metric {name!r} with hf_evaluate: HF evaluate's load can import a metric script; {ALLOW}")
            if not isinstance(name, str) or not _known_metric(name):
                raise TaskError(f"{file}: metric {name!r} is not one of lm-eval's; lm-eval would hand it to HF evaluate's load, "
                                f"which can import a metric script; {ALLOW}")
    for value in config.values():
        if isinstance(value, (dict, list)):
            _check_entries(file, value, seen)


def _known_metric(name: str) -> bool:
    import lm_eval.api.metrics  # noqa: F401 - registers lm-eval's metrics
    from lm_eval.api.registry import metric_registry

    return name in metric_registry


@contextlib.contextmanager
def sandboxed_templates():
    """lm-eval renders its task templates in jinja2's SandboxedEnvironment while this is open."""
    import lm_eval.utils as lm_utils
    from jinja2 import Environment
    from jinja2.sandbox import SandboxedEnvironment

    current = getattr(lm_utils, "env", None)
    if not isinstance(current, Environment) or not callable(getattr(lm_utils, "apply_template", None)):
        raise TaskError("this lm-eval renders task templates where midus-surgery cannot sandbox them; pass --allow-task-code "
                        "to render them unsandboxed if you trust every task's templates")
    sandbox = SandboxedEnvironment(loader=current.loader, undefined=current.undefined, keep_trailing_newline=current.keep_trailing_newline)
    sandbox.filters.update(current.filters)  # lm-eval's own (regex_replace)
    with mock.patch.object(lm_utils, "env", sandbox):
        yield
