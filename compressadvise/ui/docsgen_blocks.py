"""Docs generator: the marked blocks of a page (`<!-- docsgen:... -->`), their run options and output."""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressadvise.errors import CompressAdviseError

MARK = re.compile(
    r"<!-- docsgen:(?P<kind>run|include) (?P<spec>.*?) -->\n(?P<body>.*?)<!-- /docsgen -->"
    r"|<!-- docsgen:file (?P<path>\S+) -->\n```[^\n]*\n(?P<content>.*?)\n```",
    re.S,
)
RUNNERS = ("compressadvise", "python", "cat")


class DocsError(CompressAdviseError):
    """The docs cannot be generated (a documented command failed, a marker is malformed)."""

    exit_code = 1


@dataclass
class RunSpec:
    argv: list[str]
    lines: int = 0
    exit: int = 0
    json: bool = False
    measured: bool = False
    needs: list[str] = field(default_factory=list)  # commands an earlier block's output comes from

    @classmethod
    def parse(cls, spec: str) -> "RunSpec":
        words = shlex.split(spec)
        opts: dict[str, Any] = {}
        while words and words[0] not in RUNNERS:
            key, _, value = words.pop(0).partition("=")
            if key in ("lines", "exit"):
                opts[key] = int(value)
            elif key in ("json", "measured") and not value:
                opts[key] = True
            elif key == "needs" and value:
                opts[key] = value.split(",")
            else:
                raise DocsError(f"docsgen marker: unknown option {key!r} in {spec!r}")
        if not words:
            raise DocsError(f"docsgen marker: no command in {spec!r} (start with one of {', '.join(RUNNERS)})")
        return cls(argv=words, **opts)

    @property
    def shown(self) -> str:
        return " ".join(shlex.quote(w) for w in self.argv)


@dataclass
class Job:
    """One page's commands, run in order in one scratch folder."""

    page: str
    steps: list[dict] = field(default_factory=list)  # {"file", "content"} or {"argv"}


def page_job(page: str, text: str, commands: set[str]) -> Job:
    job = Job(page)
    for m in MARK.finditer(text):
        if m.group("path"):
            path = m.group("path")
            if path.startswith("/") or ".." in Path(path).parts:
                raise DocsError(f"{page}: docsgen:file {path!r} must stay inside the scratch folder")
            job.steps.append({"file": path, "content": m.group("content") + "\n"})
        elif m.group("kind") == "run":
            spec = RunSpec.parse(m.group("spec"))
            if _available(spec, commands):
                job.steps.append({"argv": spec.argv})
    return job


def _available(spec: RunSpec, commands: set[str]) -> bool:
    """A `compressadvise X` block for a command this build lacks is shown as a note instead."""
    if any(n not in commands for n in spec.needs):
        return False
    if spec.argv[0] != "compressadvise":
        return True
    words = [w for w in spec.argv[1:] if not w.startswith("-")]
    return not words or words[0] in commands


def fill_blocks(text: str, results: list[dict], commands: set[str], includes: dict[str, str],
                replacements: dict[str, str]) -> str:
    """Replace each marked block's body with its output (results in the job's order)."""
    queue = list(results)

    def body(m: re.Match) -> str:
        if m.group("path"):
            return m.group(0)
        spec_text = m.group("spec")
        head = f"<!-- docsgen:{m.group('kind')} {spec_text} -->\n"
        if m.group("kind") == "include":
            if spec_text not in includes:
                raise DocsError(f"docsgen include: unknown snippet {spec_text!r} "
                                f"(known: {', '.join(sorted(includes))})")
            return head + includes[spec_text].rstrip("\n") + "\n<!-- /docsgen -->"
        spec = RunSpec.parse(spec_text)
        if not _available(spec, commands):
            missing = [n for n in [*spec.needs, spec.argv[1] if len(spec.argv) > 1 else ""]
                       if n and n not in commands and spec.argv[0] == "compressadvise"]
            name = " and ".join(f"`compressadvise {n}`" for n in dict.fromkeys(missing))
            note = (f'!!! note "Not in this build"\n    {name} is not part of this build yet; '
                    "the real output of this step appears here once it is.\n")
            return head + note + "<!-- /docsgen -->"
        res = queue.pop(0)
        return head + render_output(spec, res, replacements) + "<!-- /docsgen -->"

    return MARK.sub(body, text)


def render_output(spec: RunSpec, res: dict, replacements: dict[str, str]) -> str:
    if res["code"] != spec.exit:
        raise DocsError(f"`{spec.shown}` exited {res['code']} (expected {spec.exit}): "
                        f"{(res['stderr'] or res['stdout']).strip()[-600:]}")
    shown = " ".join(shlex.quote(w) for w in res.get("argv", spec.argv))
    text = res["stdout"]
    if spec.exit != 0 or not text.strip():
        text = text + res["stderr"]
    for old, new in replacements.items():
        text = text.replace(old, new)
    if spec.json:
        text = json.dumps(shorten_json(json.loads(text)), indent=2) + "\n"
    lines = [ln.rstrip() for ln in text.rstrip("\n").split("\n")]
    if spec.lines and len(lines) > spec.lines:
        lines = lines[: spec.lines] + [f"... ({len(lines) - spec.lines} more lines)"]
    rc = f"\n(exit code {res['code']})" if res["code"] else ""
    # text, not console: output highlighted as a shell session colours its numbers and quotes.
    return "```text\n$ " + shown + "\n" + "\n".join(lines) + rc + "\n```\n"


def shorten_json(value: Any, keep: int = 2, max_chars: int = 160) -> Any:
    """An excerpt of a JSON value: lists longer than keep+1 cut to `keep` items, long strings cut."""
    if isinstance(value, list):
        if len(value) <= keep + 1:
            return [shorten_json(v, keep, max_chars) for v in value]
        return [shorten_json(v, keep, max_chars) for v in value[:keep]] + [f"... {len(value) - keep} more"]
    if isinstance(value, dict):
        return {k: shorten_json(v, keep, max_chars) for k, v in value.items()}
    if isinstance(value, str) and len(value) > max_chars:
        return value[:max_chars] + "..."
    return value


def mask_measured(text: str) -> str:
    """The bodies of `measured` blocks are left out of `--check`'s comparison: timings (and the
    words around them, "faster"/"slower") change from run to run. The command still has to run
    and exit as expected, since `--check` regenerates every block."""
    def mask(m: re.Match) -> str:
        if m.group("kind") == "run" and RunSpec.parse(m.group("spec")).measured:
            return f"<!-- docsgen:run {m.group('spec')} -->\n(measured)\n<!-- /docsgen -->"
        return m.group(0)

    return MARK.sub(mask, text)
