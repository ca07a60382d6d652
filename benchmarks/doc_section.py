"""Shared by the benchmarks: a section of docs/benchmarks.md rewritten in place, and a row measured
in a fresh process (so its peak RSS and first imports are its own)."""
from __future__ import annotations

import multiprocessing as mp
import re
from pathlib import Path
from typing import Any, Callable

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(heading: str, text: str, doc_path: Path = DOC) -> None:
    """Replace the section `heading` (up to the next `## ` heading) with `text`, or append it."""
    from compressadvise.fsutil import write_text_atomic

    doc = doc_path.read_text(encoding="utf-8")
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _m: text + "\n", doc, count=1).rstrip("\n") + "\n"
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    write_text_atomic(doc_path, doc)


def in_fresh_process(fn: Callable[..., None], *args: Any) -> list[str]:
    """fn(*args, queue) run in a spawned interpreter; the row it puts on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, queue))
    p.start()
    row = queue.get()
    p.join()
    return row


def split_installed(model_ids: list[str], catalog: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(installed model ids, 'id: why not' for the others) from the real-model catalog."""
    ok, skipped = [], []
    for model_id in model_ids:
        spec = catalog[model_id]
        (ok.append(model_id) if spec.installed() else skipped.append(f"{model_id}: {spec.skip_reason()}"))
    return ok, skipped
