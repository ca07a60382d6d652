"""A decoder's Core ML deployment with its KV cache (issue 19 item 2), on a tiny Llama built here.

The torch wrapper's numerics are checked (Core ML cannot run on Linux); the converted packages'
structure is read back: the two fp16 states and the state ops for iOS 18, none for iOS 17.
"""
from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("coremltools")

from compressadvise.backends import export_decoder as D  # noqa: E402
from compressadvise.errors import CompressionFailed  # noqa: E402
from compressadvise.knowledge.base import builtin  # noqa: E402
from compressadvise.knowledge.deployment import Deployment  # noqa: E402

CONTEXT = 64  # the tiny model's position limit: recommend's default context


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 2.5M-parameter Llama (GQA: 4 query heads, 2 KV heads; untied head) saved as a HF folder."""
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("decoder") / "llama"
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    from compressadvise.model.loading import load_model

    return load_model(folder)


@pytest.fixture(scope="module")
def plans(model):
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend

    report = analyze(model)
    return {os: recommend(report, target="ane-a17", os=os) for os in (17, 18)}


def test_the_choice_is_the_targets_data(plans):
    k = builtin()
    for name in ("ane-a14", "ane-a17", "mac-gpu", "apple-cpu"):
        t = k.target(name)
        assert t.mode("stateful").runtime and Deployment(t, 17).behaviour("stateful") == "unsupported"
        assert Deployment(t, 18).behaviour("stateful") == "accelerated"
    s, f = plans[18].decoder, plans[17].decoder
    assert s.kind == "stateful_kv" and s.context_length == CONTEXT
    assert [(x.name, x.shape) for x in s.states] == [("key_cache", [2, 1, 2, CONTEXT, 32]),
                                                     ("value_cache", [2, 1, 2, CONTEXT, 32])]
    assert f.kind == "fixed_context" and not f.states and "recomputes the whole window" in f.note
    # weights: untied head 8192 x 128 + 2 layers x (q, o 128x128; k, v 64x128; 3 MLP 128x384)
    w = 8192 * 128 + 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 128 * 384)
    assert f.macs_per_token_cached == w + 2 * 2 * 128 * CONTEXT
    assert f.macs_per_token_fixed == CONTEXT * w + 2 * 2 * 128 * CONTEXT ** 2 and "estimate" in f.note


def test_no_decoder_form_off_core_ml(model):
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend

    assert recommend(analyze(model, stats=False), target="x86-cpu").decoder is None


def _states():
    """The tiny Llama's cache as plan.decoder lays it out: keys and values, (2, 1, 2, C, 32) each."""
    from compressadvise.knowledge.schema import DecoderState

    return [DecoderState(name=n, shape=[2, 1, 2, CONTEXT, 32]) for n in ("key_cache", "value_cache")]


def test_wrapper_cached_logits_equal_the_full_sequence(model):
    shape = _states()
    check = D.check_wrapper(model.module, shape, tokens=12)
    assert check["ok"] and check["max_abs_diff"] < 5e-3 * check["max_abs_logit"], check
    ids = torch.arange(6).unsqueeze(0) * 31 % 8192
    with torch.no_grad():
        full = model.module(input_ids=ids, use_cache=False)[0]
        w = D.wrap(model.module, shape)
        w(ids[:, :3], D.causal_mask(0, 3))
        wrong = w(ids[:, 3:4], D.causal_mask(0, 1))  # a mask that forgets the cache: position 0 again
    assert (wrong - full[:, 3:4]).abs().max() > 1e-2  # the check above can fail


def test_torch_export_program_with_the_cache(model):
    ep = D.export_program(model.module, _states())
    mutated = set(ep.run_decompositions({}).graph_signature.buffers_to_mutate.values())
    assert mutated == {"key_cache", "value_cache"}
    ids = torch.arange(CONTEXT).unsqueeze(0) * 17 % 8192
    run = ep.module()
    with torch.no_grad():
        full = model.module(input_ids=ids, use_cache=False)[0]
        steps = [run(ids[:, :CONTEXT - 2], D.causal_mask(0, CONTEXT - 2))]  # the window filled to its end
        steps += [run(ids[:, i:i + 1], D.causal_mask(i, 1)) for i in (CONTEXT - 2, CONTEXT - 1)]
    assert (torch.cat(steps, 1) - full).abs().max() < 5e-3 * full.abs().max()


def _save(mlmodel, path):
    from compressadvise.backends import coremltools_coreml as C

    C.save(mlmodel, path)
    return path


def test_ios18_package_holds_the_two_states(model, plans, tmp_path):
    from compressadvise.backends import coremltools_coreml as C

    decoder = plans[18].decoder
    mlmodel, how = D.convert(model.module, decoder, 18)
    path = _save(mlmodel, tmp_path / "s.mlpackage")
    states, ops = D.states_in(path)
    assert states == [{"name": n, "shape": [2, 1, 2, CONTEXT, 32], "dtype": "float16"}
                      for n in ("key_cache", "value_cache")] and "2 Core ML states" in how
    assert ops["read_state"] >= 2 and ops["write_state"] >= 4  # keys + values written per layer
    kinds = {op.op_type for op in C._ops(C.load_program(path))}
    assert {"read_state", "coreml_update_state", "slice_update"} <= kinds
    spec = mlmodel.get_spec()
    ids = next(i for i in spec.description.input if i.name == "input_ids").type.multiArrayType
    assert ids.shapeRange.sizeRanges[1].lowerBound == 1 and ids.shapeRange.sizeRanges[1].upperBound == CONTEXT


def test_ios17_package_is_a_fixed_window_without_state(model, plans, tmp_path):
    decoder = plans[17].decoder
    ids = torch.arange(CONTEXT).unsqueeze(0) * 13 % 8192
    with torch.no_grad():  # the window's own mask and positions (from the input's values) are the model's
        window = D.window(model.module)(ids)
        full = model.module(input_ids=ids, use_cache=False)[0]
    assert (window - full).abs().max() < 1e-4 * full.abs().max()
    mlmodel, how = D.convert(model.module, decoder, 17)
    path = _save(mlmodel, tmp_path / "f.mlpackage")
    states, ops = D.states_in(path)
    assert states == [] and ops == {"read_state": 0, "write_state": 0} and "no KV cache" in how
    ids = next(i for i in mlmodel.get_spec().description.input if i.name == "input_ids").type.multiArrayType
    assert list(ids.shape) == [1, CONTEXT]
    record = D.read_back(path, decoder, model.module, None, how)
    assert record["kind"] == "fixed_context" and "recomputes" in record["note"]
    with pytest.raises(CompressionFailed, match="promised the KV cache as states"):
        D.read_back(path, plans[18].decoder, model.module, None, how)  # a stateful plan, no state: loud


def test_recommend_then_apply_builds_a_compressed_stateful_package(model, plans, tmp_path):
    from compressadvise.backends.apply import apply

    plan = plans[18]
    assert [s.technique for s in plan.steps] == ["palettization"]
    result = apply(model, plan, tmp_path / "out")
    m = result.manifest
    dec = m["coreml"]["decoder"]
    assert dec["kind"] == "stateful_kv" and [s["name"] for s in dec["states"]] == ["key_cache", "value_cache"]
    assert dec["wrapper_check"]["ok"] and dec["torch_program"]["file"] == D.KV_PROGRAM
    assert dec["torch_program"]["cache_buffers"] == ["key_cache", "value_cache"]
    assert (result.out_dir / D.KV_PROGRAM).is_file()
    assert m["coreml"]["op_counts"].get("constexpr_lut_to_dense", 0) >= 16  # every planned layer palettized
    done = [e for x in m["layers"] for e in x["steps"] if e.get("coreml", {}).get("status") == "applied"]
    assert len(done) == 16 and all("constexpr_lut_to_dense" in e["coreml"]["evidence"] for e in done), done[:1]
    assert m["planned_vs_built"]["layers_built"] == m["planned_vs_built"]["layers_planned"]
    assert json.loads((result.out_dir / "manifest.json").read_text())["coreml"]["decoder"]["states"] == dec["states"]
