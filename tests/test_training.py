"""Training-aware steps that apply runs (DKM, QAT, gradual pruning): a few steps on a tiny model,
checkpoints, --resume, Ctrl-C, and the refusals."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.schema import Plan, PlanModel, PlanTarget, Step
from compressadvise.model.loading import LoadedModel
from compressadvise.backends.training import Training, load_training
from cli_helpers import call_main

LAYERS = ["conv", "fc"]


def tiny_cnn() -> LoadedModel:
    """conv (4,608 weights) + ReLU, then fc (32,768): both above the 2048-element threshold; the
    conv+ReLU pair is what LinearQuantizer fuses (and renames)."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict([("conv", nn.Conv2d(16, 32, 3, padding=1)), ("act", nn.ReLU()),
                                   ("pool", nn.AdaptiveAvgPool2d(4)), ("flat", nn.Flatten()),
                                   ("fc", nn.Linear(512, 64)), ("act2", nn.ReLU()), ("head", nn.Linear(64, 10))]))
    h = hashlib.sha256()
    for k, v in m.state_dict().items():
        h.update(k.encode() + v.numpy().tobytes())
    return LoadedModel(source="test:tiny_cnn", format="factory", sha256=h.hexdigest(), has_graph=True,
                       module=m.eval(), example_inputs=(torch.randn(1, 16, 8, 8),))


class Batches:
    """Synthetic batches; `stop_after` raises KeyboardInterrupt there (a Ctrl-C at a known step)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after, self.given = stop_after, 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            if self.stop_after is not None and self.given >= self.stop_after:
                raise KeyboardInterrupt
            self.given += 1
            yield torch.randn(8, 16, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def plan(technique: str, slot: str = "weights", **params) -> Plan:
    return Plan(target=PlanTarget(name="ane-a17", os=18), model=PlanModel(),
                steps=[Step(technique=technique, slot=slot, params=params, layers=list(LAYERS))])


def evidence(manifest: dict, name: str, side: str) -> str:
    x = next(x for x in manifest["layers"] if x["name"] == name)
    return " ".join(e.get(side, {}).get("evidence") or "" for e in x["steps"])


@pytest.mark.parametrize("technique,slot,params,torch_says,coreml_says", [
    ("dkm", "weights", {"nbits": 2}, "<= 4 for 2 bits", "constexpr_lut_to_dense"),
    ("qat", "weights", {"nbits": 4}, "grid", "int4"),
    ("gradual_pruning", "sparsity", {"sparsity": 0.5, "update_every": 1}, "sparsity", "sparse"),
])
def test_each_training_step_kind_trains_and_ships(tmp_path, technique, slot, params, torch_says, coreml_says):
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    result = ca.apply(model, plan(technique, slot, steps=6, **params), tmp_path / "o", train=Training(Batches()))
    m = result.manifest
    record = m["steps"][0]["training"]
    assert record["steps"] == 6 and record["resumed_from"] == 0 and record["last_loss"] is not None
    for name in LAYERS:
        assert torch_says in evidence(m, name, "torch"), evidence(m, name, "torch")
        assert coreml_says in evidence(m, name, "coreml"), evidence(m, name, "coreml")
    assert m["planned_vs_built"]["layers_built"] == 2
    assert all(torch.equal(v, model.module.state_dict()[k]) for k, v in before.items())  # input untouched
    assert not (tmp_path / ".o.resume").exists()  # checkpoints go once the output is whole


def test_qat_trained_weights_reach_the_original_module_names(tmp_path):
    """LinearQuantizer fuses conv+ReLU into `conv.0`: the trained, snapped weight must still land on `conv`."""
    model = tiny_cnn()
    result = ca.apply(model, plan("qat", nbits=4, steps=4, learning_rate=0.01), tmp_path / "o",
                      train=Training(Batches()))
    assert result.manifest["torch_format"] == "exported"
    conv = torch.export.load(str(result.torch_artifact)).state_dict["conv.weight"]
    assert not torch.equal(conv, model.module.conv.weight)  # trained
    per_channel = [len(torch.unique(c)) for c in conv.detach().reshape(conv.shape[0], -1)]
    assert max(per_channel) <= 16


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    model = tiny_cnn()
    p = plan("dkm", nbits=2, steps=8, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        ca.apply(model, p, tmp_path / "o", train=Training(Batches(stop_after=5)))
    assert not (tmp_path / "o").exists()
    info = json.loads((tmp_path / ".o.resume" / "step1.json").read_text())
    assert info["done"] is False and info["total"] == 8
    result = ca.apply(model, p, tmp_path / "o", train=Training(Batches()), resume=True)
    record = result.manifest["steps"][0]["training"]
    assert record["resumed_from"] == 4 and record["steps"] == 8
    assert not (tmp_path / ".o.resume").exists()


def test_a_checkpoint_of_another_plan_is_refused(tmp_path):
    model = tiny_cnn()
    with pytest.raises(KeyboardInterrupt):
        ca.apply(model, plan("dkm", nbits=2, steps=8, checkpoint_every=2), tmp_path / "o",
                 train=Training(Batches(stop_after=3)))
    with pytest.raises(InvalidKnowledge, match="checkpoint of another plan"):
        ca.apply(model, plan("dkm", nbits=4, steps=8, checkpoint_every=2), tmp_path / "o",
                 train=Training(Batches()), resume=True)


def test_training_steps_need_training_data_and_only_they_take_it(tmp_path):
    with pytest.raises(InvalidKnowledge, match="needs training data"):
        ca.apply(tiny_cnn(), plan("dkm"), tmp_path / "a")
    with pytest.raises(InvalidKnowledge, match="no step of the plan trains"):
        ca.apply(tiny_cnn(), plan("palettization", nbits=4), tmp_path / "b", train=Training(Batches()))
    with pytest.raises(InvalidKnowledge, match="bundled digits"):
        ca.apply(tiny_cnn(), plan("dkm"), tmp_path / "c", train="bundled")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_training_hook_results_are_checked(tmp_path, monkeypatch):
    (tmp_path / "checked_hooks.py").write_text(textwrap.dedent("""
        def good():
            return {"loader": [(1, 2)], "steps": 3}
        def bad_key():
            return {"loader": [], "epochs": 3}
        def not_iterable():
            return {"loader": 5}
    """))
    monkeypatch.chdir(tmp_path)
    assert load_training("checked_hooks:good").steps == 3
    with pytest.raises(InvalidKnowledge, match="keys"):
        load_training("checked_hooks:bad_key")
    with pytest.raises(InvalidKnowledge, match="not iterable"):
        load_training("checked_hooks:not_iterable")


HOOK = '''
import time, torch
def slow():
    def batches():
        gen = torch.Generator().manual_seed(0)
        while True:
            time.sleep(0.05)
            yield torch.randn(8, 64, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    class Loader:
        def __iter__(self):
            return batches()
    return {"loader": Loader(), "steps": STEPS}
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)), (torch.randn(1, 64),)
'''


def _cli(tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-c", "from compressadvise.console import main; main()", "apply",
                             "ctrlc_hooks:model", "--plan", "p.yaml", "--out", "o", "--train", "ctrlc_hooks:slow", *args],
                            cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_exits_130_and_resume_finishes(tmp_path, monkeypatch):
    (tmp_path / "ctrlc_hooks.py").write_text(HOOK.replace("STEPS", "20"))
    from compressadvise.plan.planfile import plan_to_yaml

    p = Plan(target=PlanTarget(name="ane-a17", os=18), model=PlanModel(),
             steps=[Step(technique="dkm", slot="weights", params={"nbits": 2, "checkpoint_every": 3}, layers=["0"])])
    (tmp_path / "p.yaml").write_text(plan_to_yaml(p))
    proc = _cli(tmp_path)
    marker = tmp_path / ".o.resume" / "step1.json"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    saved = json.loads(marker.read_text())
    # The rerun in this process (the CLI's own entry point; a second interpreter would only add
    # imports). The hook module has a name of its own: this process may have imported another "hooks".
    (tmp_path / "ctrlc_hooks.py").write_text(HOOK.replace("STEPS", "20").replace("time.sleep(0.05)", "pass"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert call_main("apply", "ctrlc_hooks:model", "--plan", "p.yaml", "--out", "o", "--train", "ctrlc_hooks:slow",
                     "--resume") == 0
    record = json.loads((tmp_path / "o" / "manifest.json").read_text())["steps"][0]["training"]
    assert record["resumed_from"] >= 3 and record["steps"] == 20
    assert saved["key"] and not marker.exists()
