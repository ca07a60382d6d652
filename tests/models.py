"""Small models built in code for the foundation and engine tests."""
from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.head(x.mean((2, 3)))


class Encoder(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(32, d)
        layer = nn.TransformerEncoderLayer(d, 4, 128, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, 8)

    def forward(self, x):
        return self.out(self.encoder(self.proj(x)))


class TinyLM(nn.Module):
    """Decoder LM with tied input/output embeddings."""

    def __init__(self, vocab: int = 100, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.mlp = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        a = torch.softmax(self.q_proj(h) @ self.k_proj(h).transpose(1, 2), -1) @ self.v_proj(h)
        return self.lm_head(h + self.mlp(a))


def cnn_factory():
    torch.manual_seed(0)
    return TinyCNN().eval(), (torch.randn(1, 3, 8, 8),)


def unique_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())  # parameters() already de-duplicates ties
