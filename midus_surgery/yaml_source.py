"""YAML loading that remembers where every value came from (file:line:col).

PyYAML's ``safe_load`` forgets positions; we compose the node tree instead and build plain
Python values while recording each node's start mark under its path (a tuple of keys and
list indices), so validation errors can point at the exact line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Problem, RecipeError

PathKey = tuple[str | int, ...]


@dataclass
class YamlSource:
    """A parsed YAML document plus the position of every value in it."""

    file: str
    data: Any
    marks: dict[PathKey, tuple[int, int]] = field(default_factory=dict)  # path -> (line, col), 1-based

    def where(self, path: PathKey = ()) -> str:
        """``file:line:col`` of the deepest known prefix of ``path``."""
        for cut in range(len(path), -1, -1):
            mark = self.marks.get(tuple(path[:cut]))
            if mark is not None:
                return f"{self.file}:{mark[0]}:{mark[1]}"
        return self.file


def _construct(node: yaml.Node, path: PathKey, marks: dict, problems: list[Problem], file: str) -> Any:
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in out:
                problems.append(Problem(f"{file}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}",
                                        ".".join(map(str, path + (key,))), "duplicate key"))
                continue
            out[key] = _construct(value_node, path + (key,), marks, problems, file)
            # Errors about a field (unknown key, wrong type) point at its key, where the reader looks.
            marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, path + (i,), marks, problems, file) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    return loader.construct_object(node, deep=True)


def load_yaml(path: str | Path, text: str | None = None) -> YamlSource:
    """Parse ``path`` (or ``text``, reported as ``path``) keeping positions; syntax errors raise RecipeError."""
    file = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError([Problem(file, "", "file not found")]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError([Problem(file, "", f"cannot read: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise RecipeError([Problem(where, "", f"YAML syntax error: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(file, "", f"YAML error: {exc}")]) from None
    if node is None:
        raise RecipeError([Problem(file, "", "the file is empty")])
    marks: dict[PathKey, tuple[int, int]] = {}
    problems: list[Problem] = []
    try:
        data = _construct(node, (), marks, problems, file)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise RecipeError([Problem(where, "", f"YAML error: {exc.problem}")]) from None
    if problems:
        raise RecipeError(problems)
    return YamlSource(file, data, marks)
