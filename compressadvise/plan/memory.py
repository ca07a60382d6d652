"""A plan's runtime memory for a decoder: its compressed weights plus the KV cache at a context."""
from __future__ import annotations

from typing import Any

from compressadvise.errors import BadArgument
from compressadvise.knowledge.schema import Plan, RuntimeMemory


def check_context(report: Any, context_length: int | None) -> None:
    """A context the model cannot run at is refused before any work (exit 2)."""
    kv = getattr(report, "kv", None)
    if context_length is not None and kv is not None and kv.max_context and context_length > kv.max_context:
        raise BadArgument(f"context length {context_length} is over the model's position limit ({kv.max_context})")


def with_memory(plan: Plan, report: Any, context_length: int | None = None, knowledge: Any = None) -> Plan:
    """`plan` with its runtime memory when the model is a causal LM (its config gives the cache
    shape): at `context_length` tokens, else at the model's own position limit; on a Core ML target
    also how its cache ships (plan.decoder: state, or a fixed window on older OS versions)."""
    from compressadvise.plan.decoder_deploy import with_decoder

    kv = getattr(report, "kv", None)
    if kv is None:  # not a causal LM: no cache to count
        return plan
    check_context(report, context_length)
    context = context_length or kv.max_context
    plan = with_decoder(plan, report, context, knowledge)
    if plan.prediction is None or not context:
        return plan
    cache = kv.bytes_at(context)
    weights = plan.prediction.bytes_after
    basis = (f"KV cache at fp16: 2 x {kv.heads_words()} x {kv.head_dim} head dim x "
             f"{context} tokens x 2 bytes ({kv.source}); weights: the plan's prediction")
    memory = RuntimeMemory(context_length=context, weights_bytes=weights, kv_cache_bytes=cache,
                           total_bytes=weights + cache, basis=basis)
    return plan.model_copy(update={"memory": memory})
