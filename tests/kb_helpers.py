"""Small models and helpers for the knowledge-base tests (rules, families, sizes).

Every model is built in code from a fixed seed (no downloads) and stays at a few hundred
thousand parameters at most, so `analyze` takes milliseconds. Reports are cached per model.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressadvise.model.analysis import ModelReport, analyze
from compressadvise.plan.engine import recommend
from compressadvise.knowledge.base import Knowledge, builtin, load_knowledge
from compressadvise.model.loading import LoadedModel
from compressadvise.knowledge.schema import Plan

MB = 1e6


# ------------------------------------------------------------------ model families
class DepthwiseCNN(nn.Module):
    """MobileNet-style: stem, three depthwise-separable blocks, 10-way classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.dw1 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw1 = nn.Conv2d(32, 128, 1)
        self.dw2 = nn.Conv2d(128, 128, 3, padding=1, groups=128)
        self.pw2 = nn.Conv2d(128, 256, 1)
        self.dw3 = nn.Conv2d(256, 256, 3, padding=1, groups=256)
        self.pw3 = nn.Conv2d(256, 256, 1)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for dw, pw in ((self.dw1, self.pw1), (self.dw2, self.pw2), (self.dw3, self.pw3)):
            x = torch.relu(pw(torch.relu(dw(x))))
        return self.head(x.mean((2, 3)))


class Encoder(nn.Module):
    """Transformer encoder: input projection, two nn.TransformerEncoder layers, 8-way head."""

    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(32, d)
        layer = nn.TransformerEncoderLayer(d, 4, 256, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, 8)

    def forward(self, x):
        return self.out(self.encoder(self.proj(x)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        x = self.norm(h)
        att = self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / x.shape[-1] ** 0.5
        mask = torch.ones(att.shape[-2:], dtype=torch.bool).triu(1)
        h = h + self.o_proj(torch.softmax(att.masked_fill(mask, -1e9), -1) @ self.v_proj(x))
        return h + self.fc2(torch.relu(self.fc1(h)))


class DecoderLM(nn.Module):
    """Decoder-only LM whose output head is tied to the input embedding."""

    def __init__(self, vocab: int = 512, d: int = 64, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.lm_head(self.norm(h))


class MLP(nn.Module):
    """Linear-heavy model. fc2 has 200 outputs and fc3 200 inputs: neither divides by 16 or 32,
    so grouped LUTs and per-block scales need the divisibility fallbacks there."""

    def __init__(self, mid: int = 200) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(256, 256), nn.Linear(256, mid), nn.Linear(mid, 256)
        self.head = nn.Linear(256, 16)

    def forward(self, x):
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def _heavy_tailed() -> nn.Module:
    m = MLP()
    with torch.no_grad():  # a handful of huge weights: kurtosis far above the normal 3
        m.fc1.weight[0, :8] = 40.0 * m.fc1.weight.abs().max()
    return m


def _sparse() -> nn.Module:
    m = MLP()
    with torch.no_grad():  # 60% exact zeros, as left by earlier pruning
        w = m.fc2.weight
        w[w.abs() < w.abs().flatten().kthvalue(int(0.6 * w.numel())).values] = 0.0
    return m


def _nonfinite() -> nn.Module:
    m = MLP()
    with torch.no_grad():
        m.fc2.weight[0, 0] = float("nan")
    return m


class WideMLP(nn.Module):
    """Over 1 MB at fp16 (1.2M parameters): the smallest model here that is not 'tiny'."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(512, 1024), nn.Linear(1024, 512)
        self.head = nn.Linear(512, 16)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _llama(positions: int) -> nn.Module:
    """A transformers decoder with a config (so a KV-cache shape): 2 layers, 4 query heads sharing 2 KV
    heads of 16 values, an LM head tied to its 512 x 64 embedding; `positions` is its position limit."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


BUILDERS: dict[str, tuple[Any, tuple]] = {
    "llama": (lambda: _llama(4096), None),  # 1.05 MB of fp16 KV cache at its limit, ~10x its 4-bit weights
    "llama_short": (lambda: _llama(16), None),  # 4 KB of cache at 16 tokens
    "wide_mlp": (WideMLP, (1, 512)),
    "prime_mlp": (lambda: MLP(211), (1, 256)),  # fc2 has 211 outputs, a prime: no group size above 1 divides it
    "dwcnn": (DepthwiseCNN, (1, 3, 32, 32)),
    "encoder": (Encoder, (1, 16, 32)),
    "decoder_lm": (DecoderLM, None),
    "mlp": (MLP, (1, 256)),
    "heavy_tailed": (_heavy_tailed, (1, 256)),
    "sparse": (_sparse, (1, 256)),
    "nonfinite": (_nonfinite, None),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name][0]().eval()


@lru_cache(maxsize=None)
def report(name: str) -> ModelReport:
    """Analysis of one of the named models (cached: reports are read-only in the tests)."""
    module = build(name)
    shape = BUILDERS[name][1]
    if name in ("decoder_lm", "llama", "llama_short"):
        example: tuple | None = (torch.randint(0, 512, (1, 16)),)
    else:
        example = (torch.randn(*shape),) if shape else None
    return analyze(LoadedModel(name, "factory", name, has_graph=True, module=module, example_inputs=example))


# ------------------------------------------------------------------ budgets and plans
def budget(name: str, ratio: float) -> float:
    """The size budget in MB that makes constraints.required_ratio equal `ratio`."""
    return report(name).total_bytes_fp16 / MB / ratio


def constraints(name: str, *, ratio: float = 0.0, latency: float = 0.0, drop: float = 0.0,
                data: str = "none") -> dict[str, Any]:
    return {"max_size_mb": budget(name, ratio) if ratio else 0.0, "max_latency_ms": latency,
            "max_accuracy_drop": drop, "data": data}


PROBES = Path(__file__).parent / "fixtures" / "kb_probes"


@lru_cache(maxsize=None)
def knowledge(probe: str | None = None) -> Knowledge:
    """Built-in knowledge, optionally plus one probe playbook (a team rule that forces a step
    the built-in rules never propose, so guard rules can be seen firing)."""
    if probe is None:
        return builtin()
    return load_knowledge([PROBES / f"{probe}.yaml"])


def plan_for(name: str, target: str, os: int | None = None, probe: str | None = None, **kw: Any) -> Plan:
    return recommend(report(name), target=target, os=os, constraints=constraints(name, **kw),
                     knowledge=knowledge(probe))


def status(plan: Plan, code: str) -> str:
    return {e.code: e.status for e in plan.trace}[code]


def fired(plan: Plan) -> set[str]:
    return {e.code for e in plan.trace if e.status == "fired"}


def step(plan: Plan, slot: str):
    return next((s for s in plan.steps if s.slot == slot), None)
