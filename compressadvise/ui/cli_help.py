"""Help that reads like the rest of the ecosystem's CLIs: clean placeholders, shell completion of
the knowledge base's names.

Typer labels every value with its Python type (`<str>`, `<list[str]>`, `<bool>` on flags) and
wraps argument names in the usage line (`{original}`, `[[MODEL]]`). `CleanGroup`, the root
group's class, rewrites those once for every command, so no declaration has to remember to.
"""
from __future__ import annotations

import inspect
import typing
from typing import Any

import typer.core

_TYPE_WORDS = {int: "INTEGER", float: "NUMBER", str: "TEXT", bool: "BOOLEAN"}


def _option_metavar(option: Any) -> str:
    """What follows an option in help: nothing for a flag, the choices, or a plain type word."""
    if option.is_flag or option.count:
        return ""
    kind = option.type_descriptor
    if kind.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in kind.choices) + "]"
    if kind.is_path:
        return "PATH"
    annotation = typing.get_args(kind.annotation)[0] if kind.is_list else kind.annotation
    return _TYPE_WORDS.get(annotation, "VALUE")


def _argument_usage(argument: Any) -> Any:
    """MODEL, [MODEL], PATHS...: click's convention, not Typer's `{model}` / `[[MODEL]]`."""
    def usage() -> str:
        name = argument.metavar or argument.name.upper()
        name = name if argument.required else f"[{name.strip('[]')}]"
        return name + ("..." if argument.nargs != 1 else "")
    return usage


def _clean_param(param: Any) -> None:
    if getattr(param, "_cleaned", False):
        return
    param._cleaned = True
    if isinstance(param, typer.core.TyperOption):
        if param.metavar is None:
            param.metavar = _option_metavar(param)
        return
    param.metavar = (param.metavar or "").strip("[]") or param.name.upper()
    # Instance overrides (Typer has no hook): the usage line's name, and no `<str>` type column
    # beside an argument whose name already says what it is.
    param._usage_display_name = _argument_usage(param)
    param.display_type_rich = lambda ctx: None


def _reflow(text: str | None) -> str | None:
    """Docstring paragraphs as paragraphs: Typer's rich mode keeps every source line break, so a
    wrapped docstring came out as ragged half-lines. Indented lines (examples) keep their breaks."""
    if not text:
        return text
    paragraphs = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines = para.split("\n")
        literal = any(ln.startswith(("  ", "- ", "\b")) for ln in lines)
        paragraphs.append(para if literal else " ".join(ln.strip() for ln in lines))
    return "\n\n".join(paragraphs)


# Shown at the end of each command's help (and its docs section); tests/test_cli_conventions.py
# parses every line against the command, so an example cannot name an option that is gone.
EXAMPLES: dict[str, list[str]] = {
    "analyze": ["compressadvise analyze model.pt2 --top 0", "compressadvise analyze model.pt2 --json | jq '.layers[0]'",
                "compressadvise analyze model.pt2 --target ane-a17"],
    "recommend": ["compressadvise recommend model.pt2 --target ane-a17 --size-fraction 0.25 --out plan.yaml",
                  "compressadvise recommend --target mac-gpu --max-size-mb 2 --data calibration"],
    "rules": ["compressadvise rules --target ane-a17", "compressadvise rules --technique palettization --json"],
    "explain": ["compressadvise explain WGT001", "compressadvise explain palettization",
                "compressadvise explain ane-a17"],
    "techniques": ["compressadvise techniques --json"],
    "targets": ["compressadvise targets ane-a17 --json", "compressadvise targets", "compressadvise targets --json"],
    "apply": ["compressadvise apply model.pt2 --plan plan.yaml --out compressed/",
              "compressadvise apply model.pt2 --plan plan.yaml --out compressed/ --samples calib.npz --force"],
    "export": ["compressadvise export plan.yaml --to coremltools --model model.pt2 -o config.yaml",
               "compressadvise export plan.yaml --to torchao --model model.pt2 -o compress.py"],
    "verify": ["compressadvise verify model.pt2 compressed/ --samples val.npz --max-accuracy-drop 1",
               "compressadvise verify bundled demo-out/ --target ane-a17 --max-latency-ms 2 --json"],
    "sensitivity": ["compressadvise sensitivity model.pt2 --samples val.npz --target ane-a17",
                    "compressadvise sensitivity --techniques 'palettization:nbits=4|2' --top 0"],
    "search": ["compressadvise search model.pt2 --samples val.npz --size-fraction 0.25 --out plan.yaml",
               "compressadvise search --target mac-gpu --bits-per-weight 4 --techniques linear_quantization"],
    "report": ["compressadvise report model.pt2 --target ane-a17 -o report.html",
               "compressadvise report compressed/ --model model.pt2 --verify verify.json"],
    "walkthrough": ["compressadvise walkthrough", "compressadvise walkthrough model.pt2 --yes --out session/"],
    "learn": ["compressadvise learn", "compressadvise learn palettization --yes"],
    "playbooks validate": ["compressadvise playbooks validate team-playbooks/"],
}


def examples_text(path: str) -> str | None:
    """The epilog: help ends with what to type."""
    lines = EXAMPLES.get(path)
    return "Examples:\n\n" + "\n".join(f"  $ {ln}" for ln in lines) if lines else None


def clean(command: Any, path: str = "") -> None:
    """Rewrite the placeholders and help text of a command and, for a group, of every command
    under it. Parameters click makes on the fly (--help, completion) are cleaned as they appear."""
    command.help = _reflow(command.help)
    command.epilog = command.epilog or examples_text(path)
    original = command.get_params

    def get_params(ctx: Any) -> list[Any]:
        params = original(ctx)
        for param in params:
            _clean_param(param)
        return params

    command.get_params = get_params
    for param in command.params:
        _clean_param(param)
    for name, sub in getattr(command, "commands", {}).items():
        clean(sub, f"{path} {name}".strip())


class CleanGroup(typer.core.TyperGroup):
    """The root group: Typer builds it (and the click commands under it) for every run and for
    the docs, so cleaning here covers `--help`, usage errors and the generated CLI page."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        clean(self)


# ------------------------------------------------------------------ shell completion
def _starting(names: list[str], incomplete: str) -> list[str]:
    return [n for n in names if n.lower().startswith(incomplete.lower())]


def _knowledge() -> Any:
    from compressadvise.knowledge.base import load_knowledge

    return load_knowledge()


def complete_target(incomplete: str) -> list[str]:
    return _starting(sorted(_knowledge().targets), incomplete)


def complete_technique(incomplete: str) -> list[str]:
    return _starting(sorted(_knowledge().techniques), incomplete)


def complete_explainable(incomplete: str) -> list[str]:
    """What `explain` takes: a rule code, a technique or a target."""
    k = _knowledge()
    return _starting([*sorted(k.rules), *sorted(k.techniques), *sorted(k.targets)], incomplete)


def complete_lesson(incomplete: str) -> list[str]:
    from compressadvise.ui.learn import LESSONS

    return _starting(list(LESSONS), incomplete)
