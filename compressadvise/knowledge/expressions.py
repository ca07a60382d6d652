"""Playbook conditions in CEL (Common Expression Language), compiled once, never eval()'d.

CEL is side-effect free, typed and does not coerce between types. A condition is checked when
its playbook loads by running it on typed stand-in facts (see facts.prototypes): a syntax
error, an unknown fact name, a type mix such as `layer.params + 1.5`, or a non-boolean result
is rejected there, before any model is seen.

Comprehension macros (`target.supports.exists(m, m.startsWith("palettize"))`, `all`,
`exists_one`, `filter`, `map`) may be used. The CEL engine has no evaluation cost limit, so
the bound is static: conditions are at most MAX_CONDITION_CHARS long, nest comprehensions at
most MAX_COMPREHENSION_DEPTH deep and never range over a comprehension's result (chaining
`.map(a, a + a)` would double the data at every link). What is left is polynomial in the
condition's length: the fact lists hold a dozen entries. A condition that fails while it runs on a real model
(division by zero, integer overflow) raises InvalidKnowledge naming the rule's file:line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.facts import NAMESPACES, prototypes


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

_CHECKED = ("model", "layer", "target", "constraints", "step")  # namespaces whose every reference is listed
_REF = re.compile(r"\b(" + "|".join(_CHECKED) + r")\.([A-Za-z_][A-Za-z0-9_]*)")
MAX_CONDITION_CHARS = 2000
MAX_COMPREHENSION_DEPTH = 2
_MACROS = ("all", "exists", "exists_one", "filter", "map")
_MACRO_CALL = re.compile(r"\.\s*(" + "|".join(_MACROS) + r")\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)?")


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


def _error_text(e: BaseException) -> str:
    """The CEL engine's message, first line, without its boilerplate."""
    if isinstance(e, KeyError):
        return f"no such key {e}"
    msg = (str(e).splitlines() or [type(e).__name__])[0].replace(" in CEL expression", "").rstrip(".")
    return msg[:1].lower() + msg[1:]


@dataclass
class Condition:
    source: str
    program: Any
    conjuncts: list[tuple[str, Any]] = field(default_factory=list)
    facts_used: list[str] = field(default_factory=list)
    origin: str = ""  # "file:line: rule CODE", set by the loader for runtime errors

    def __call__(self, ctx: dict[str, Any]) -> bool:
        try:
            return self.program.execute(ctx) is True
        except Exception as e:  # noqa: BLE001 - any engine error is the condition's, not ours
            where = f"{self.origin}: " if self.origin else ""
            raise InvalidKnowledge(f"{where}condition failed at evaluation: {_error_text(e)}",
                                   hint=f"condition: {self.source}") from None

    def failing(self, ctx: dict[str, Any]) -> list[str]:
        """The conjuncts that are false for these facts (for the 'why not' trace); a conjunct
        that errors alone (the whole was false through another part) counts as failing."""
        out = []
        for text, prog in self.conjuncts:
            try:
                ok = prog.execute(ctx) is True
            except Exception as e:  # noqa: BLE001
                ok, text = False, f"{text} (error: {_error_text(e)})"
            if not ok:
                out.append(text)
        return out


def _receiver(text: str, dot: int) -> str:
    """The expression a `.macro(` call is made on: identifiers, dots and bracketed groups."""
    i = dot - 1
    while i >= 0 and text[i].isspace():
        i -= 1
    while i >= 0:
        if text[i] in ")]}":
            depth = 0
            while i >= 0:
                depth += text[i] in ")]}"
                depth -= text[i] in "([{"
                i -= 1
                if depth == 0:
                    break
        elif text[i].isalnum() or text[i] in "_.":
            i -= 1
        else:
            break
    return text[i + 1:dot]


def _comprehensions(text: str) -> tuple[int, list[str], bool]:
    """How deep comprehension macros nest, the variables they bind, and whether one ranges
    over another's result (strings blanked first, so their contents never count)."""
    text = _strip_strings(text)
    calls = list(_MACRO_CALL.finditer(text))
    opens = {text.index("(", m.end(1)) for m in calls}
    chained = any(_MACRO_CALL.search(_receiver(text, m.start())) for m in calls)
    stack: list[bool] = []
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            stack.append(i in opens)
            depth = max(depth, sum(stack))
        elif ch in ")]}" and stack:
            stack.pop()
    return depth, sorted({m.group(2) for m in calls if m.group(2)}), chained


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


def _check_cost(text: str, namespaces: tuple[str, ...]) -> list[str]:
    """The static cost bound (see the module docstring); returns the comprehension variables."""
    if len(text) > MAX_CONDITION_CHARS:
        raise ExpressionError(f"condition is {len(text)} characters long (at most {MAX_CONDITION_CHARS})")
    depth, bound, chained = _comprehensions(text)
    if depth > MAX_COMPREHENSION_DEPTH:
        raise ExpressionError(f"comprehensions ({', '.join(_MACROS)}) nest {depth} deep "
                              f"(at most {MAX_COMPREHENSION_DEPTH})")
    if chained:  # `l.map(a, a + a).map(a, a + a)...` doubles its result at every link
        raise ExpressionError("a comprehension may not range over another comprehension's result: "
                              "range over a fact list such as target.supports")
    for var in bound:
        if var in NAMESPACES:
            raise ExpressionError(f"comprehension variable '{var}' hides the '{var}' facts: rename it")
    return bound


def _try_prototypes(program: Any, namespaces: tuple[str, ...]) -> None:
    """Run on both sets of stand-in facts: type mixes and non-boolean results fail here."""
    for variant in (0, 1):
        ctx = _prototype_context(namespaces, variant)
        try:
            result = program.execute(ctx)
        except TypeError as e:
            raise ExpressionError(f"type error: {str(e).split('.')[0]} "
                                  "(CEL does not mix int and double: write 2.0, not 2, or use double(x))") from None
        except (ZeroDivisionError, IndexError):
            continue  # depends on the model's values (stand-ins are equal, lists may be empty)
        except Exception as e:  # noqa: BLE001 - e.g. overflow on small stand-ins: broken everywhere
            msg = _error_text(e)
            if "division by zero" in msg or "modulus by zero" in msg or "modulo by zero" in msg:
                continue
            raise ExpressionError(f"cannot evaluate: {msg}") from None
        if not isinstance(result, bool):
            raise ExpressionError(f"condition must be true or false, got {type(result).__name__}")


def compile_condition(text: str, namespaces: tuple[str, ...], origin: str = "") -> Condition:
    """Compile and type-check a condition once; raise ExpressionError with a clear message.
    `origin` ("file:line: rule CODE") prefixes errors raised later, at evaluation."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError("condition is empty")
    bound = _check_cost(text, namespaces)
    try:
        program = cel.compile(text)
    except (ValueError, RuntimeError) as e:
        first = str(e).splitlines()
        detail = " ".join(x.strip() for x in first[:2])
        raise ExpressionError(f"syntax error in condition: {detail}") from None
    used = _check_names(text, namespaces)
    for var in program.variables():
        if var not in namespaces and var not in bound:
            raise ExpressionError(f"unknown name '{var}' (conditions may use: {', '.join(namespaces)})")
    _try_prototypes(program, namespaces)
    conjuncts = [(p, cel.compile(p)) for p in split_conjuncts(text)]
    return Condition(text, program, conjuncts if len(conjuncts) > 1 else [(text, program)], used, origin)


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
    except Exception as e:  # noqa: BLE001 - overflow, division by zero...: all the formula's fault
        raise ExpressionError(f"formula does not evaluate: {str(e).split('.')[0]}") from None
    if not isinstance(result, (int, float)) or isinstance(result, bool):
        raise ExpressionError(f"formula must give a number, got {type(result).__name__}")
    return program


def only_used(facts: dict[str, Any], used: frozenset[str]) -> dict[str, Any]:
    """The facts some condition reads (`ns.name`, as Condition.facts_used lists them): turning every
    fact into a CEL value for each evaluation was most of the cost of per-layer decisions."""
    return {ns: ({n: v for n, v in value.items() if f"{ns}.{n}" in used}
                 if ns in _CHECKED and isinstance(value, dict) else value) for ns, value in facts.items()}
