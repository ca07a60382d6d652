"""The Python API as a user meets it (issue 21, item 6): typed lazy exports, one way to pass
budgets, our own errors for wrong arguments, and short displays of results."""
from __future__ import annotations

import ast
import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import compressadvise as ca
from compressadvise.errors import EXIT_CODES, BadArgument, CompressAdviseError, InvalidKnowledge

INIT = Path(ca.__file__)


def _type_checking_imports() -> dict[str, str]:
    """name -> module of every import under `if TYPE_CHECKING:` in compressadvise/__init__.py."""
    tree = ast.parse(INIT.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    return {a.name: node.module for node in block.body if isinstance(node, ast.ImportFrom) for a in node.names}


# ------------------------------------------------------------------ exports
def test_dir_lists_the_api_not_typing_helpers():
    names = dir(ca)
    assert set(ca.__all__) <= set(names)
    for name in ("recommend", "search", "verify", "apply", "sensitivity", "Plan", "VerifyResult", "BadArgument"):
        assert name in names
    assert not {"Any", "TYPE_CHECKING", "annotations", "ModuleType"} & set(names)


def test_type_checkers_see_every_lazy_name_where_it_lives():
    """The TYPE_CHECKING imports (what IDEs and mypy read) and the lazy table (what runs) name
    the same objects, and each import target exists."""
    seen = _type_checking_imports()
    assert set(seen) == set(ca._LAZY)
    for name, module in seen.items():
        assert module == f"compressadvise.{ca._LAZY[name]}", name
        assert getattr(importlib.import_module(module), name) is getattr(ca, name), name
    eager = set(ca._ERRORS) | {"__version__"}
    assert set(ca.__all__) == set(seen) | eager
    assert all(issubclass(getattr(ca, n), CompressAdviseError) for n in ca._ERRORS)
    assert (INIT.parent / "py.typed").is_file()


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="recomend"):
        ca.recomend  # noqa: B018


def test_a_patched_module_function_is_what_the_package_calls(monkeypatch):
    """Names are not cached in the package: after `ca.verify` has been used once, patching
    `compressadvise.measure.verify.verify` still reaches `ca.verify` (tests/test_packaging.py)."""
    from compressadvise.measure import verify as mod

    assert ca.verify is mod.verify
    monkeypatch.setattr(mod, "verify", lambda *a, **kw: "patched")
    assert ca.verify() == "patched"


def test_import_and_dir_stay_cheap():
    code = ("import sys, compressadvise as ca; dir(ca); ca.BadArgument\n"
            "print([m for m in ('torch', 'torchao', 'coremltools', 'pydantic', 'rich') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ------------------------------------------------------------------ budgets
@pytest.fixture(scope="module")
def report():
    # the bundled example's weights file: weight-only, so no torch.export import (seconds) to fold BatchNorms
    return ca.analyze(INIT.parent / "examples" / "data" / "digits_cnn.safetensors")


@pytest.fixture(scope="module")
def plan(report):
    return ca.recommend(report, target="ane-a17", max_size_mb=0.05)


def test_budget_keywords_plan_like_constraints(report, plan):
    assert plan.model_dump() == ca.recommend(report, target="ane-a17", constraints={"max_size_mb": 0.05}).model_dump()
    quarter = ca.recommend(report, size_fraction=0.25, max_accuracy_drop=1, data="calibration")
    # a fraction of the fp16 size, as `compressadvise recommend --size-fraction` reads it
    assert math.isclose(quarter.constraints.max_size_mb, 0.25 * report.total_bytes_fp16 / 1e6)
    assert (quarter.constraints.max_accuracy_drop, quarter.constraints.data) == (1.0, "calibration")
    bits = ca.recommend(report, bits_per_weight=4, constraints={"max_latency_ms": 3})
    assert math.isclose(bits.constraints.max_size_mb, 4 * report.total_params / 8 / 1e6)
    assert bits.constraints.max_latency_ms == 3.0


@pytest.mark.parametrize("kwargs,message", [
    ({"constraints": {"max_sise_mb": 2}},
     r"constraints: unknown key 'max_sise_mb' \(did you mean 'max_size_mb'\? valid: data, max_accuracy_drop, "),
    ({"constraints": {"max_size_mb": "x"}}, r"constraints: 'max_size_mb': .*number .*\(got 'x'\)"),
    ({"constraints": 3}, "constraints must be a dict or a Constraints, not int"),
    ({"max_size_mb": -1}, r"max_size_mb must be a finite number > 0 \(got -1\)"),
    ({"max_size_mb": float("nan")}, "max_size_mb must be a finite number > 0"),
    ({"max_size_mb": "2"}, "max_size_mb must be a number, not '2'"),
    ({"max_latency_ms": True}, "max_latency_ms must be a number"),
    ({"size_fraction": 2}, r"size_fraction must be in \(0, 1\]"),
    ({"bits_per_weight": 40}, r"bits_per_weight must be in \(0, 32\]"),
    ({"max_accuracy_drop": -0.5}, "max_accuracy_drop must be a finite number >= 0"),
    ({"data": "lots"}, "data must be one of 'none', 'calibration', 'training'"),
    ({"max_size_mb": 1, "size_fraction": 0.5}, "give one size budget, not max_size_mb and size_fraction"),
    ({"constraints": {"max_size_mb": 1}, "max_size_mb": 2}, "max_size_mb given twice"),
])
def test_a_wrong_budget_is_one_line_of_our_own_before_any_work(kwargs, message):
    # model=None would load the bundled example: the error comes first, so nothing is loaded
    with pytest.raises(BadArgument, match=message) as e:
        ca.recommend(None, **kwargs)
    err = e.value
    assert isinstance(err, ValueError) and not isinstance(err, ValidationError)
    assert err.exit_code == 2 and 2 in EXIT_CODES and "\n" not in str(err)


@pytest.mark.parametrize("kwargs,message", [
    ({}, "search needs a budget"),
    ({"max_accuracy_drop": 1}, "search needs a budget"),
    ({"max_size_mb": 1, "bits_per_weight": 4}, "give one size budget"),
    ({"constraints": {"max_sise_mb": 1}}, "unknown key 'max_sise_mb'"),
    ({"budget": "a Budget", "size_fraction": 0.5}, "give budget= or size_fraction=, not both"),
])
def test_search_takes_the_same_budgets_and_refuses_the_same_way(kwargs, message):
    if "budget" in kwargs:
        kwargs = {**kwargs, "budget": ca.Budget(max_bytes=1e6)}
    with pytest.raises(BadArgument, match=message):
        ca.search(None, **kwargs)  # refused before the model or the samples are loaded


def test_an_unknown_target_keeps_its_hint_in_the_traceback(report):
    with pytest.raises(InvalidKnowledge, match="unknown target 'nope'") as e:
        ca.recommend(report, target="nope")
    assert any("ane-a17" in note for note in getattr(e.value, "__notes__", []))


# ------------------------------------------------------------------ displays
def _verify_result(output_name: str = "output"):
    return ca.VerifyResult.model_validate({
        "original": {"source": "bundled:digits-cnn", "format": "bundled", "size_bytes": 297280},
        "compressed": {"source": "out/model.pt2", "format": "exported", "size_bytes": 72146},
        "samples": {"source": "bundled", "kind": "bundled", "count": 360, "input_shapes": [[360, 1, 8, 8]],
                    "has_labels": True, "has_slices": False},
        "fidelity": [{"name": output_name, "shape": [360, 10], "kind": "logits", "kind_source": "auto",
                      "metrics": {"top1_agreement": 1.0, "snr_db": 46.2, "kl_divergence": 1e-5}}],
        "accuracy": [{"name": "top-1 accuracy", "original": 99.2, "compressed": 98.9, "delta": -0.3, "unit": "%"}],
        "budgets": [{"name": "size", "limit": 0.05, "value": 0.072, "unit": " MB", "basis": "measured", "passed": False}],
        "passed": False, "warnings": ["random inputs"]})


def _sensitivity_report():
    return ca.SensitivityReport.model_validate({
        "source": "FragileMLP", "model_sha256": "", "samples": "test samples", "samples_used": 48,
        "samples_hash": "", "output_dim": 8, "logits": True, "reference": {}, "peak": 1.0,
        "baseline_bytes_per_param": 2.0, "layers": ["fc1", "fc2"], "settings": ["a", "b", "c"],
        "measurements": [], "proxies": [], "evaluations": 6, "cache_hits": 0, "cache_dir": None,
        "executor": "serial", "workers": 1, "wall_s": 1.25,
        "ranking": [{"layer": "fc2", "type": "linear", "params": 10, "score": 2.0, "vs_median": 160.0, "rank": 1},
                    {"layer": "fc1", "type": "linear", "params": 10, "score": 1.0, "vs_median": 1.0, "rank": 2}]})


def _search_result(plan):
    chosen = {"name": "mse", "objective": "least output MSE", "assignment": {"fc1": "4-bit"}, "settings": {},
              "estimate": {"bytes": 7890.0}, "measured": {"psnr_db": 32.4, "top1_agreement": 0.96, "kl": 1e-6},
              "fits": True}
    return ca.SearchResult.model_validate({
        "plan": plan, "budget": {"max_bytes": 8000.0, "basis": "0.4 of the fp16 size"}, "chosen": chosen,
        "candidates": [chosen], "frontier_size": [], "frontier_latency": [],
        "layers": [{"layer": "fc1", "setting": "4-bit", "bytes": 100, "vs_median": 1.0, "noise_share": 1.0,
                    "why": "cheap"},
                   {"layer": "head", "setting": "fp16 (unchanged)", "bytes": 200, "vs_median": 3.0,
                    "noise_share": 0.0, "why": "sensitive"}],
        "reference": {}, "evaluations": {"single_layer": 5, "single_layer_cached": 2}, "sensitivity_wall_s": 1.0,
        "wall_s": 2.5, "lessons": "apply"})


def _apply_result(tmp: Path):
    manifest = {"sizes": {"plan_estimate_bytes": {"value": 61076}, "weight_file_bytes": {"value": 61908}},
                "planned_vs_built": {"layers_built": 2, "layers_planned": 2, "size": "within tolerance"}}
    return ca.ApplyResult(tmp, tmp / "model.pt2", None, manifest, seconds=12.3)


@pytest.fixture(scope="module")
def results(report, plan, tmp_path_factory):
    return {"ModelReport": report, "Plan": plan, "VerifyResult": _verify_result(),
            "SensitivityReport": _sensitivity_report(), "SearchResult": _search_result(plan),
            "ApplyResult": _apply_result(tmp_path_factory.mktemp("applied"))}


def test_reprs_are_one_short_line_of_key_figures(results):
    expect = {"ModelReport": "total_params=73,930", "Plan": "steps=palettization", "VerifyResult": "verdict=missed size",
              "SensitivityReport": "most sensitive=fc2", "SearchResult": "fits=yes",
              "ApplyResult": "built=2 of 2 planned layers"}
    for name, obj in results.items():
        text = repr(obj)
        assert text.startswith(f"{name}(") and len(text) < 200 and "\n" not in text, text
        assert expect[name] in text, text
    assert "1 of 2 compressed" in results["SearchResult"]._repr_html_()
    # every ResultModel, nested ones too, has the short form (a VerifyResult's repr was 4,167 characters)
    assert len(repr(results["VerifyResult"].budgets[0])) < 200
    assert "shape=360x10" in repr(results["VerifyResult"].fidelity[0])
    assert repr(ca.VerifyResult.model_construct()) == "<VerifyResult object>"  # a half-built one: no exception


def test_html_is_escaped(results):
    odd = "<script>alert('x')</script> & [red]"
    hostile = {"ModelReport": results["ModelReport"].model_copy(update={"source": odd}),
               "VerifyResult": _verify_result(output_name=odd)}
    for obj in hostile.values():
        page = obj._repr_html_()
        assert page.startswith("<table>") and "<script>" not in page
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp;" in page
    for obj in results.values():
        assert obj._repr_html_().count("<tr>") >= 2


def test_rich_renders_the_summary_without_reading_markup(results):
    from rich.console import Console

    for name, obj in results.items():
        console = Console(record=True, width=120)
        console.print(obj)
        text = console.export_text()
        assert name in text and len(text.splitlines()) >= 3, text
    console = Console(record=True, width=120)
    console.print(_verify_result(output_name="[red]logits[/red]"))
    assert "[red]logits[/red]" in console.export_text()  # a name is text, not markup
