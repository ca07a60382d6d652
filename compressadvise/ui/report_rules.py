"""Rules on the report page: every rule the page mentions links to one embedded explanation (the
`compressadvise explain` text), so the page reads on its own; a docs link only with a docs base."""
from __future__ import annotations

import re
from typing import Any

from compressadvise.ui.report_data import ReportData, RuleRef
from compressadvise.ui.report_markup import _e, _markdown
from compressadvise.ui.report_summary import _rule_ref

CODE = re.compile(r"\b[A-Z]{3}\d{3}\b")


def collect_rules(d: ReportData, k: Any, docs_base: str) -> dict[str, RuleRef]:
    """Every rule the page cites (plan steps and their left-out layers, advice, the rule trace,
    placement), once each, in that order."""
    known = {r.code: r for s in d.steps for r in s.rules}
    known.update({a.rule.code: a.rule for a in d.advice})
    codes = [r.code for s in d.steps for r in s.rules]
    codes += [str(x["code"]) for s in d.steps for x in s.skipped if CODE.fullmatch(str(x.get("code") or ""))]
    codes += [a.rule.code for a in d.advice] + [str(t["code"]) for t in d.trace]
    if d.placement_rule is not None:
        known[d.placement_rule.code] = d.placement_rule
        codes.append(d.placement_rule.code)
    elif d.placement and d.placement.get("fallback") and d.placement.get("rule"):  # cited only with fallbacks
        codes.append(str(d.placement["rule"]))
    return {c: known.get(c) or _rule_ref(c, k, docs_base) for c in dict.fromkeys(codes)}


def rule_link(code: str, rules: dict[str, RuleRef]) -> str:
    """An in-page link to the rule's embedded explanation (its title as the tooltip)."""
    r = rules.get(code)
    if r is None:
        return f"<code>{_e(code)}</code>"
    return f'<a class="ruleref" href="#rule-{_e(code)}" title="{_e(r.title)}"><code>{_e(code)}</code></a>'


def link_codes(text: str, rules: dict[str, RuleRef]) -> str:
    """Escaped text with each cited rule code turned into its link (codes not on the page stay text)."""
    out, last = [], 0
    for m in CODE.finditer(text):
        if m.group() in rules:
            out += [_e(text[last:m.start()]), rule_link(m.group(), rules)]
            last = m.end()
    return "".join(out) + _e(text[last:])


def rules_html(d: ReportData) -> str:
    """The explanations, one collapsible entry per cited rule (opened by a click on a link)."""
    if not d.rules:
        return ""
    items = "".join(_entry(r) for r in d.rules.values())
    return (f'<section id="rules"><h2>Rules cited</h2><p class="hint">Why each rule on this page says what it '
            f"says: the text of <code>compressadvise explain CODE</code>.</p>{items}</section>")


def _entry(r: RuleRef) -> str:
    body = _markdown(r.explain) if r.explain else "<p>(rule text not available in this knowledge base)</p>"
    docs = f' <a class="docs" href="{_e(r.url)}">docs</a>' if r.url else ""
    return (f'<details class="rule" id="rule-{_e(r.code)}"><summary><code>{_e(r.code)}</code> {_e(r.title)}'
            f"{docs}</summary><div class=explain>{body}</div></details>")
