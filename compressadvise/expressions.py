"""Playbook conditions in CEL (Common Expression Language), compiled once, never eval()'d.

CEL is side-effect free, typed and does not coerce between types. A condition is checked when
its playbook loads by running it on typed stand-in facts (see facts.prototypes): a syntax
error, an unknown fact name, a type mix such as `layer.params + 1.5`, or a non-boolean result
is rejected there, before any model is seen.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .facts import NAMESPACES, prototypes


def _load_cel() -> Any:
    """The CEL engine's compiled module, without the package's __init__, which also imports
    its interactive CLI (0.7 s): the knowledge commands must start in well under 0.5 s."""
    import importlib.machinery
    import importlib.util
    from pathlib import Path

    try:
        spec = importlib.util.find_spec("cel")  # locates the package without running it
        folder = Path(spec.submodule_search_locations[0])
        so = next(folder.glob("cel.*" + importlib.machinery.EXTENSION_SUFFIXES[0].split(".")[-1]))
        ext = importlib.util.spec_from_file_location("cel.cel", so)
        module = importlib.util.module_from_spec(ext)
        ext.loader.exec_module(module)
        module.compile  # noqa: B018 - fail over to the normal import if the layout changed
        return module
    except Exception:  # pragma: no cover
        import cel as module

        return module


cel = _load_cel()

_REF = re.compile(r"\b(model|layer|target|constraints|step)\.([A-Za-z_][A-Za-z0-9_]*)")


class ExpressionError(ValueError):
    """A condition that cannot be accepted; the message names the problem."""


def _strip_strings(text: str) -> str:
    return re.sub(r"\"(\\.|[^\"\\])*\"|'(\\.|[^'\\])*'", '""', text)


def split_conjuncts(text: str) -> list[str]:
    """Split on top-level `&&` (outside parentheses and strings) to explain which part failed."""
    parts, depth, buf, i, quote = [], 0, [], 0, None
    while i < len(text):
        ch = text[i]
        if quote:
            buf.append(ch)
            if ch == "\\" and i + 1 < len(text):
                buf.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            buf.append(ch)
        elif ch in "([{":
            depth += 1
            buf.append(ch)
        elif ch in ")]}":
            depth -= 1
            buf.append(ch)
        elif depth == 0 and text.startswith("&&", i):
            parts.append("".join(buf).strip())
            buf = []
            i += 1
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf).strip())
    return [p for p in parts if p]


@dataclass
class Condition:
    source: str
    program: Any
    conjuncts: list[tuple[str, Any]] = field(default_factory=list)
    facts_used: list[str] = field(default_factory=list)

    def __call__(self, ctx: dict[str, Any]) -> bool:
        return self.program.execute(ctx) is True

    def failing(self, ctx: dict[str, Any]) -> list[str]:
        """The conjuncts that are false for these facts (for the 'why not' trace)."""
        return [text for text, prog in self.conjuncts if prog.execute(ctx) is not True]


def _check_names(text: str, namespaces: tuple[str, ...]) -> list[str]:
    used = []
    for ns, name in _REF.findall(_strip_strings(text)):
        if ns not in namespaces:
            raise ExpressionError(f"'{ns}.{name}': '{ns}' facts are not available in this scope "
                                  f"(allowed: {', '.join(namespaces)})")
        if name not in NAMESPACES[ns]:
            known = ", ".join(sorted(NAMESPACES[ns]))
            raise ExpressionError(f"unknown fact '{ns}.{name}' (known {ns} facts: {known})")
        used.append(f"{ns}.{name}")
    return sorted(set(used))


_PROTO_CONTEXTS: dict[tuple, Any] = {}


def _prototype_context(namespaces: tuple[str, ...], variant: int) -> Any:
    """Stand-in facts converted to CEL once and shared by every condition of that scope."""
    key = (namespaces, variant)
    if key not in _PROTO_CONTEXTS:
        ctx = cel.Context()
        ctx.update(prototypes(namespaces, variant))
        _PROTO_CONTEXTS[key] = ctx
    return _PROTO_CONTEXTS[key]


def compile_condition(text: str, namespaces: tuple[str, ...]) -> Condition:
    """Compile and type-check a condition once; raise ExpressionError with a clear message."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("condition is empty")
    try:
        program = cel.compile(text)
    except (ValueError, RuntimeError) as e:
        first = str(e).splitlines()
        detail = " ".join(x.strip() for x in first[:2])
        raise ExpressionError(f"syntax error in condition: {detail}") from None
    used = _check_names(text, namespaces)
    for var in program.variables():
        if var not in namespaces:
            raise ExpressionError(f"unknown name '{var}' (conditions may use: {', '.join(namespaces)})")
    for variant in (0, 1):
        ctx = _prototype_context(namespaces, variant)
        try:
            result = program.execute(ctx)
        except TypeError as e:
            raise ExpressionError(f"type error: {str(e).split('.')[0]} "
                                  "(CEL does not mix int and double: write 2.0, not 2, or use double(x))") from None
        except (RuntimeError, ValueError, ZeroDivisionError) as e:
            msg = str(e).splitlines()[0]
            if "division by zero" in msg or "modulus by zero" in msg:
                continue  # depends on the model's values, not a type problem
            raise ExpressionError(f"cannot evaluate: {msg}") from None
        if not isinstance(result, bool):
            raise ExpressionError(f"condition must be true or false, got {type(result).__name__}")
    conjuncts = [(p, cel.compile(p)) for p in split_conjuncts(text)]
    return Condition(text, program, conjuncts if len(conjuncts) > 1 else [(text, program)], used)


def compile_value(text: str, variables: dict[str, Any]) -> Any:
    """Compile an arithmetic CEL expression (size formulas) and check it on sample variables."""
    try:
        program = cel.compile(text)
    except (ValueError, RuntimeError) as e:
        raise ExpressionError(f"syntax error in formula: {str(e).splitlines()[0]}") from None
    unknown = set(program.variables()) - set(variables)
    if unknown:
        raise ExpressionError(f"unknown variable(s) {sorted(unknown)} (known: {sorted(variables)})")
    try:
        result = program.execute(variables)
    except (TypeError, RuntimeError, ValueError) as e:
        raise ExpressionError(f"formula does not evaluate: {str(e).split('.')[0]}") from None
    if not isinstance(result, (int, float)) or isinstance(result, bool):
        raise ExpressionError(f"formula must give a number, got {type(result).__name__}")
    return program
