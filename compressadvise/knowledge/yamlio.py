"""Safe YAML reading that remembers line numbers, so errors say file:line and the key."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from compressadvise.errors import InvalidKnowledge

try:  # the C loader is much faster, and just as safe
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


MAX_BYTES = 16 * 1024 * 1024  # knowledge and plan files are kilobytes; this stops /dev/zero & co.
ALIAS_MSG = "YAML aliases (&/*) are not allowed"
ALIAS_HINT = "write each value out in full: aliases can expand a small file into billions of nodes"
# Anchors and aliases only start a node: at a line start, after whitespace or a flow indicator.
# '&&' in conditions and 'a * b' in formulas do not match, so most files skip the event scan.
_MAYBE_ANCHOR = re.compile(r"(?:^|[\s\[{,])[&*][^\s&*,\[\]{}]")


def _walk(root: yaml.Node, lines: dict[tuple, int], where: str) -> None:
    """Record the line of every key path; iterative, and refusing a node reached twice (an
    alias), so neither deep nesting nor an alias bomb can blow the stack or the memory."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:  # the line of the key holding the alias, else of the anchored node
            raise InvalidKnowledge(f"{where}:{lines.get(path, node.start_mark.line + 1)}: {ALIAS_MSG}",
                                   hint=ALIAS_HINT)
        seen.add(id(node))
        lines[path] = node.start_mark.line + 1
        children: list[tuple[yaml.Node, tuple]] = []
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                k = key.value
                if k in keys:
                    raise InvalidKnowledge(f"{where}:{key.start_mark.line + 1}: duplicate key '{k}'")
                keys.add(k)
                lines[path + (k,)] = key.start_mark.line + 1
                children.append((value, path + (k,)))
        elif isinstance(node, yaml.SequenceNode):
            children = [(value, path + (i,)) for i, value in enumerate(node.value)]
        stack.extend(reversed(children))  # visit in document order, as errors should read


def _refuse_anchors(text: str, where: str) -> None:
    """Reject any anchor or alias from the event stream, which is linear in the file's size
    (composing or constructing is where aliases multiply)."""
    if not _MAYBE_ANCHOR.search(text):
        return
    loader = _Loader(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise InvalidKnowledge(f"{where}:{event.start_mark.line + 1}: {ALIAS_MSG}", hint=ALIAS_HINT)
    finally:
        loader.dispose()


def _read_text(path: str | Path, where: str, limit: int = MAX_BYTES, what: str = "a knowledge or plan file") -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise InvalidKnowledge(f"{where}: cannot read ({e.strerror})") from None
    if len(raw) > limit:
        raise InvalidKnowledge(f"{where}: too large for {what} (over {limit // 2**20} MiB)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidKnowledge(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})",
                               hint="save the file as UTF-8") from None


def read_yaml(path: str | Path, text: str | None = None) -> tuple[Any, dict[tuple, int]]:
    """Parse with the safe loader; return the data and a map from key path to line."""
    where = str(path)
    if text is None:
        text = _read_text(path, where)
    try:
        _refuse_anchors(text, where)
        loader = _Loader(text)  # one parse: keep the node tree for line numbers, build data from it
        try:
            node = loader.get_single_node()
            lines: dict[tuple, int] = {}
            if node is not None:
                _walk(node, lines, where)  # before construction: it refuses aliases
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InvalidKnowledge(f"{where}{line}: malformed YAML: {problem}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer past Python's 4300-digit limit
        raise InvalidKnowledge(f"{where}: malformed YAML: {str(e).splitlines()[0]}") from None
    return data, lines


def line_of(lines: dict[tuple, int], loc: tuple) -> int:
    """The line of the deepest known prefix of a key path."""
    loc = tuple(loc)
    while loc and loc not in lines:
        loc = loc[:-1]
    return lines.get(loc, 1)


def validate(model: type[BaseModel], data: Any, where: str, lines: dict[tuple, int],
             prefix: tuple = (), context: str = "") -> Any:
    """Validate with pydantic; turn the first error into 'file:line: context: message'."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = prefix + tuple(err["loc"])
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key '{err['loc'][-1]}'"
        elif err["type"] == "missing":
            msg = f"missing required key '{key}'"
        else:  # a validator's own ValueError reads better without pydantic's prefix
            msg = f"'{key}': {err['msg'].removeprefix('Value error, ')}"
        ctx = f"{context}: " if context else ""
        raise InvalidKnowledge(f"{where}:{line_of(lines, loc)}: {ctx}{msg}") from None


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
