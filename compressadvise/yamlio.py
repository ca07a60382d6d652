"""Safe YAML reading that remembers line numbers, so errors say file:line and the key."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import InvalidKnowledge

try:  # the C loader is much faster, and just as safe
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover
    _Loader = yaml.SafeLoader


def _walk(node: yaml.Node, path: tuple, lines: dict[tuple, int], where: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            k = key.value
            if k in seen:
                raise InvalidKnowledge(f"{where}:{key.start_mark.line + 1}: duplicate key '{k}'")
            seen.add(k)
            lines[path + (k,)] = key.start_mark.line + 1
            _walk(value, path + (k,), lines, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _walk(value, path + (i,), lines, where)


def read_yaml(path: str | Path, text: str | None = None) -> tuple[Any, dict[tuple, int]]:
    """Parse with the safe loader; return the data and a map from key path to line."""
    where = str(path)
    try:
        if text is None:
            text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidKnowledge(f"{where}: cannot read ({e.strerror})") from None
    try:
        loader = _Loader(text)  # one parse: keep the node tree for line numbers, build data from it
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InvalidKnowledge(f"{where}{line}: malformed YAML: {problem}") from None
    lines: dict[tuple, int] = {}
    if node is not None:
        _walk(node, (), lines, where)
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
        else:
            msg = f"'{key}': {err['msg']}"
        ctx = f"{context}: " if context else ""
        raise InvalidKnowledge(f"{where}:{line_of(lines, loc)}: {ctx}{msg}") from None


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
