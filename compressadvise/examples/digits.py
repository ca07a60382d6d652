"""The bundled example model: a depthwise-separable CNN for 8x8 handwritten digits.

Weights were trained by `train_digits.py` (deterministic seed) on scikit-learn's digits set;
the held-out samples in `data/digits_eval.npz` were never seen in training.
"""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data"
WEIGHTS = DATA / "digits_cnn.safetensors"
SAMPLES = DATA / "digits_eval.npz"
TRAIN = DATA / "digits_train.npz"  # the 80% the weights were trained on (apply --train bundled)
CARD = DATA / "digits_card.json"
INPUT_SHAPE = (1, 1, 8, 8)


def build_model():
    """The architecture (random weights): used for training and to load the shipped weights."""
    from torch import nn

    from collections import OrderedDict

    return nn.Sequential(OrderedDict([
        ("stem", nn.Conv2d(1, 32, 3, padding=1)),
        ("stem_bn", nn.BatchNorm2d(32)),
        ("stem_act", nn.ReLU()),
        ("dw", nn.Conv2d(32, 32, 3, padding=1, groups=32)),  # depthwise
        ("dw_act", nn.ReLU()),
        ("pw", nn.Conv2d(32, 64, 1)),  # pointwise
        ("pw_act", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),  # 8x8 -> 4x4
        ("conv", nn.Conv2d(64, 64, 3, padding=1)),
        ("conv_act", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),  # 4x4 -> 2x2
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(256, 128)),
        ("fc_act", nn.ReLU()),
        ("classifier", nn.Linear(128, 10)),
    ]))


def trained_model():
    """Factory (`compressadvise.examples.digits:trained_model`) returning the trained module."""
    from safetensors.torch import load_file

    model = build_model()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()


def samples():
    """Held-out inputs (N,1,8,8 float32 in [0,1]) and labels (N,) as numpy arrays."""
    import numpy as np

    with np.load(SAMPLES) as z:
        return z["inputs"].astype("float32") / 16.0, z["labels"].astype("int64")


def train_split():
    """The training split (N,1,8,8 float32 in [0,1], labels (N,)): never the held-out samples."""
    import numpy as np

    with np.load(TRAIN) as z:
        return z["inputs"].astype("float32") / 16.0, z["labels"].astype("int64")


def card() -> dict:
    return json.loads(CARD.read_text())


def load():
    """The bundled example as a LoadedModel (imported lazily by compressadvise.load_model)."""
    import torch

    from compressadvise.fsutil import sha256_file
    from compressadvise.model.loading import LoadedModel

    return LoadedModel(
        source="bundled:digits-cnn", format="bundled", sha256=sha256_file(WEIGHTS),
        has_graph=True, module=trained_model(), example_inputs=(torch.zeros(*INPUT_SHAPE),),
        notes=["bundled example: depthwise-separable CNN trained on scikit-learn digits"],
    )
