"""Models and compressed copies shared by the verify tests (no tests here; built in code, nothing downloaded)."""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn


def palettize(model: nn.Module, nbits: int = 4) -> nn.Module:
    """A post-training palettized copy (coremltools.optimize.torch, one LUT per tensor)."""
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    cfg = PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": nbits, "granularity": "per_tensor"}})
    return PostTrainingPalettizer(copy.deepcopy(model), cfg).compress().eval()


def broken(model: nn.Module) -> nn.Module:
    """A copy whose classifier is sign-flipped: accuracy collapses, structure stays the same."""
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.classifier.weight.neg_()
    return bad


def export(model: nn.Module, path, shape=(1, 1, 8, 8)):
    ep = torch.export.export(model, (torch.zeros(*shape),))
    torch.export.save(ep, str(path))
    return path


class Scores(nn.Module):
    """Logits = the input itself: the label is whichever feature is largest."""

    def forward(self, x):
        return x * 1.0


class FlipBright(nn.Module):
    """Like Scores, but reverses the logits of samples whose third feature is above 5."""

    def forward(self, x):
        out = x * 1.0
        bright = x[:, 2] > 5
        out[bright] = out[bright].flip(-1)
        return out


class TwoHeads(nn.Module):
    def forward(self, x):
        return x * 1.0, x * 2.0


class NaNOut(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x).clone()
        out[0, 0] = float("nan")
        return out


def slice_samples(n: int = 60, seed: int = 0) -> dict:
    """3-feature samples; a third of them 'bright' (feature 2 above 5, so class 2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g) * 4
    x[: n // 3, 2] += 6.0
    labels = x.argmax(1)
    slices = ["bright" if v > 5 else "dim" for v in x[:, 2].tolist()]
    return {"inputs": x.numpy(), "labels": labels.numpy(), "slices": slices}


def digits_subset(path, n: int = 60):
    """The first n bundled held-out digits with labels, as a sample file (exported programs run
    one sample at a time, so their tests use fewer samples)."""
    import numpy as np

    from compressadvise.examples import digits

    x, y = digits.samples()
    np.savez(path, inputs=x[:n], labels=y[:n])
    return path
