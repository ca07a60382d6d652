"""Budget search: the knapsack against brute force, then a searched plan on a model with a fragile
layer (fits, beats uniform configs, explained, a valid plan file, restricted by target and lessons)."""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from compressadvise.errors import BudgetMissed
from compressadvise.measure.executors import SerialExecutor
from compressadvise.knowledge.base import load_knowledge
from compressadvise.plan.planfile import load_plan, save_plan
from compressadvise.plan.search import (MultipleChoiceKnapsack, search, solve_mckp, solve_two_budgets)
from compressadvise.measure.sensitivity import (Cache, Setting, applicable, candidate_layers, measure, prepare,
                                        setting_bytes)

from test_sensitivity import fragile_mlp, fragile_samples

GRID = [
    Setting.of("palettization", nbits=8, granularity="per_tensor"),
    Setting.of("palettization", nbits=4, granularity="per_tensor"),
    Setting.of("palettization", nbits=2, granularity="per_tensor"),
    Setting.of("palettization", nbits=4, granularity="per_grouped_channel", group_size=8),
    Setting.of("linear_quantization", nbits=8, granularity="per_channel", mode="linear_symmetric"),
    Setting.of("linear_quantization", nbits=4, granularity="per_channel", mode="linear"),
]


def brute_force(costs, damages, cap):
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[j] for c, j in zip(costs, picks))
        if cost <= cap + 1e-9:
            dmg = sum(d[j] for d, j in zip(damages, picks))
            if best is None or dmg < best[0] - 1e-12:
                best = (dmg, list(picks))
    return best


def test_knapsack_known_optimum():
    # Hand-made: greedy by damage-per-byte takes layer B's cheap option first and misses this.
    costs = [[8, 4, 2], [8, 5, 1], [8, 3]]
    damages = [[0.0, 1.0, 5.0], [0.0, 2.0, 9.0], [0.0, 6.0]]
    ch = solve_mckp(costs, damages, 12)
    assert ch.picks == [1, 1, 1] and ch.damage == pytest.approx(9.0) and ch.cost == 12
    assert solve_mckp(costs, damages, 24).picks == [0, 0, 0]
    assert solve_mckp(costs, damages, 5) is None  # the smallest plan costs 6
    rng = random.Random(0)
    for _ in range(40):
        groups = rng.randint(2, 5)
        costs = [[rng.randint(1, 30) for _ in range(rng.randint(1, 4))] for _ in range(groups)]
        damages = [[round(rng.random() * 10, 3) for _ in c] for c in costs]
        cap = rng.randint(groups, sum(max(c) for c in costs))
        expect = brute_force(costs, damages, cap)
        got = solve_mckp(costs, damages, cap)
        if expect is None:
            assert got is None
        else:  # integer costs: the grid is exact
            assert got.damage == pytest.approx(expect[0]) and got.cost <= cap


def test_knapsack_real_valued_costs_always_fit():
    rng = random.Random(1)
    for _ in range(30):
        costs = [[rng.uniform(100, 5000) for _ in range(4)] for _ in range(5)]
        damages = [[rng.random() for _ in c] for c in costs]
        cap = rng.uniform(sum(min(c) for c in costs), sum(max(c) for c in costs))
        got = solve_mckp(costs, damages, cap, buckets=512)
        slack = 5 * (cap - sum(min(c) for c in costs)) / 512  # at most one grid cell lost per group
        looser = brute_force(costs, damages, cap - slack)
        assert got is not None and got.cost <= cap + 1e-6
        if looser is not None:
            assert got.damage <= looser[0] + 1e-9


def test_two_budgets_and_frontier():
    costs = [[10, 5, 2], [10, 5, 2]]
    lat = [[3.0, 1.0, 2.5], [3.0, 1.0, 2.5]]
    damages = [[0, 1, 3], [0, 2, 4]]
    only_size = solve_mckp(costs, damages, 7)
    assert only_size.picks == [0, 2] or only_size.picks == [2, 0] or sum(c[j] for c, j in zip(costs, only_size.picks)) <= 7
    both = solve_two_budgets(costs, lat, damages, 12, 2.5)
    assert both is not None
    assert sum(c[j] for c, j in zip(costs, both.picks)) <= 12
    assert sum(x[j] for x, j in zip(lat, both.picks)) <= 2.5
    assert both.picks == [1, 1]
    front = MultipleChoiceKnapsack(costs, damages, 20).frontier(8)
    assert [c.cost for c in front] == sorted(c.cost for c in front)
    assert all(a.damage > b.damage for a, b in zip(front, front[1:]))
    assert front[-1].damage == 0


@pytest.fixture(scope="module")
def prep():
    return prepare(fragile_mlp(), fragile_samples())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sens-cache")


def test_search_fits_beats_uniform_and_explains(prep, cache_dir, tmp_path):
    budget = 0.3  # of the fp16 size
    res = search(prepared=prep, size_fraction=budget, settings=GRID, lessons="advise",
                 cache=Cache(cache_dir), executor=SerialExecutor(), confirm=3, measure_all=True)
    fp16 = prep.report.total_params * 2
    assert res.plan.prediction.bytes_after <= budget * fp16
    assert res.plan.prediction.meets_size_budget is True
    assert res.chosen.fits and res.chosen.estimate["bytes"] <= budget * fp16
    assert 1 <= res.evaluations["full_model"] <= 3
    choice = {c.layer: c for c in res.layers}
    # the fragile layer is kept at fp16 or palettized (per-channel scales destroy it)
    assert "linear_quantization" not in choice["fc2"].setting
    assert choice["fc2"].vs_median > 10 and "more sensitive than the median layer" in choice["fc2"].why
    # measuring only what the budget can choose finds the same: its prediction already ranks the
    # per-channel scales as destructive, so they are never chosen, nor measured
    fast = search(prepared=prep, size_fraction=budget, settings=GRID, lessons="advise", cache=Cache(enabled=False),
                  executor=SerialExecutor(), confirm=3)
    assert "linear_quantization" not in {c.layer: c for c in fast.layers}["fc2"].setting
    assert fast.chosen.fits and fast.chosen.measured["psnr_db"] >= res.chosen.measured["psnr_db"] - 0.5
    # measured fidelity is at least that of every uniform config (same samples) fitting the budget
    k = load_knowledge()
    layers = candidate_layers(prep.report)
    fixed = fp16 - sum(setting_bytes(k, x, Setting("fp16", ()), 2.0) for x in layers)
    uniform = []
    for s in GRID:  # layers a setting cannot apply to (indivisible dims) stay fp16, as the backend does
        assign = {x.name: s for x in layers if applicable(k, x, [s], 2.0)}
        size = fixed + sum(setting_bytes(k, x, assign.get(x.name, Setting("fp16", ())), 2.0) for x in layers)
        if size <= budget * fp16:
            uniform.append(assign)
    assert uniform, "the test budget should admit some uniform configs"
    results, _, _ = measure(prep, uniform, cache=Cache(cache_dir), executor=SerialExecutor(), proxies=False)
    assert res.chosen.measured["psnr_db"] >= max(r["metrics"]["psnr_db"] for r in results)
    # a normal plan file: per-layer overrides, explained trace, round trip
    assert all(s.params["weight_threshold"] == 0 for s in res.plan.steps)
    planned = {n for s in res.plan.steps for n in s.layers}
    assert planned == {c.layer for c in res.layers if c.setting != "fp16 (unchanged)"}
    assert sum(1 for e in res.plan.trace if e.code == "SEARCH" and e.layers) == len(layers)
    path = save_plan(res.plan, tmp_path / "plan.yaml")
    assert load_plan(path) == res.plan
    # frontier: sizes ascending, predicted PSNR ascending, labelled estimates
    sizes = [p.bytes for p in res.frontier_size]
    assert sizes == sorted(sizes) and len(sizes) >= 3
    assert res.frontier_latency and all(p.latency_ms > 0 for p in res.frontier_latency)
    # a rerun comes from the cache
    again = search(prepared=prep, size_fraction=budget, settings=GRID, lessons="advise",
                   cache=Cache(cache_dir), executor=SerialExecutor(), confirm=3, measure_all=True)
    assert again.evaluations["single_layer"] == 0 and again.evaluations["full_model_run_now"] == 0
    assert again.chosen.assignment == res.chosen.assignment


def test_lessons_and_target_restrict_candidates(prep, cache_dir, tmp_path):
    pb = tmp_path / "keep.yaml"
    pb.write_text("""playbook: testkeep
title: keep the head
version: 1
description: test
rules:
  - code: TKP001
    title: keep the head
    scope: layer
    when: 'layer.is_last'
    action: {kind: keep}
    priority: 99
    why: heads are special in this test
    rationale: x
    citation: [{source: test}]
""")
    k = load_knowledge([pb])
    res = search(prepared=prep, size_fraction=0.4, settings=GRID, knowledge=k, lessons="apply", target="ane-a17",
                 os=16, cache=Cache(cache_dir), executor=SerialExecutor(), confirm=1)
    choice = {c.layer: c for c in res.layers}
    assert choice["head"].setting == "fp16 (unchanged)" and "TKP001" in choice["head"].restricted_by
    assert any(e.code == "TKP001" and e.layers == ["head"] for e in res.plan.trace)
    # iOS 16: no grouped LUTs and no int4 on the Neural Engine
    assert not any("gs=" in c.setting or c.setting.startswith("4-bit linear") for c in res.layers)
    assert res.plan.target.os == 16
    with pytest.raises(BudgetMissed):
        search(prepared=prep, size_fraction=0.05, settings=GRID, cache=Cache(cache_dir),
               executor=SerialExecutor(), confirm=1)


def test_cli_search(tmp_path, cache_dir):
    import numpy as np

    np.savez(tmp_path / "s.npz", inputs=fragile_samples().inputs[0].numpy())
    env = {**os.environ, "COLUMNS": "60", "NO_COLOR": "1",  # a pipe ignores it
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    exe = [sys.executable, "-c", "from compressadvise.ui.cli import main; main()"]
    args = ["search", "test_sensitivity:fragile_mlp", "--samples", str(tmp_path / "s.npz"), "--size-fraction", "0.3",
            "--techniques", "palettization:nbits=8|4|2,granularity=per_tensor", "--workers", "1", "--confirm", "2",
            "--lessons", "advise", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "plan.yaml")]
    r = subprocess.run([*exe, *args, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["chosen"]["fits"] and data["plan"]["prediction"]["label"] == "estimate"
    assert load_plan(tmp_path / "plan.yaml").steps[0].technique == "palettization"
    r = subprocess.run([*exe, *args, "--force"], capture_output=True, text=True, env=env, timeout=300)  # --out exists now
    assert r.returncode == 0, r.stderr
    assert "Pareto frontier" in r.stdout and "<- chosen" in r.stdout and "0 single-layer evaluation(s) run" in r.stdout
    assert "…" not in r.stdout  # piped: every cell in full (the frontier's settings, layer names)
