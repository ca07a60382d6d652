"""Layer roles come from the graph (issue 15): which layer runs first, which writes an output, and
which no output uses, whatever order the parameters were registered in."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressadvise.model.analysis import analyze
from compressadvise.model.loading import LoadedModel, load_model


class TiedDecoder(nn.Module):
    """Embedding tied to the output projection (F.linear on the embedding), two blocks, and a
    pooler that no output uses. By parameter order the last block's down-projection would be 'the
    classifier' and the pooler a live layer."""

    def __init__(self, vocab: int = 96, d: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(d, 4 * d), "down": nn.Linear(4 * d, d)})
                                    for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.pooler = nn.Linear(d, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](F.gelu(b["up"](h)))
        return F.linear(self.norm(h), self.embed.weight)


class HeadFirst(nn.Module):
    """The classifier is registered before the convolutions it follows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 10)
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.conv2 = nn.Conv2d(16, 32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


def _loaded(m: nn.Module, example: tuple) -> LoadedModel:
    return LoadedModel(source="t", format="module", sha256="", has_graph=True, module=m.eval(), example_inputs=example)


def _roles(report) -> dict[str, tuple[bool, bool, bool, bool]]:
    return {x.name: (x.is_first, x.is_last, x.is_classifier, x.is_dead) for x in report.layers}


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return TiedDecoder().eval(), (torch.randint(0, 96, (1, 12)),)


def test_a_tied_head_is_found_in_the_graph_and_the_last_block_is_not_the_classifier(decoder):
    m, ex = decoder
    r = analyze(_loaded(m, ex), stats=False)
    assert "graph" in r.roles_source or "trace" in r.roles_source
    assert not r.layer("blocks.1.down").is_classifier  # parameter order made it the classifier
    assert r.layer("embed").is_first
    assert r.layer("pooler").is_dead and not r.layer("blocks.1.down").is_dead
    assert any("no output depends on" in f and "pooler" in f for f in r.findings)


def test_export_trace_and_torchscript_agree_and_a_weight_only_file_says_it_guessed(decoder, tmp_path):
    m, ex = decoder
    eager = analyze(_loaded(m, ex), stats=False)
    path = tmp_path / "dec.pt2"
    torch.export.save(torch.export.export(m, ex), path)
    program = analyze(load_model(path), stats=False)
    assert program.roles_source == "roles from the torch.export graph"
    assert _roles(program) == _roles(eager)
    ts = tmp_path / "dec.ts"
    torch.jit.save(torch.jit.trace(m, ex), ts)
    script = analyze(load_model(ts), stats=False)
    assert script.roles_source == "roles from the TorchScript graph"
    assert _roles(script) == _roles(eager)
    sd = tmp_path / "dec.pt"
    torch.save(m.state_dict(), sd)
    assert "guessed" in analyze(load_model(sd), stats=False).roles_source


def test_plans_leave_dead_layers_out_and_say_why(decoder):
    from compressadvise.plan.engine import recommend

    m, ex = decoder
    plan = recommend(analyze(_loaded(m, ex), stats=False), target="ane-a17", os=18)
    assert plan.steps
    for step in plan.steps:
        assert "pooler" not in step.layers
        assert any(s.layer == "pooler" and s.code == "graph" for s in step.skipped)


def test_execution_order_not_registration_order():
    torch.manual_seed(0)
    r = analyze(_loaded(HeadFirst(), (torch.randn(1, 3, 12, 12),)), stats=False)
    assert r.layer("conv1").is_first and not r.layer("fc").is_first
    assert r.layer("fc").is_last and r.layer("fc").is_classifier
    assert not r.layer("conv2").is_classifier
    assert r.layer("fc").writes_output and not r.layer("conv2").writes_output


def test_a_tied_embedding_writes_the_output(decoder):
    m, ex = decoder
    r = analyze(_loaded(m, ex), stats=False)
    assert r.layer("embed").writes_output and not r.layer("blocks.1.down").writes_output


def test_torchscript_execution_order(tmp_path):
    torch.manual_seed(0)
    m, ex = HeadFirst().eval(), (torch.randn(1, 3, 12, 12),)
    path = tmp_path / "h.ts"
    torch.jit.save(torch.jit.trace(m, ex), path)
    r = analyze(load_model(path), stats=False)
    assert r.layer("conv1").is_first and r.layer("fc").is_last and r.layer("fc").is_classifier


class Stream(TiedDecoder):
    """Returns the residual stream and a pooled vector: every block reaches the first output
    through the identity path, but only the last block writes it."""

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](F.gelu(b["up"](h)))
        h = self.norm(h)
        return h, torch.tanh(self.pooler(h[:, 0]))


@pytest.mark.parametrize("route", ["fx", "export", "torchscript"])
def test_in_a_residual_stream_only_the_last_projection_writes_each_output(route, tmp_path):
    torch.manual_seed(0)
    m, ex = Stream().eval(), (torch.randint(0, 96, (1, 12)),)
    if route == "fx":
        r = analyze(_loaded(m, ex), stats=False)
    else:
        path = tmp_path / ("s.pt2" if route == "export" else "s.ts")
        if route == "export":
            torch.export.save(torch.export.export(m, ex), path)
        else:
            torch.jit.save(torch.jit.trace(m, ex), path)
        r = analyze(load_model(path), stats=False)
    assert {x.name for x in r.layers if x.writes_output} == {"blocks.1.down", "pooler"}, r.roles_source
    assert not r.layer("pooler").is_dead
