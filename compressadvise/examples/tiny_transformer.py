"""A second bundled example: a 2-block transformer encoder trained on generated token sequences.

Task (generated here, deterministic): a sequence of 16 tokens holds digits 0-9 and one marker
token (10); the label is (a + b) mod 10 for the two digits that follow the marker. The model
must find the marker by attention and combine two positions, so its layers are not all equally
important: a good test subject for per-layer sensitivity and search.

Weights ship as fp16 safetensors (`data/tiny_transformer.safetensors`, trained by
`python -m compressadvise.examples.tiny_transformer --train`, seed 0) with 1000 held-out
sequences (`data/tiny_transformer_eval.npz`) that were never seen in training.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch  # this example is imported only when used (model classes must be importable to pickle)
from torch import nn

DATA = Path(__file__).parent / "data"
WEIGHTS = DATA / "tiny_transformer.safetensors"
SAMPLES = DATA / "tiny_transformer_eval.npz"
CARD = DATA / "tiny_transformer_card.json"
VOCAB, LENGTH, MARKER, CLASSES = 12, 16, 10, 10


class Block(nn.Module):
    """Pre-norm attention (separate q/k/v/o projections) and a ReLU MLP."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = self.ln1(h)
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        h = h + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        return h + self.ff2(torch.relu(self.ff1(self.ln2(h))))


class TinyTransformer(nn.Module):
    """Token + position embeddings, two blocks, mean pooling, a 10-way head."""

    def __init__(self, d: int = 64, heads: int = 4, ff: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, d)
        self.pos_emb = nn.Embedding(LENGTH, d)
        self.blocks = nn.ModuleList([Block(d, heads, ff) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.tok_emb(ids) + self.pos_emb(pos)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def build_model() -> TinyTransformer:
    """The architecture (random weights): used for training and to load the shipped weights."""
    return TinyTransformer()


def generate(n: int, seed: int):
    """n sequences (int64, n x 16) and labels (int64, n): (a + b) mod 10 after the marker."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 10, size=(n, LENGTH))
    pos = rng.integers(0, LENGTH - 2, size=n)
    x[np.arange(n), pos] = MARKER
    a, b = x[np.arange(n), pos + 1], x[np.arange(n), pos + 2]
    return x.astype("int64"), ((a + b) % 10).astype("int64")


def trained_model():
    """Factory (`compressadvise.examples.tiny_transformer:trained_model`): (module, example input)."""
    import torch
    from safetensors.torch import load_file

    model = build_model()
    model.load_state_dict({k: v.float() for k, v in load_file(str(WEIGHTS)).items()})
    return model.eval(), (torch.zeros(1, LENGTH, dtype=torch.long),)


def samples():
    """Held-out token sequences (N, 16) int64 and labels (N,) int64 as numpy arrays."""
    import numpy as np

    with np.load(SAMPLES) as z:
        return z["inputs"].astype("int64"), z["labels"].astype("int64")


def card() -> dict:
    return json.loads(CARD.read_text())


def train(steps: int = 4000, batch: int = 256, seed: int = 0) -> dict:
    """Train from scratch on freshly generated data and write weights, samples and card."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        x, y = generate(batch, seed=1000 + step)  # the eval set uses seed 1: never seen here
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    DATA.mkdir(parents=True, exist_ok=True)
    save_file(state, str(WEIGHTS))
    xe, ye = generate(1000, seed=1)
    np.savez_compressed(SAMPLES, inputs=xe, labels=ye)  # int64: embedding indices
    model.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        acc = float((model.eval()(torch.from_numpy(xe)).argmax(-1) == torch.from_numpy(ye)).float().mean())
    info = {"name": "tiny-transformer", "task": "(a + b) mod 10 of the two digits after a marker token",
            "data": "generated by generate(n, seed); train seeds 1000.., eval seed 1", "train_steps": steps,
            "batch": batch, "seed": seed, "eval_samples": 1000, "float_top1_fp16_weights": round(acc, 4),
            "params": sum(p.numel() for p in model.parameters())}
    CARD.write_text(json.dumps(info, indent=2) + "\n")
    return info


if __name__ == "__main__":
    import sys

    if "--train" in sys.argv:
        print(json.dumps(train(), indent=2))
    else:
        print(__doc__)
