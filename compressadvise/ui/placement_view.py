"""The placement hot spots in the terminal: ops that leave the accelerator, and the unit switches."""
from __future__ import annotations

from typing import Any

MAX_ROWS = 12


def show_placement(rep: Any) -> None:
    """One section: the fallback ops (each with its reason and source) and the switches."""
    from rich.table import Table

    from compressadvise.ui.render import human_bytes, human_ms, out

    if rep is None:
        return
    basis = f"[dim](estimate, from the {rep.basis}; {rep.ops_total} ops)[/]"
    if rep.accelerator is None or not rep.fallback:  # nothing to point at: one line
        what = (f"every op expected on the {rep.accelerator}, no unit switches" if rep.accelerator
                else "; ".join(rep.notes))
        out.print(f"\nplacement on {rep.target}: {what} {basis}")
        return
    out.print(f"\n[bold]Placement on {rep.target}[/] {basis}")
    t = Table(title=f"Ops the {rep.accelerator} lacks", show_edge=False)
    for col in ("op", "layer", "runs on", "why", "confidence"):
        t.add_column(col)
    for p in rep.fallback[:MAX_ROWS]:
        t.add_row(p.op, p.layer or "-", p.runs_on, p.reason, p.confidence)
    out.print(t)
    if len(rep.fallback) > MAX_ROWS:
        out.print(f"   ... and {len(rep.fallback) - MAX_ROWS} more (--json lists every one)")
    if rep.switches_counted:
        known = [b.bytes for b in rep.boundaries if b.bytes is not None]
        crossing = human_bytes(sum(known)) if len(known) == len(rep.boundaries) else "of unknown size"
        out.print(f"   {len(rep.boundaries)} switch(es) between units; crossing tensors {crossing}, "
                  f"copy cost {human_ms(rep.switch_ms) if rep.switch_ms is not None else 'n/a'} [dim](estimate, a lower bound)[/]")
        for b in rep.boundaries[:6]:
            out.print(f"   [dim]{b.from_unit} -> {b.to_unit}: {b.producer} -> {b.consumer}[/]")
    for n in rep.notes:
        out.print(f"   [dim]note: {n}[/]")
    out.print(f"   [dim]why it matters: `compressadvise explain {rep.rule}`; the table: "
              f"`compressadvise targets {rep.target}`[/]")
