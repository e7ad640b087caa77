"""YAML loading that remembers where every value came from (file:line:col).

PyYAML's ``safe_load`` forgets positions; we compose the node tree instead and build plain
Python values while recording each node's start mark under its path (a tuple of keys and
list indices), so validation errors can point at the exact line.

The loader is hardened against hostile or broken input: every way a document can go wrong
is a located ``Problem`` (exit 2), never a traceback or a hang:

- the file is read up to ``MAX_BYTES`` (a recipe is a few KB; /dev/zero ends too);
- nesting deeper than ``MAX_DEPTH`` is refused while composing (PyYAML's composer recurses);
- anchors and aliases are allowed, but the document *after alias expansion* may hold at most
  ``MAX_NODES`` nodes and ``MAX_DEPTH`` levels, and an alias may not contain itself, so a
  "billion laughs" document or a recursive alias is refused before anything is built;
- mapping keys must be plain names (strings); complex keys (``? [a, b]``) are refused;
- only the standard scalar tags (str, int, float, bool, null, timestamp, binary) and merge
  keys (``<<: *defaults``) are understood; any other tag, and any value its tag cannot be
  built from (``!!bool maybe``, ``!!int 1.5``, an integer of more than 4300 digits) is a
  problem at the value's line and column.
"""

from __future__ import annotations

import os
import stat
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from midus_surgery.errors import Problem, RecipeError, lone_surrogate

PathKey = tuple[str | int, ...]

MAX_BYTES = 256 * 1024  # a recipe or training config is a few KB
MAX_DEPTH = 64  # nesting levels (after alias expansion); recipes use 4
MAX_NODES = 10_000  # nodes after alias expansion; recipes have ~50

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_INT_BITS = 1024  # about 300 decimal digits: far past any setting, and printable in a message
_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp", "binary")}


@dataclass
class YamlSource:
    """A parsed YAML document plus the position of every value in it."""

    file: str
    data: Any
    marks: dict[PathKey, tuple[int, int]] = field(default_factory=dict)  # path -> (line, col), 1-based
    block_keys: set[PathKey] = field(default_factory=set)  # keys written in a block (indented) mapping, not in {...} or JSON

    def where(self, path: PathKey = ()) -> str:
        """``file:line:col`` of the deepest known prefix of ``path``; the file alone for a top-level key the file does
        not hold (``resume`` unset: "run.yaml:1:1: resume:" pointed at a line that says nothing of it; trial74 F8)."""
        mark = self.position(path)
        if mark is None or (path and not any(tuple(path[:cut]) in self.marks for cut in range(len(path), 0, -1))):
            return self.file
        return f"{self.file}:{mark[0]}:{mark[1]}"

    def in_block(self, path: PathKey) -> bool:
        """Whether the key at ``path`` is written in a block mapping, where its indent says where it belongs (not in a
        flow ``{...}`` mapping or JSON, where nothing is indented)."""
        return tuple(path) in self.block_keys

    def from_command_line(self, path: PathKey) -> bool:
        """Whether the value at ``path`` came from a command-line override (never, for a file alone)."""
        return False

    def position(self, path: PathKey = ()) -> tuple[int, int] | None:
        """(line, col) of the deepest known prefix of ``path``; None when none is known."""
        for cut in range(len(path), -1, -1):
            mark = self.marks.get(tuple(path[:cut]))
            if mark is not None:
                return mark
        return None


class _Refused(Exception):
    """The document breaks a limit; raised out of the composer with the place it happened."""

    def __init__(self, mark, message: str):
        super().__init__(message)
        self.mark, self.message = mark, message


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses documents nested deeper than MAX_DEPTH or with more
    than MAX_NODES nodes (as written, before aliases are expanded), so it never recurses far."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(self.peek_event().start_mark, f"the document has more than {MAX_NODES} values; a recipe has a few dozen")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(self.peek_event().start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _at(file: str, mark) -> str:
    return f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else file


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, file: str) -> Problem | None:
    """Walk the composed graph (aliases share nodes) without recursion: refuse cycles, and
    documents whose expansion exceeds MAX_NODES nodes or MAX_DEPTH levels."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 1 + max((height[id(k)] for k in kids), default=0)
            on_stack.discard(key)
            if size[key] > MAX_NODES:
                return Problem(_at(file, node.start_mark), "", f"after its aliases are expanded the document has more than {MAX_NODES} values (an alias bomb?); a recipe has a few dozen")
            if height[key] > MAX_DEPTH:
                return Problem(_at(file, node.start_mark), "", f"after its aliases are expanded the document is nested more than {MAX_DEPTH} levels deep")
            continue
        if key in size:
            continue
        on_stack.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in on_stack:
                return Problem(_at(file, kid.start_mark), "", "an alias refers to a value that contains it (a recursive alias)")
            if id(kid) not in size:
                stack.append((kid, False))
    return None


class _Builder:
    """Builds plain Python values from the (checked) node graph, recording marks and problems."""

    def __init__(self, file: str):
        self.file = file
        self.marks: dict[PathKey, tuple[int, int]] = {}
        self.block_keys: set[PathKey] = set()
        self.built: set[int] = set()  # the mapping nodes built so far (an alias builds its anchor's node again)
        self.problems: list[Problem] = []
        self.constructor = yaml.constructor.SafeConstructor()

    def problem(self, node: yaml.Node, path: PathKey, message: str) -> None:
        self.problems.append(Problem(_at(self.file, node.start_mark), ".".join(map(str, path)), message))

    def build(self, node: yaml.Node, path: PathKey) -> Any:
        self.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            if node.tag != _MAP_TAG:
                self.problem(node, path, f"unsupported tag {_tag(node.tag)} on a mapping (recipes use plain mappings)")
                return None
            return self.mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ_TAG:
                self.problem(node, path, f"unsupported tag {_tag(node.tag)} on a list (recipes use plain lists)")
                return None
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self.scalar(node, path)

    def scalar(self, node: yaml.Node, path: PathKey) -> Any:
        if node.tag not in _SCALAR_TAGS:
            self.problem(node, path, f"unsupported tag {_tag(node.tag)} (only plain values: strings, numbers, true/false, null)")
            return None
        try:
            self.constructor.constructed_objects.clear()
            value = self.constructor.construct_object(node, deep=True)
        except Exception as exc:  # noqa: BLE001 - PyYAML raises ValueError, KeyError, TypeError... for bad tagged values
            text = str(exc).strip()
            detail = f": {text.splitlines()[0][:120]}" if isinstance(exc, ValueError) and text else ""
            self.problem(node, path, f"{_preview(node.value)} is not a valid {_tag(node.tag)} value{detail}")
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            # a hex or octal literal reaches any length where decimal stops at 4,300 digits: the refusal that printed it could
            # not (Python's int-to-text limit: a traceback, trial99 C3). Below this, each setting says its own range.
            self.problem(node, path, f"{_preview(node.value)} is an integer of {value.bit_length():,} bits, past any setting's range")
            return None
        if isinstance(value, str) and "\0" in value:  # a quoted "\0" escape: the reader refuses only raw NUL bytes
            self.problem(node, path, "a NUL character (\\0) in a string: no path or name may hold one")
            return None
        # a quoted "\ud800" escape without its pair: said here, at its line, in words; the schema said it at 1:1 in
        # pydantic's (trial99 M2). The message quotes the text, as a key's field is the mapping holding it
        if isinstance(value, str) and (lone := lone_surrogate(value)):
            self.problem(node, path, f"{_preview(value)} {lone}; write the whole character (both halves of its \\u escape pair) "
                                     "or remove it")
            return None
        return value

    def pairs(self, node: yaml.MappingNode, path: PathKey) -> list[tuple[yaml.Node, Any, yaml.Node, bool]]:
        """(key node, key, value node, whether the key is written here in a block-style mapping: not one merged in) of a
        mapping, merge keys (``<<``) expanded; explicit keys win."""
        merged: dict[Any, tuple[yaml.Node, Any, yaml.Node, bool]] = {}
        explicit: list[tuple[yaml.Node, Any, yaml.Node, bool]] = []
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, yaml.MappingNode) or source.tag != _MAP_TAG:
                        self.problem(source, path, "a merge key (<<) takes a mapping or a list of mappings")
                        continue
                    for key_node_, key_, value_node_, _ in self.pairs(source, path):  # written elsewhere: not block here
                        merged.setdefault(key_, (key_node_, key_, value_node_, False))  # earlier sources take precedence, as in YAML
                continue
            key = self.key(key_node, path)
            if key is not None:
                explicit.append((key_node, key, value_node, not node.flow_style))
        seen = {k for _, k, _, _ in explicit}
        return [item for k, item in merged.items() if k not in seen] + explicit

    def key(self, key_node: yaml.Node, path: PathKey) -> str | None:
        if not isinstance(key_node, yaml.ScalarNode):
            self.problem(key_node, path, "a key must be a plain name, not a list or mapping (complex `? ...` keys are not used in recipes)")
            return None
        value = self.scalar(key_node, path)
        if value is None and key_node.tag in _SCALAR_TAGS and key_node.tag.endswith(":null"):
            self.problem(key_node, path, f"a key must be a name; {_preview(key_node.value) or 'an empty key'} reads as null (quote it)")
            return None
        if value is not None and not isinstance(value, str):
            self.problem(key_node, path, f"a key must be a name; {_preview(key_node.value)} reads as {type(value).__name__} (quote it)")
            return None
        return value

    def mapping(self, node: yaml.MappingNode, path: PathKey) -> dict:
        # a mapping built before is an alias of its anchor (``base: *b``): its keys are written at the anchor, not here
        aliased = id(node) in self.built
        self.built.add(id(node))
        out: dict = {}
        for key_node, key, value_node, block in self.pairs(node, path):
            if key in out:
                self.problem(key_node, path + (key,), "duplicate key")
                continue
            out[key] = self.build(value_node, path + (key,))
            # Errors about a field (unknown key, wrong type) point at its key, where the reader looks.
            self.marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if block and not aliased:
                self.block_keys.add(path + (key,))
        return out


def _tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _preview(text: str, limit: int = 40) -> str:
    text = str(text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _read(path: str | Path, file: str) -> str:
    try:
        # Opened without waiting: a named pipe nothing writes to would block open() forever; then read as usual,
        # so a recipe piped in (/dev/stdin, <(...)) is read whole, and an idle pipe reads as empty at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
        if not raw and stat.S_ISFIFO(os.stat(path).st_mode):
            raise RecipeError([Problem(file, "", "is a named pipe that nothing writes to, not a YAML file")])
    except FileNotFoundError:
        raise RecipeError([Problem(file, "", "file not found")]) from None
    except IsADirectoryError:
        raise RecipeError([Problem(file, "", "is a directory, not a YAML file")]) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise RecipeError([Problem(file, "", f"cannot read: {exc}")]) from None
    if len(raw) > MAX_BYTES:
        raise RecipeError([Problem(file, "", f"the file is larger than {MAX_BYTES // 1024} KiB; a recipe or training config is a few KB")])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem(file, "", f"cannot read: not UTF-8 text ({exc.reason} at byte {exc.start})")]) from None


# PyYAML's words for the mistakes people make most, said in a reader's (trial52)
_SYNTAX_HINTS = {
    "but found another document": "a second YAML document starts here ('---'): the file holds one; put each in a file of its own",
    "mapping values are not allowed here": ("a 'key: value' where a value was expected: an indent off, or a value with ': ' in "
                                            "it that needs quotes"),
}


def _syntax_error(exc: yaml.MarkedYAMLError) -> str:
    problem = exc.problem or str(exc)
    hint = _SYNTAX_HINTS.get(problem.strip())
    return f"YAML syntax error: {hint} (YAML: {problem})" if hint else f"YAML syntax error: {problem}"


def load_yaml(path: str | Path, text: str | None = None) -> YamlSource:
    """Parse ``path`` (or ``text``, reported as ``path``) keeping positions; every problem raises RecipeError."""
    file = str(path)
    if text is None:
        text = _read(path, file)
    elif len(text) > MAX_BYTES:
        raise RecipeError([Problem(file, "", f"the text is longer than {MAX_BYTES // 1024} KiB")])
    loader = None
    try:
        loader = _LimitedLoader(text)  # the reader refuses non-printable characters here
        node = loader.get_single_node()
    except _Refused as exc:
        raise RecipeError([Problem(_at(file, exc.mark), "", exc.message)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise RecipeError([Problem(_at(file, mark), "", _syntax_error(exc))]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (a NUL): located, in one line (trial50)
        at = exc.position if isinstance(exc.position, int) else 0
        mark = types.SimpleNamespace(line=text.count("\n", 0, at), column=at - (text.rfind("\n", 0, at) + 1))
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise RecipeError([Problem(_at(file, mark), "", f"YAML error: the character {char} is not allowed in YAML ({exc.reason})")]) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise RecipeError([Problem(file, "", f"YAML error: {str(exc)[:200] or type(exc).__name__}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        raise RecipeError([Problem(file, "", "the file is empty")])
    refused = _check_expansion(node, file)
    if refused is not None:
        raise RecipeError([refused])
    builder = _Builder(file)
    data = builder.build(node, ())
    if builder.problems:
        raise RecipeError(builder.problems)
    return YamlSource(file, data, builder.marks, builder.block_keys)
