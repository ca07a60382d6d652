"""A decoder's Core ML deployment: its KV cache as state, or a fixed context window, by target and OS.

Core ML keeps a model's state between calls (ct.StateType: keys and values written in place) from
iOS 18 / macOS 15. Where the target's YAML lists the `stateful` runtime mode at the plan's OS, the
plan says `stateful_kv`: one token per call against the cache. Below it, the only form that loads
is a fixed window with no cache, and each generated token recomputes the whole window: the plan
says so, with the MACs-per-token arithmetic (an estimate) from the model's own sizes. Which OS
carries the mode is data (targets/*.yaml `modes:`), never a number written here.
"""
from __future__ import annotations

from typing import Any

from compressadvise.knowledge.deployment import Deployment
from compressadvise.knowledge.schema import DecoderDeployment, DecoderState, Plan

MODE = "stateful"
STATES = ("key_cache", "value_cache")  # the wrapper's buffer names: the Core ML state names
WEIGHT_TYPES = ("linear", "conv", "attention")  # layers whose every weight is one MAC per token
RANGE_ON_NE = ("the query length and the mask are range-flexible (RangeDim), and Core ML runs such a model on the "
               "Neural Engine only at its default shape, other shapes on the GPU or CPU (an Apple engineer, Apple "
               "developer forums thread 724930; enumerated shapes each run there)")


def state_shape(kv: Any, context: int) -> list[int]:
    """(layers, batch 1, KV heads, context, head dim): one buffer for keys, one for values."""
    return [kv.layers, 1, kv.kv_heads, context, kv.head_dim]


def states(kv: Any, context: int) -> list[DecoderState]:
    """The cache's Core ML states: keys and values of every layer in two buffers when the layers share
    a KV head count; else one pair per head count (OpenELM's layer-wise heads: 3..5 by layer), each
    holding its layers in order, so the states hold exactly the cache's bytes (one buffer padded to the
    most heads would not)."""
    per = kv.kv_heads_of()
    if len(set(per)) == 1:
        return [DecoderState(name=n, shape=state_shape(kv, context)) for n in STATES]
    out = []
    for h in dict.fromkeys(per):  # head counts in the order the layers first use them
        layers = [i for i, x in enumerate(per) if x == h]
        out += [DecoderState(name=f"{n}_h{h}", shape=[len(layers), 1, h, context, kv.head_dim], layers=layers)
                for n in STATES]
    return out


def weight_macs(report: Any) -> int:
    """MACs per token of the weight layers: each weight multiplies once per token (a tied head counts
    again: it is used twice, as the embedding table and as the output projection)."""
    return sum(layer.weight_elements for layer in getattr(report, "layers", [])
               if layer.type in WEIGHT_TYPES and not layer.is_embedding and not layer.is_dead)


def macs_per_token(report: Any, kv: Any, context: int) -> tuple[int, int, str]:
    """(with a cache, for the window's last token; without one, per token; the arithmetic in words)."""
    w = weight_macs(report)
    attend = 2 * kv.query_heads_total() * kv.head_dim  # QK^T and AV per query per key, over the layers
    heads = (f"{kv.layers} layers x {(kv.heads or kv.kv_heads) * kv.head_dim} (heads x head dim)"
             if not kv.heads_per_layer else
             f"{kv.query_heads_total()} query heads over the layers x {kv.head_dim} head dim")
    cached = w + attend * context
    fixed = context * w + attend * context * context
    basis = (f"estimate: weights {w:,} MACs a token (the linear layers' weights); attention 2 x {heads} "
             f"per query per key. With the cache the last token of a {context}-token "
             f"window costs {w:,} + {attend:,} x {context} = {cached:,}; without it every token runs the whole "
             f"window: {context} x {w:,} + {attend:,} x {context}^2 = {fixed:,} (x{fixed / max(cached, 1):.0f})")
    return cached, fixed, basis


def decoder_deployment(plan: Plan, report: Any, context: int, knowledge: Any = None) -> DecoderDeployment | None:
    """The plan's decoder form on a Core ML target (None elsewhere, or for a target the knowledge lacks)."""
    kv = getattr(report, "kv", None)
    if kv is None or not context:
        return None
    try:
        dep = Deployment.resolve(knowledge, plan.target.name, plan.target.os or None, check=False)
    except Exception:  # a plan for a target these knowledge files do not describe: nothing to read
        return None
    if not dep.target.coreml:
        return None
    cached, fixed, arithmetic = macs_per_token(report, kv, context)
    mode = dep.target.mode(MODE)
    os_name = f"{dep.target.os_family or 'OS'} {dep.os}"
    if dep.behaviour(MODE) != "unsupported":
        planned = states(kv, context)
        shapes = ", ".join(f"{s.name} {s.shape}" for s in planned)
        return DecoderDeployment(
            kind="stateful_kv", context_length=context, states=planned,
            inputs=[f"input_ids (1, 1..{context}) int32", f"causal_mask (1, 1, 1..{context}, 1..{context}) fp16 "
                    "(additive: 0 where a query may attend, -inf elsewhere; its last axis = tokens so far)"],
            basis=f"{dep.name} lists mode {MODE} from OS {mode.min_os if mode else '?'}; the plan's OS is {os_name}",
            note=(f"KV cache as {len(planned)} fp16 Core ML states ({shapes}), updated in place; each call takes "
                  f"the new tokens and a mask over all tokens so far, up to {context}. {arithmetic}"
                  + (f". {RANGE_ON_NE}" if dep.target.kind == "ane" else "")),
            macs_per_token_cached=cached, macs_per_token_fixed=fixed)
    since = f"from OS {mode.min_os}" if mode else "at no OS (the target lists no such mode)"
    return DecoderDeployment(
        kind="fixed_context", context_length=context, inputs=[f"input_ids (1, {context}) int32"],
        basis=f"{dep.name} has mode {MODE} {since}; the plan's OS is {os_name}",
        note=(f"no KV cache below the {MODE} mode's OS: a fixed {context}-token window (the prompt at the start, "
              "padding after it, the next token's logits read at the last real position), so every generated "
              f"token recomputes the whole window and its cost grows with the context. {arithmetic}"),
        macs_per_token_cached=cached, macs_per_token_fixed=fixed)


def with_decoder(plan: Plan, report: Any, context: int | None, knowledge: Any = None) -> Plan:
    """`plan` with its decoder form recorded (unchanged when the model is no causal LM or the target
    no Core ML one)."""
    dd = decoder_deployment(plan, report, context or 0, knowledge)
    return plan.model_copy(update={"decoder": dd}) if dd is not None else plan
