"""The unchanged prefix runs once per layer (issue 23, items 1-2): suffix-only passes give the same
results as full passes, and the cost is counted in forward-pass equivalents."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from compressadvise.measure.executors import make_executor
from compressadvise.measure.sensitivity import Setting, measure, prepare
from compressadvise.measure.sensitivity_suffix import SuffixRunner
from compressadvise.model.samples import Samples


def randn(*shape: int) -> Samples:
    return Samples([torch.randn(*shape, generator=torch.Generator().manual_seed(0))], source="test", kind="file")


class Residual(nn.Module):
    """A branch and a skip: the frontier of `body.1` holds the skip value as well as its input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.body(h)
        return self.head(h.flatten(1))


def settings(prep) -> list[dict[str, Setting]]:
    pal = [Setting.of("palettization", nbits=b, granularity="per_tensor") for b in (2, 4)]
    return [{layer: s} for layer in prep.weights for s in pal]


@pytest.fixture(scope="module")
def prep():
    model = Residual().eval()
    return prepare(model, randn(16, 3, 8, 8), max_samples=16)


def test_suffix_passes_equal_full_passes(prep):
    items = settings(prep)
    ctx_fast, ctx_full = prep.context(proxies=False), prep.context(proxies=False)
    ctx_full.suffix = False
    from compressadvise.measure.sensitivity_eval import evaluate

    for item in items:
        raw = {"assign": {k: v.to_dict() for k, v in item.items()}}
        fast, full = evaluate(ctx_fast, raw), evaluate(ctx_full, raw)
        assert fast["cost"]["suffix"] == 1.0 and full["cost"]["suffix"] == 0.0
        for key, value in full["metrics"].items():
            assert fast["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (item, key)


def test_the_suffix_of_a_layer_is_what_depends_on_it(prep):
    runner = SuffixRunner(prep.model, prep.context(proxies=False).macs)
    body = runner.suffix("body.2.weight")
    names = {str(n.target) for n in body.nodes if n.op == "call_module"}
    assert names == {"body.2", "head"}  # not the stem, not the first body conv
    assert {n.name for n in body.frontier} >= {"relu"}  # the skip value feeds the add after the branch
    assert 0 < body.share < runner.suffix("stem.weight").share == 1.0


def test_cost_counts_one_prefix_per_layer_and_suffix_shares(prep):
    items = settings(prep)
    results, ran, _ = measure(prep, items, executor=make_executor("serial"), proxies=False)
    passes = sum(r["cost"]["passes"] for r in results)
    layers = len(prep.weights)
    assert ran == len(items) == 2 * layers
    # each layer: one full pass for its prefix, then each setting a share of a pass (< 1 but for the stem)
    assert layers < passes < layers + len(items)
    assert all(r["cost"]["suffix"] == 1.0 for r in results)


def test_an_untraceable_model_runs_full_passes():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.fc(x)
            return -self.fc(x)

    prep = prepare(Branchy().eval(), randn(8, 64), max_samples=8)
    (r,), _, _ = measure(prep, [{"fc": Setting.of("palettization", nbits=4, granularity="per_tensor")}],
                         executor=make_executor("serial"), proxies=False)
    assert r["cost"] == {"passes": 1.0, "suffix": 0.0}


def test_a_frontier_over_the_memory_bound_falls_back(prep):
    runner = SuffixRunner(prep.model, max_bytes=16)
    batches = [tuple(t[:4] for t in prep.samples.inputs)]
    assert runner.prefix("head.weight", batches) is False
    with pytest.raises(LookupError):
        runner.run_suffix("head.weight")
