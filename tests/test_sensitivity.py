"""Per-layer sensitivity: a deliberately fragile layer ranks first, the cache, resume after an
interruption, and identical results from the in-process, process-pool and Ray executors."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressadvise.errors import CompressionFailed, InvalidKnowledge
from compressadvise.measure.executors import ProcessExecutor, SerialExecutor, make_executor
from compressadvise.knowledge.base import builtin
from compressadvise.measure.sensitivity import (Cache, Setting, compress_weight, default_grid, parse_settings,
                                        prepare, sensitivity, spearman)

GRID = [
    Setting.of("palettization", nbits=4, granularity="per_tensor"),
    Setting.of("palettization", nbits=2, granularity="per_tensor"),
    Setting.of("linear_quantization", nbits=8, granularity="per_channel", mode="linear_symmetric"),
    Setting.of("linear_quantization", nbits=4, granularity="per_channel", mode="linear_symmetric"),
]


class FragileMLP(nn.Module):
    """fc2 is fragile: a few huge weights sit on inputs that are always zero (dead units of fc1).

    They never change the output, but they stretch every per-channel quantization scale, so the
    useful small weights round to zero. The layer looks harmless in weight space (the outliers
    dominate its norm) and is by far the most damaging in output space.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        return self.head(torch.relu(self.fc3(h)))


def fragile_mlp() -> FragileMLP:
    torch.manual_seed(0)
    m = FragileMLP()
    with torch.no_grad():
        m.fc1.weight[56:] = 0.0
        m.fc1.bias[56:] = -1.0  # units 56..63 are dead: relu(-1) = 0 for every input
        m.fc2.weight[:, 56:] = 50.0 * torch.sign(torch.randn(64, 8))
    return m.eval()


def fragile_samples(n: int = 96, seed: int = 1):
    from compressadvise.model.samples import Samples

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    with torch.no_grad():
        y = fragile_mlp()(x).argmax(-1)
    return Samples([x], y, source="test samples")


@pytest.fixture(scope="module")
def prep():
    return prepare(fragile_mlp(), fragile_samples())


def metrics_of(rep):
    return {(m.layer, m.setting): m.metrics for m in rep.measurements}


def test_fragile_layer_ranks_first(prep, tmp_path):
    rep = sensitivity(prepared=prep, settings=GRID, cache=Cache(tmp_path), executor=SerialExecutor())
    assert [r.layer for r in rep.ranking][0] == "fc2"
    assert rep.ranking[0].vs_median > 10
    assert len(rep.measurements) == 4 * len(GRID) and rep.evaluations == 16
    by = metrics_of(rep)
    int8 = GRID[2].key
    # measured: int8 per channel costs fc2 far more output fidelity than any other layer
    assert by[("fc2", int8)]["psnr_db"] + 15 < min(by[(x, int8)]["psnr_db"] for x in ("fc1", "fc3", "head"))
    assert all(0 <= m["top1_agreement"] <= 1 and m["output_mse"] >= 0 for m in by.values())
    assert rep.reference["accuracy"] == 100.0  # labels are the model's own predictions
    proxies = {q.proxy: q for q in rep.proxies}
    # The output-Hessian proxy sees the damage; relative weight error is fooled by the outliers.
    assert proxies["hessian_output"].top1_match is True
    assert proxies["weight_rel_error"].top1_match is False
    assert proxies["hessian_output"].layer_rank_spearman > proxies["weight_rel_error"].layer_rank_spearman
    assert "fisher_labels" in proxies
    # sizes come from the technique formulas: 4-bit LUT on 64x64 = 2048 B + 16 fp16 entries + bias
    m = next(x for x in rep.measurements if x.layer == "fc2" and x.setting == GRID[0].key)
    assert m.bytes == 4096 // 2 + 16 * 2 + 64 * 2


def test_cache_hit_miss_and_keys(prep, tmp_path):
    cache = Cache(tmp_path)
    first = sensitivity(prepared=prep, settings=GRID[:2], cache=cache, executor=SerialExecutor())
    assert (first.evaluations, first.cache_hits) == (8, 0)
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 8 and all(json.loads(f.read_text())["model_sha256"] == prep.loaded.sha256 for f in files)
    again = sensitivity(prepared=prep, settings=GRID[:2], cache=Cache(tmp_path), executor=SerialExecutor())
    assert (again.evaluations, again.cache_hits) == (0, 8)
    assert metrics_of(again) == metrics_of(first)
    # one more setting: only its 4 evaluations run
    more = sensitivity(prepared=prep, settings=GRID[:3], cache=Cache(tmp_path), executor=SerialExecutor())
    assert (more.evaluations, more.cache_hits) == (4, 8)
    # other samples or other weights: a different key, so a miss
    other = prepare(fragile_mlp(), fragile_samples(seed=2))
    assert sensitivity(prepared=other, settings=GRID[:1], cache=Cache(tmp_path), executor=SerialExecutor()).evaluations == 4
    changed = fragile_mlp()
    with torch.no_grad():
        changed.fc3.weight.mul_(1.01)
    p2 = prepare(changed, fragile_samples())
    assert p2.loaded.sha256 != prep.loaded.sha256
    assert sensitivity(prepared=p2, settings=GRID[:1], cache=Cache(tmp_path), executor=SerialExecutor()).evaluations == 4
    # a corrupt cache file is a miss, not an error
    files[0].write_text("{not json")
    assert sensitivity(prepared=prep, settings=GRID[:2], cache=Cache(tmp_path), executor=SerialExecutor()).evaluations == 1


def test_resume_after_interruption(prep, tmp_path):
    seen = []

    def stop_after_5(done: int, total: int) -> None:
        seen.append(done)
        if done >= 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sensitivity(prepared=prep, settings=GRID, cache=Cache(tmp_path), executor=SerialExecutor(),
                    progress=stop_after_5)
    assert len(list(tmp_path.rglob("*.json"))) == 5  # every finished evaluation was kept
    resumed = sensitivity(prepared=prep, settings=GRID, cache=Cache(tmp_path), executor=SerialExecutor())
    assert (resumed.evaluations, resumed.cache_hits) == (11, 5)
    fresh = sensitivity(prepared=prep, settings=GRID, cache=Cache(enabled=False), executor=SerialExecutor())
    assert metrics_of(resumed) == metrics_of(fresh)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_pool_and_ray_identical(prep, tmp_path):
    """The same evaluation function on a local process pool and on a local Ray instance."""
    pool = sensitivity(prepared=prep, settings=GRID[1:], cache=Cache(tmp_path / "pool"), executor=ProcessExecutor(2))
    assert pool.executor == "process" and pool.workers == 2
    serial = sensitivity(prepared=prep, settings=GRID[1:], cache=Cache(enabled=False), executor=SerialExecutor())
    for key, m in metrics_of(serial).items():  # same numbers up to float summation order
        assert metrics_of(pool)[key]["output_mse"] == pytest.approx(m["output_mse"], rel=1e-6, abs=1e-12)
    try:
        import ray
    except ImportError:  # optional extra; scripts/setup.sh installs it, so CI always runs this half
        if os.environ.get("CI"):
            pytest.fail("the Ray half of this test must run in CI: install compressadvise[distributed]")
        pytest.skip("ray is not installed (pip install 'compressadvise[distributed]')")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from test_executors import LOOPBACK, _gcs_servers, _listening, psutil

    if ray.is_initialized():
        ray.shutdown()
    me, level = psutil.Process(), logging.getLogger("ray").level
    ex = make_executor("ray", workers=2)  # starts Ray itself, on loopback, once for both runs below
    assert not ex.warm  # nothing started before the first run
    try:
        on_ray = sensitivity(prepared=prep, settings=GRID[1:], cache=Cache(tmp_path / "ray"), executor=ex)
        first, actors, listening = _gcs_servers(me), list(ex._actors), _listening(me)
        again = sensitivity(prepared=prep, settings=GRID[1:2], cache=Cache(enabled=False), executor=ex)
        assert len(first) == 1 and _gcs_servers(me) == first and ex.starts == 1 and ex._actors == actors
        assert listening and all(a in LOOPBACK for a in listening), listening
    finally:
        ex.close()
    assert not ray.is_initialized() and logging.getLogger("ray").level == level
    deadline = time.monotonic() + 10
    while _gcs_servers(me) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _gcs_servers(me)
    assert on_ray.executor == "ray" and on_ray.evaluations == pool.evaluations == 12 and again.evaluations == 4
    assert metrics_of(on_ray) == metrics_of(pool)  # bit-identical: both single-threaded workers
    assert [m.proxies for m in on_ray.measurements] == [m.proxies for m in pool.measurements]


def test_compress_weight_uses_the_library():
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    p2 = compress_weight(w, Setting.of("palettization", nbits=2, granularity="per_tensor"))
    assert torch.unique(p2).numel() <= 4
    g = compress_weight(w, Setting.of("palettization", nbits=2, granularity="per_grouped_channel", group_size=8))
    assert all(torch.unique(g[i:i + 8]).numel() <= 4 for i in range(0, 32, 8))
    q = compress_weight(w, Setting.of("linear_quantization", nbits=4, granularity="per_channel", mode="linear_symmetric"))
    scale = w.abs().amax(1, keepdim=True) / 7  # restricted symmetric range [-7, 7]
    assert torch.allclose(q, torch.round(w / scale).clamp(-7, 7) * scale, atol=1e-5)
    conv = torch.randn(8, 4, 3, 3)
    c = compress_weight(conv, Setting.of("palettization", nbits=3, granularity="per_tensor"))
    assert c.shape == conv.shape and torch.unique(c).numel() <= 8
    # seeded: the same call gives the same weights
    assert torch.equal(compress_weight(w, Setting.of("palettization", nbits=2, granularity="per_tensor"), seed=3),
                       compress_weight(w, Setting.of("palettization", nbits=2, granularity="per_tensor"), seed=3))
    with pytest.raises(CompressionFailed):
        compress_weight(w, Setting.of("pruning", sparsity=0.5))


def test_settings_grid_and_parsing():
    k = builtin()
    grid = default_grid()
    assert len(grid) == 30 and len(set(grid)) == 30
    pal = parse_settings(["palettization:nbits=4|3,granularity=per_grouped_channel,group_size=8|16"], k)
    assert {(s.p["nbits"], s.p["group_size"]) for s in pal} == {(4, 8), (4, 16), (3, 8), (3, 16)}
    assert parse_settings(["linear_quantization"], k) == default_grid(["linear_quantization"])
    # group_size is dropped when it does not apply, so equal settings compare equal
    a = parse_settings(["palettization:nbits=4,granularity=per_tensor"], k)[0]
    assert a == Setting.of("palettization", nbits=4, granularity="per_tensor")
    for bad in (["quantum:nbits=4"], ["palettization:bits=4"], ["palettization:nbits=5"], ["palettization:nbits=x"]):
        with pytest.raises(InvalidKnowledge):
            parse_settings(bad, k)


def test_target_filters_settings(prep, tmp_path):
    rep = sensitivity(prepared=prep, settings=default_grid(), target="ane-a17", os=16,
                      cache=Cache(tmp_path), executor=SerialExecutor(), layers=["head"])
    labels = {m.label for m in rep.measurements}
    assert labels and not any("gs=" in x or "bs=" in x or x.startswith(("3-bit", "4-bit linear")) for x in labels)
    assert any("does not support" in n for n in rep.notes)
    assert rep.layers == ["head"]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None
    assert spearman([1, 1, 2, 3], [5, 5, 6, 7]) == pytest.approx(1.0)


def test_cli_sensitivity_interrupt_and_resume(tmp_path, capsys):
    """Ctrl-C mid-run: exit 130, no traceback, finished evaluations kept; the rerun resumes."""
    import signal

    np.savez(tmp_path / "s.npz", inputs=fragile_samples().inputs[0].numpy())
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    exe = [sys.executable, "-c", "from compressadvise.ui.cli import main; main()"]
    cache = tmp_path / "c"
    base = ["sensitivity", "test_sensitivity:fragile_mlp", "--samples", str(tmp_path / "s.npz"),
            "--techniques", "palettization:nbits=8|6|4|3|2,granularity=per_tensor", "--techniques", "linear_quantization",
            "--workers", "2", "--cache", str(cache)]
    total = 48  # 4 layers x 15 settings, less the per-block sizes coremltools cannot split (bs >= inputs)
    p = subprocess.Popen([*exe, *base], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while len(list(cache.rglob("*.json"))) < 3 and p.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    done = len(list(cache.rglob("*.json")))
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert 3 <= done < total and not list(cache.rglob("*.tmp"))
    r = subprocess.run([*exe, *base, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["cache_hits"] == done and data["evaluations"] == total - done
    assert data["ranking"][0]["layer"] == "fc2"
    assert all(math.isfinite(m["metrics"]["output_mse"]) for m in data["measurements"])
    from cli_helpers import run_captured  # the last two in this process: a subprocess start-up each saved

    code, out, err = run_captured(capsys, *base)
    assert code == 0, err
    assert "fc2" in out and "0 evaluation(s) run" in out and f"{total} from the cache" in out
    assert "Cheap proxies" in out and "hessian_output" in out
    assert "…" not in out
    code, _, err = run_captured(capsys, *base[:4], "--techniques", "quantum")
    assert code == 6 and "unknown technique 'quantum'" in err and "Traceback" not in err
