"""A causal LM converted for Core ML with its KV cache: as state (iOS 18 / macOS 15), else a fixed window.

Stateful form (plan.decoder.kind == "stateful_kv"): the model is wrapped so that its keys and
values live in registered fp16 buffers, (layers, 1, KV heads, C, head dim), which a transformers
`Cache` subclass updates in place each call by writing the new tokens' slice (the "slice update"
pattern of Apple's published Llama / Mistral Core ML exports). Two buffers when every layer has the
same KV heads; one pair per head count when they differ by layer (plan.decoder's states name the
layers each holds). The model is any module that speaks transformers' cache protocol: `config`,
and a forward taking input_ids, an additive 4-D attention_mask, position_ids and a `Cache` whose
`update(keys, values, layer_idx)` it calls once a layer. The wrapper takes `input_ids`
(1, q) and an additive `causal_mask` (1, 1, q, end) whose last axis is the tokens so far, so the
positions written are end - q .. end; it returns the logits. It is traced (torch.jit.trace: the
coremltools torch.export frontend lacks `alias`, which the exported cache program holds) and
converted with `states=[ct.StateType(...)]`: Core ML names the states after the buffers and the
program reads and writes them with read_state / coreml_update_state.

Fixed form ("fixed_context", below the stateful mode's OS): the model alone at input_ids (1, C),
no cache; every generated token recomputes the window (the plan's note gives the cost).

Core ML cannot run on Linux, so apply checks the torch wrapper's numerics (cached step-by-step
logits against the full-sequence logits) and the saved package's structure (states, state ops);
the wrapper is also saved as a torch.export program with its cache as mutable buffers.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

from compressadvise.backends import import_quietly, quiet
from compressadvise.errors import BadModel, CompressionFailed

KV_PROGRAM = "model_kv.pt2"
STATE_OPS = ("read_state", "write_state")  # in the saved file: MIL's coreml_update_state is stored as write + read
CHECK_TOKENS = 8  # the wrapper check: a prompt of half, then one token a call
CHECK_TOLERANCE = 5e-3  # of the largest |logit|: the cache is stored in fp16 (measured ~3e-4 on a tiny Llama)
MASKED = -1e4  # the fixed window's mask value: finite, so no -inf / 0 table is broadcast and stored
TRACE_QUERY = 2  # the trace's query length: transformers' sdpa takes a GQA shortcut for exactly one query


@functools.cache
def _classes() -> tuple[type, type, type]:
    """(SliceUpdateCache, KVCacheWrapper, WindowWrapper), defined once torch is imported."""
    import torch
    from transformers.cache_utils import Cache

    class SliceUpdateCache(Cache):
        """Keys and values in the wrapper's buffers: write positions past..end, read 0..end."""

        def __init__(self, slots: list[tuple[Any, Any, int]], past: Any, end: Any) -> None:
            super().__init__(layers=[])  # no per-layer objects: the buffers hold every layer
            self.slots, self.past, self.end = slots, past, end  # slots[layer]: (keys, values, row in them)

        def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple:
            k, v, row = self.slots[layer_idx]
            if torch.compiler.is_exporting():  # functional forms: a slice view's contiguity guards end != C
                for buf, new in ((k, key_states), (v, value_states)):
                    buf[row] = torch.slice_scatter(buf[row], new.to(buf.dtype), dim=2, start=self.past, end=self.end)
                idx = torch.arange(self.end, device=key_states.device)
                return (k[row].index_select(2, idx).to(key_states.dtype),
                        v[row].index_select(2, idx).to(value_states.dtype))
            k[row, :, :, self.past:self.end, :], v[row, :, :, self.past:self.end, :] = key_states, value_states
            return (k[row, :, :, :self.end, :].to(key_states.dtype),
                    v[row, :, :, :self.end, :].to(value_states.dtype))

        def get_seq_length(self, layer_idx: int = 0) -> Any:
            return self.past

    class KVCacheWrapper(torch.nn.Module):
        def __init__(self, model: Any, states: list[tuple[str, list[int], list[int]]]) -> None:
            super().__init__()
            self.model = model
            for name, shape, _ in states:
                self.register_buffer(name, torch.zeros(shape, dtype=torch.float16))
            self.where = _where(states)
            self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def forward(self, input_ids: Any, causal_mask: Any) -> Any:
            q, end = input_ids.shape[-1], causal_mask.shape[-1]
            slots = [(getattr(self, k), getattr(self, v), row) for k, v, row in self.where]  # read each call
            cache = SliceUpdateCache(slots, end - q, end)
            positions = torch.arange(end - q, end, device=input_ids.device).unsqueeze(0)
            dtype = next(self.model.parameters()).dtype
            out = self.model(input_ids=input_ids, attention_mask=causal_mask.to(dtype), position_ids=positions,
                             use_cache=True, **{self.cache_kw: cache})
            return _logits(out)

    class WindowWrapper(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any) -> Any:
            # Positions 0..C-1 from the input's values, not its (fixed) shape: the converter would fold
            # shape-derived ones into a stored C x C mask and rotary tables. An explicit mask also skips
            # transformers' packed-sequence check (torch.diff, which the converter lacks).
            pos = (input_ids * 0 + 1).cumsum(-1) - 1
            dtype = next(self.model.parameters()).dtype
            mask = (pos[:, None, :] > pos[:, :, None]).to(dtype)[:, None] * MASKED  # a later key: masked
            return _logits(self.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False))

    return SliceUpdateCache, KVCacheWrapper, WindowWrapper


def _where(states: list[tuple[str, list[int], list[int]]]) -> list[tuple[str, str, int]]:
    """Each model layer's (keys buffer, values buffer, row in them), from (key, value) pairs of states
    in plan.decoder's order."""
    keys, values = states[0::2], states[1::2]
    where = {layer: (k[0], v[0], row) for k, v in zip(keys, values) for row, layer in enumerate(k[2])}
    return [where[i] for i in range(len(where))]


def _logits(out: Any) -> Any:
    if isinstance(out, (tuple, list)):
        return out[0]
    return out if hasattr(out, "shape") else out.logits  # a module that returns the logits tensor itself


def causal_mask(past: int, q: int) -> Any:
    """(1, 1, q, past + q) additive mask: query i (at position past + i) sees keys 0..past + i."""
    import torch

    return torch.triu(torch.full((1, 1, q, past + q), float("-inf")), diagonal=past + 1)


def _layout(states: Any) -> list[tuple[str, list[int], list[int]]]:
    """(buffer name, shape, model layers it holds) for plan.decoder's states, keys then values of each
    pair (a state without `layers` holds every layer)."""
    return [(s.name, list(s.shape), list(s.layers) if s.layers is not None else list(range(s.shape[0])))
            for s in states]


def _window(states: Any) -> int:
    """The cache's length in tokens: axis 3 of every state."""
    return int(states[0].shape[3])


def wrap(model: Any, states: Any) -> Any:
    """The model with its KV cache as fp16 buffers laid out as `states` (zeros: an empty cache)."""
    return _classes()[1](model, _layout(states)).eval()


def window(model: Any) -> Any:
    """The model alone at a fixed window: input_ids in, every position's logits out, no cache."""
    return _classes()[2](model).eval()


def _eager(model: Any) -> Any:
    import torch

    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise BadModel("a decoder's Core ML conversion with its KV cache needs the eager transformers model",
                       hint="load the Hugging Face folder (or pass a module:function returning the model)")
    return model


def convert(source: Any, decoder: Any, os_major: int) -> tuple[Any, str]:
    """The Core ML program for plan.decoder: stateful (KV cache as state) or a fixed window; (model, route)."""
    ct = import_quietly("coremltools")
    import numpy as np
    import torch

    from compressadvise.backends.coremltools_coreml import deployment_target

    model, c = _eager(source), decoder.context_length
    target = deployment_target(os_major)
    try:
        with quiet(), torch.no_grad():
            if decoder.kind == "stateful_kv":
                example = (torch.zeros((1, TRACE_QUERY), dtype=torch.int32), causal_mask(0, TRACE_QUERY))
                traced = torch.jit.trace(wrap(model, decoder.states), example, check_trace=False)
                q, end = ct.RangeDim(1, c, default=1), ct.RangeDim(1, c, default=1)
                inputs = [ct.TensorType(name="input_ids", shape=(1, q), dtype=np.int32),
                          ct.TensorType(name="causal_mask", shape=(1, 1, q, end), dtype=np.float16)]
                states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(s.shape), dtype=np.float16), name=s.name)
                          for s in decoder.states]
                return ct.convert(traced, inputs=inputs, states=states, outputs=[ct.TensorType(name="logits")],
                                  minimum_deployment_target=target, convert_to="mlprogram"), \
                    f"torch.jit.trace of the KV-cache wrapper, {len(states)} Core ML states (query length 1..{c})"
            traced = torch.jit.trace(window(model), (torch.zeros((1, c), dtype=torch.int32),), check_trace=False)
            return ct.convert(traced, inputs=[ct.TensorType(name="input_ids", shape=(1, c), dtype=np.int32)],
                              outputs=[ct.TensorType(name="logits")], minimum_deployment_target=target,
                              convert_to="mlprogram"), f"torch.jit.trace at a fixed {c}-token window, no KV cache"
    except (BadModel, CompressionFailed):
        raise
    except Exception as e:
        raise CompressionFailed(f"Core ML conversion of the decoder ({decoder.kind}) failed: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


# ------------------------------------------------------------------ checks (Core ML cannot run here)
def check_wrapper(model: Any, states: list[Any], tokens: int = CHECK_TOKENS) -> dict[str, Any]:
    """The wrapper's logits, a prompt then one token a call, against the model's full-sequence logits."""
    import torch

    n = max(2, min(tokens, _window(states)))
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    ids = (torch.arange(n, dtype=torch.int64) * 7919 % vocab).unsqueeze(0)
    wrapper, first = wrap(model, states), n // 2
    with quiet(), torch.no_grad():
        full = _logits(model(input_ids=ids, use_cache=False)).float()
        steps = [wrapper(ids[:, :first], causal_mask(0, first))]
        steps += [wrapper(ids[:, i:i + 1], causal_mask(i, 1)) for i in range(first, n)]
    diff = float((torch.cat(steps, 1).float() - full).abs().max())
    scale = float(full.abs().max()) or 1.0
    return {"tokens": n, "prompt": first, "max_abs_diff": diff, "max_abs_logit": scale,
            "ok": diff <= CHECK_TOLERANCE * scale}


def export_program(model: Any, states: Any) -> Any:
    """The wrapper as a torch.export program: query length and tokens so far both 1..C, the cache as
    mutable buffers (each call of `.module()` writes them)."""
    import torch
    from torch.export import Dim

    c = _window(states)
    q, end = Dim("query", min=1, max=c), Dim("tokens", min=1, max=c)
    example = (torch.zeros((1, TRACE_QUERY), dtype=torch.int64), causal_mask(0, TRACE_QUERY))
    with quiet():
        return torch.export.export(wrap(model, states), example,
                                   dynamic_shapes={"input_ids": {1: q}, "causal_mask": {2: q, 3: end}})


def states_in(path: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(the saved package's states: name, shape, dtype; its read_state / write_state op counts),
    from the spec alone (no weights loaded, nothing run)."""
    ct = import_quietly("coremltools")
    from coremltools.proto import FeatureTypes_pb2

    with quiet():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    names = FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    states = [{"name": s.name, "shape": list(s.type.stateType.arrayType.shape),
               "dtype": names.Name(s.type.stateType.arrayType.dataType).lower()} for s in spec.description.state]
    counts = dict.fromkeys(STATE_OPS, 0)
    todo = [blk for f in spec.mlProgram.functions.values() for blk in f.block_specializations.values()]
    while todo:
        for op in todo.pop().operations:
            if op.type in counts:
                counts[op.type] += 1
            todo.extend(op.blocks)
    return states, counts


def _by_name(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(states, key=lambda d: d["name"])


def read_back(path: Path, decoder: Any, source: Any, compressed: Any, how: str) -> dict[str, Any]:
    """The manifest's decoder record: states found in the saved package against the plan's (a promised
    state missing fails), the wrapper's numerics on the weights that ship, and the torch program."""
    states, ops = states_in(path)
    want = [{"name": s.name, "shape": list(s.shape), "dtype": "float16"} for s in decoder.states]
    if decoder.kind == "stateful_kv" and (_by_name(states) != _by_name(want) or not all(ops.values())):
        got = ", ".join(f"{s['name']} {s['shape']} {s['dtype']}" for s in states) or "no state"
        raise CompressionFailed(f"Core ML read-back: the plan promised the KV cache as states "
                                f"{', '.join(s['name'] + ' ' + str(s['shape']) for s in want)} and {path.name} has {got} "
                                f"(state ops: {ops})", hint="rerun with --debug and report it")
    if decoder.kind == "fixed_context" and states:
        raise CompressionFailed(f"Core ML read-back: a fixed-context plan, and {path.name} has states "
                                f"{[s['name'] for s in states]}")
    record: dict[str, Any] = {"kind": decoder.kind, "context_length": decoder.context_length, "conversion": how,
                              "states": states, "state_ops": ops, "note": decoder.note}
    if decoder.kind == "stateful_kv":
        model = compressed if compressed is not None else source
        record["wrapper_check"] = check_wrapper(model, decoder.states)
        if not record["wrapper_check"]["ok"]:
            raise CompressionFailed(f"the KV-cache wrapper's cached logits are off the model's by "
                                    f"{record['wrapper_check']['max_abs_diff']:.3g}: the converted cache would be wrong")
        record["torch_program"] = _save_program(model, decoder.states, path.parent, compressed is not None)
    return record


def _save_program(model: Any, states: Any, folder: Path, compressed: bool) -> dict[str, Any]:
    """The torch.export program with the cache beside the .mlpackage; why not, when it fails."""
    import torch

    names = [s.name for s in states]
    try:
        ep = export_program(model, states)
        with quiet():
            torch.export.save(ep, str(folder / KV_PROGRAM))
    except Exception as e:
        return {"file": None, "note": f"torch.export of the KV-cache wrapper failed: {_first_line(e)}"}
    cache = [b for b in ep.graph_signature.buffers if b in names]
    weights = "the torch side's weights (the .mlpackage's, decompressed)" if compressed else "float weights"
    return {"file": KV_PROGRAM, "cache_buffers": cache,
            "note": f"torch.export program of the KV-cache wrapper with {weights}: input_ids (1, q) int64 and "
                    f"causal_mask (1, 1, q, tokens so far), both 1..{_window(states)}; each call writes "
                    f"{' / '.join(names)} in place (zeros on load: an empty cache)"}
