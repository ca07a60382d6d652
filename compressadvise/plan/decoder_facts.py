"""Rules about a decoder's runtime memory, decided once the plan's weights and context are known.

The KV cache grows with the context and does not shrink with the weights, so whether compressing
the weights further helps runtime memory depends on two things the model rules cannot see when
they run: the plan's predicted weights and the context (`recommend --context-length`). A
model-scope advise rule that reads one of those facts (`facts.PLAN_DEPENDENT`) is therefore left
out of the first pass and decided here, after `with_memory`, on the same facts with those four
replaced by the plan's: its advice and trace entry join the plan like any other rule's.
"""
from __future__ import annotations

from typing import Any

from compressadvise.knowledge.base import PLACEHOLDER, CompiledRule, Knowledge
from compressadvise.knowledge.facts import MB, PLAN_DEPENDENT
from compressadvise.knowledge.schema import Advisory, Plan, RuntimeMemory, TraceEntry
from compressadvise.plan.memory import with_memory

_LATE = frozenset(f"model.{name}" for name in PLAN_DEPENDENT)


def reads_plan_memory(cr: CompiledRule) -> bool:
    """A model-scope advise rule whose condition or message reads a fact the plan changes."""
    if cr.rule.scope != "model" or cr.rule.action.kind != "advise":
        return False
    placeholders = {f"{ns}.{name}" for ns, name in PLACEHOLDER.findall(cr.rule.action.message or "")}
    return bool(_LATE & (set(cr.condition.facts_used) | placeholders))


def memory_facts(memory: RuntimeMemory) -> dict[str, Any]:
    """The plan-dependent model facts from the plan's runtime memory."""
    kv, weights = memory.kv_cache_bytes / MB, memory.weights_bytes / MB
    return {"context_length": memory.context_length, "kv_cache_mb": kv, "planned_weights_mb": weights,
            "kv_over_weights": kv / weights if weights else 0.0}


def with_memory_rules(plan: Plan, report: Any, context_length: int | None, k: Knowledge) -> Plan:
    """`with_memory`, then the rules that read the plan's memory, decided on it (again, replacing
    their earlier advice and trace entries, when the plan already had them)."""
    plan = with_memory(plan, report, context_length, k)
    late = [cr for cr in k.rules.values() if reads_plan_memory(cr)]
    if not late:
        return plan
    from compressadvise.plan.engine import _context, constraint_facts, fill, model_facts, rule_rank, target_facts
    from compressadvise.measure.placement import placement_namespace

    model = model_facts(report)
    if plan.memory is not None:
        model.update(memory_facts(plan.memory))
    facts = {"model": model, "target": target_facts(k.target(plan.target.name), plan.target.os),
             "constraints": constraint_facts(plan.constraints, report),
             "placement": placement_namespace(plan.placement)}
    ctx = _context(facts)
    codes = {cr.code for cr in late}  # decided again on a plan that changed (the CLI measures, then calls this)
    advisories = [a for a in plan.advisories if a.code not in codes]
    trace = [e for e in plan.trace if e.code not in codes]
    for cr in sorted(late, key=rule_rank):
        if not cr.condition(ctx):
            trace.append(TraceEntry(code=cr.code, status="not_matched",
                                    detail="false: " + " && ".join(cr.condition.failing(facts))))
            continue
        advisories.append(Advisory(code=cr.code, title=cr.rule.title, message=fill(cr.rule.action.message or "", facts),
                                   why=cr.rule.why))
        trace.append(TraceEntry(code=cr.code, status="fired", detail="advice added (on the plan's runtime memory)"))
    return plan.model_copy(update={"advisories": advisories, "trace": trace})
