"""docs/reference/scenarios.md: the advisor's scenario table (tests/scenarios.yaml) as a page.

The table is the test suite's (tests/test_scenarios.py runs each row); the page shows what each
scenario must and must not get, and the known gaps, so the docs cannot claim more than is tested.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

TABLE = Path("tests") / "scenarios.yaml"
TITLE = "What the advisor does for ..."
WORDS = {"steps": "steps", "advice": "advice", "meets_budget": "meets the budget", "compressed": "compresses",
         "kept": "keeps", "step_text": "prints", "ways": "ways forward say", "fidelity": "fidelity evidence"}
NOT_WORDS = {"no_advice": "no advice", "step_text_not": "never prints"}


def scenarios_page(root: Path) -> str | None:
    """The page's Markdown; None when the repository has no scenario table."""
    import yaml

    path = root / TABLE
    if not path.exists():
        return None
    rows = yaml.safe_load(path.read_text(encoding="utf-8"))["scenarios"]
    gaps = [r for r in rows if r.get("fails")]
    out = [f"# {TITLE}", "",
           f"Generated from `{TABLE.as_posix()}` by `python -m compressadvise.ui.docsgen`. Each row is a test "
           "(`tests/test_scenarios.py`) on a real pretrained model (`tinylm`: a synthetic tied-embedding decoder): "
           "`recommend` for that target, OS, data and budget must give what *must* says and never what *must "
           f"not* says. {len(rows)} scenarios, {len(gaps)} known gap(s) (the last column).", "",
           "| scenario | model | target (OS) | data | budget | must | must not | status |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        e = r["expect"]
        must = "; ".join(f"{WORDS[k]}: {_fmt(e[k])}" for k in WORDS if k in e)
        must_not = "; ".join(f"{NOT_WORDS[k]}: {_fmt(e[k])}" for k in NOT_WORDS if k in e)
        os_text = f" ({r['os']})" if r.get("os") else ""
        budget = ", ".join(f"{k} {v}" for k, v in r.get("budget", {}).items()) or "none"
        status = f"known gap: {r['fails']}" if r.get("fails") else "checked"
        if r.get("measure"):
            must = "measured; " + must
        out.append(f"| {r['name']} | `{r['model']}` | `{r['target']}`{os_text} | {r.get('data', 'none')} | {budget} "
                   f"| {must} | {must_not or '-'} | {status} |")
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(f"`{x}`" for x in v) if v else "none"
    return f"`{str(v).lower()}`" if isinstance(v, bool) else f"`{v}`"
