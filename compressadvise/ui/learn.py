"""Short lessons, each proving its point with a tiny live experiment on the bundled digits model.

Every lesson compresses the real trained weights of the bundled CNN (simulated in fp32: the
weights are replaced by their compressed-then-decompressed values, which is what the device
computes with), measures top-1 accuracy on the 360 held-out digits and the weight
signal-to-noise ratio, and prices each setting with the technique size formulas (estimates).
All six conv/linear layers are compressed, with no size threshold, so the effect is visible on
a small model. Each lesson takes a second or two on two CPU cores.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import torch

    from compressadvise.model.analysis import LayerInfo, ModelReport

BASIS = ("top-1, weight SNR and output SNR measured on this machine on the bundled held-out digits, "
         "with simulated (fake-quantized) weights; sizes are estimates from the technique formulas")


# ------------------------------------------------------------------ result schema
class Row(BaseModel):
    setting: str
    accuracy: float = Field(description="measured: top-1 % on the evaluation samples")
    drop: float = Field(description="measured: float top-1 minus this row's top-1, in points")
    snr_db: float | None = Field(None, description="measured: weight signal-to-noise ratio over the compressed layers")
    output_snr_db: float | None = Field(description="measured: logits signal-to-noise ratio against the float "
                                        "model (None: identical outputs)")
    size_bytes: int | None = Field(None, description="estimate: model size from the technique formulas")
    note: str = ""


class LessonResult(BaseModel):
    topic: str
    title: str
    choice: str
    samples: int
    float_accuracy: float
    rows: list[Row]
    takeaways: list[str]
    basis: str = BASIS
    seconds: float


@dataclass
class Question:
    text: str
    choices: list[str]
    default: str
    explain: str


@dataclass
class Lesson:
    name: str
    title: str
    intro: list[str]
    question: Question
    run: Callable[["Lab", str], tuple[list[Row], list[str]]]
    sources: list[str] = field(default_factory=list)
    eval_samples: int | None = None  # when the lesson holds some samples out for calibration


# ------------------------------------------------------------------ the lab: model, data, numerics
class Lab:
    """The bundled model, its held-out samples and the knowledge base's size formulas."""

    def __init__(self) -> None:
        import torch

        from compressadvise.model.analysis import analyze
        from compressadvise.examples import digits
        from compressadvise.knowledge.base import builtin
        from compressadvise.model.loading import load_model

        torch.manual_seed(0)
        loaded = load_model(None)
        self.model = loaded.module
        x, y = digits.samples()
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.report: ModelReport = analyze(loaded)
        self.knowledge = builtin()
        self.layers = [x for x in self.report.layers if x.type in ("conv", "depthwise_conv", "linear")
                       and len(x.weight_shape) >= 2]
        self.float_logits = self.logits(self.model)
        self.float_accuracy = self.accuracy(self.model)

    def logits(self, model: Any, x: "torch.Tensor | None" = None) -> "torch.Tensor":
        import torch

        with torch.no_grad():
            return model(self.x if x is None else x)

    def accuracy(self, model: Any, x: "torch.Tensor | None" = None, y: "torch.Tensor | None" = None) -> float:
        out = self.logits(model, x)
        return float((out.argmax(1) == (self.y if y is None else y)).float().mean()) * 100.0

    def weight(self, name: str) -> "torch.Tensor":
        return self.model.get_submodule(name).weight.detach()

    def compressed(self, fn: Callable[[str, "torch.Tensor"], "torch.Tensor"],
                   names: list[str] | None = None) -> tuple[Any, float]:
        """A copy of the model with fn applied to the chosen layers' weights, and the weight SNR."""
        import torch

        model = copy.deepcopy(self.model)
        signal = noise = 0.0
        for x in self.layers:
            if names is not None and x.name not in names:
                continue
            mod = model.get_submodule(x.name)
            w = mod.weight.detach()
            r = fn(x.name, w)
            signal += float((w**2).sum())
            noise += float(((w - r) ** 2).sum())
            with torch.no_grad():
                mod.weight.copy_(r)
        return model, snr_db(signal, noise)

    def size(self, technique: str, params: dict[str, Any], names: list[str] | None = None) -> int:
        """Estimate: model bytes when `names` (default all lesson layers) use this setting."""
        from compressadvise.plan.sizing import layer_bytes, weight_bytes

        chosen = set(names) if names is not None else {x.name for x in self.layers}
        total = 0
        for x in self.report.layers:
            w = None
            if x.name in chosen:
                w = weight_bytes(self.knowledge, technique, x, fitted(x, params), 2.0)
            total += layer_bytes(x, w, 2.0)
        return total

    def layer(self, name: str) -> "LayerInfo":
        return self.report.layer(name)

    def row(self, setting: str, model: Any, snr: float | None, size: int | None, note: str = "",
            x: "torch.Tensor | None" = None, y: "torch.Tensor | None" = None,
            ref: "torch.Tensor | None" = None) -> Row:
        """Measure one setting: top-1, its drop and the logits SNR against the float model."""
        y = self.y if y is None else y
        ref = self.float_logits if ref is None else ref
        out = self.logits(model, x)
        acc = float((out.argmax(1) == y).float().mean()) * 100.0
        base = float((ref.argmax(1) == y).float().mean()) * 100.0
        out_snr = snr_db(float((ref**2).sum()), float(((ref - out) ** 2).sum()))
        return Row(setting=setting, accuracy=acc, drop=base - acc, snr_db=_finite(snr),
                   output_snr_db=_finite(out_snr), size_bytes=size, note=note)


def db(x: float | None) -> str:
    """A decibel figure for text; None means the outputs matched exactly."""
    return "inf" if x is None else f"{x:.1f}"


def _sortable(x: float | None) -> float:
    return math.inf if x is None else x


def _finite(x: float | None) -> float | None:
    """JSON has no infinity: an exact match (infinite SNR) is reported as None."""
    return None if x is None or math.isinf(x) else x


def snr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def fitted(layer: "LayerInfo", params: dict[str, Any]) -> dict[str, Any]:
    """The params this layer really gets: a group/block size that does not divide it falls back,
    as the backends do, to one LUT per tensor (palettization) or per channel (linear)."""
    p = {**params, "weight_threshold": 0}
    gran = p.get("granularity")
    if gran == "per_grouped_channel" and layer.out_channels % int(p.get("group_size", 1)):
        p["granularity"] = "per_tensor"
    if gran == "per_block" and layer.in_channels % int(p.get("block_size", 1)):
        p["granularity"] = "per_channel"
    return p


# ------------------------------------------------------------------ compression numerics (torch)
def kmeans_lut(w: "torch.Tensor", nbits: int, group_size: int | None = None, iters: int = 25) -> "torch.Tensor":
    """Palettize: 1-D k-means with 2^nbits centroids per tensor, or per group of output channels.

    Lloyd iterations from quantile-spaced centroids; in 1-D the nearest centroid is found by
    binary search over the midpoints, so this is fast enough to run live.
    """
    import torch

    rows = w.shape[0]
    gs = group_size if group_size and rows % group_size == 0 else rows
    v = w.reshape(rows // gs, -1).float()
    k = 2**nbits
    if v.shape[1] <= k:
        return w.clone()  # fewer values than LUT entries: stored exactly
    c = torch.quantile(v, torch.linspace(0, 1, k), dim=1).T.contiguous()
    for _ in range(iters):
        c, _ = torch.sort(c, dim=1)
        idx = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), v.contiguous())
        sums = torch.zeros_like(c).scatter_add_(1, idx, v)
        counts = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(v))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    c, _ = torch.sort(c, dim=1)
    idx = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), v.contiguous())
    return torch.gather(c, 1, idx).reshape(w.shape).to(w.dtype)


def linear_quant(w: "torch.Tensor", nbits: int, granularity: str = "per_channel", block_size: int = 16) -> "torch.Tensor":
    """Symmetric linear quantization (no zero-point) with one scale per tensor, channel or block."""
    q = 2 ** (nbits - 1) - 1
    if granularity == "per_tensor":
        v = w.reshape(1, -1)
    elif granularity == "per_block" and w[0].numel() % block_size == 0:
        v = w.reshape(w.shape[0], -1, block_size)
    else:
        v = w.reshape(w.shape[0], -1)
    scale = v.abs().amax(-1, keepdim=True).clamp(min=1e-12) / q
    return ((v / scale).round().clamp(-q, q) * scale).reshape(w.shape)


def magnitude_prune(w: "torch.Tensor", sparsity: float) -> "torch.Tensor":
    """Unstructured magnitude pruning: zero the smallest |w| of the tensor."""
    import torch

    k = int(w.numel() * sparsity)
    if k <= 0:
        return w.clone()
    threshold = w.abs().reshape(-1).kthvalue(k).values
    return torch.where(w.abs() > threshold, w, torch.zeros_like(w))


def quantize_activations(model: Any, names: list[str], calib: "torch.Tensor", nbits: int = 8) -> Any:
    """Simulate int8 activations: each layer's input is rounded to nbits with one symmetric
    per-tensor scale found on the calibration inputs (what W8A8 calibration does)."""
    import torch

    ranges: dict[str, float] = {}
    hooks = []
    for name in names:
        def observe(_m, inp, name=name):
            ranges[name] = max(ranges.get(name, 0.0), float(inp[0].abs().max()))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(observe))
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    q = 2 ** (nbits - 1) - 1
    for name in names:
        scale = max(ranges[name], 1e-12) / q

        def fake_quant(_m, inp, scale=scale):
            return ((inp[0] / scale).round().clamp(-q, q) * scale,)
        model.get_submodule(name).register_forward_pre_hook(fake_quant)
    return model


# ------------------------------------------------------------------ the lessons
def _pal(bits: int, group: int | None = None) -> Callable:
    return lambda _n, w: kmeans_lut(w, bits, group)


def _lin(bits: int, gran: str, block: int = 16) -> Callable:
    return lambda _n, w: linear_quant(w, bits, gran, block)


def palettization_vs_linear(lab: Lab, choice: str) -> tuple[list[Row], list[str]]:
    bits = int(choice)
    rows = [lab.row("float (fp16 storage)", lab.model, None, _fp16_size(lab))]
    m, s = lab.compressed(_pal(bits))
    rows.append(lab.row(f"{bits}-bit palettization, one LUT per tensor", m, s,
                        lab.size("palettization", {"nbits": bits, "granularity": "per_tensor"})))
    m, s = lab.compressed(_lin(bits, "per_tensor"))
    rows.append(lab.row(f"{bits}-bit linear, one scale per tensor", m, s,
                        lab.size("linear_quantization", {"nbits": bits, "granularity": "per_tensor"})))
    m, s = lab.compressed(_lin(bits, "per_channel"))
    rows.append(lab.row(f"{bits}-bit linear, one scale per channel", m, s,
                        lab.size("linear_quantization", {"nbits": bits, "granularity": "per_channel"})))
    pal, lin = rows[1], rows[2]
    gap = _sortable(pal.snr_db) - _sortable(lin.snr_db)
    if gap > 0.5:
        first = (f"At {bits} bits the look-up table keeps {gap:.1f} dB more weight signal than the uniform "
                 f"grid ({db(pal.snr_db)} vs {db(lin.snr_db)} dB): k-means puts its {2**bits} levels where "
                 "the weights are dense, a linear grid spreads them evenly up to the largest weight.")
    elif gap < -0.5:
        first = (f"At {bits} bits the uniform grid is already fine ({db(lin.snr_db)} vs {db(pal.snr_db)} dB "
                 f"for the LUT): with {2**bits} levels the LUT's advantage is gone. Try 3 or 2 bits to see "
                 "where palettization pulls ahead.")
    else:
        first = f"At {bits} bits both keep about the same weight signal ({db(pal.snr_db)} vs {db(lin.snr_db)} dB)."
    takeaways = [
        first,
        f"Top-1: {pal.accuracy:.2f}% palettized vs {lin.accuracy:.2f}% linear per tensor, "
        f"{rows[3].accuracy:.2f}% linear per channel (float {lab.float_accuracy:.2f}%).",
        "Linear quantization earns its place elsewhere: int8 weights can feed int8 matmuls (W8A8), "
        "while LUT weights are expanded back to fp16 for compute; see `learn w8a8`.",
    ]
    return rows, takeaways


def granularity(lab: Lab, choice: str) -> tuple[list[Row], list[str]]:
    bits = int(choice)
    rows = []
    for label, group, params in (
        ("one LUT per tensor", None, {"granularity": "per_tensor"}),
        ("one LUT per 16 channels", 16, {"granularity": "per_grouped_channel", "group_size": 16}),
        ("one LUT per 4 channels", 4, {"granularity": "per_grouped_channel", "group_size": 4}),
        ("one LUT per channel", 1, {"granularity": "per_grouped_channel", "group_size": 1}),
    ):
        m, s = lab.compressed(_pal(bits, group))
        rows.append(lab.row(f"{bits}-bit palettization, {label}", m, s,
                            lab.size("palettization", {"nbits": bits, **params})))
    for label, gran in (("per tensor", "per_tensor"), ("per channel", "per_channel"), ("per block of 16", "per_block")):
        m, s = lab.compressed(_lin(bits, gran, 16))
        rows.append(lab.row(f"{bits}-bit linear, one scale {label}", m, s,
                            lab.size("linear_quantization", {"nbits": bits, "granularity": gran, "block_size": 16})))
    coarse, fine, lin_coarse, lin_fine = rows[0], rows[3], rows[4], rows[6]
    better = "gains" if _sortable(fine.snr_db) > _sortable(coarse.snr_db) else "does not gain"
    takeaways = [
        f"Finer granularity {better} weight signal here: palettization {db(coarse.snr_db)} -> "
        f"{db(fine.snr_db)} dB, linear {db(lin_coarse.snr_db)} -> {db(lin_fine.snr_db)} dB. The gain is "
        "largest when channels differ in range; these weights are fairly uniform across channels.",
        f"It is not free: every extra LUT or scale is stored, {human(coarse.size_bytes)} -> "
        f"{human(fine.size_bytes)} for palettization and {human(lin_coarse.size_bytes)} -> "
        f"{human(lin_fine.size_bytes)} for linear (estimates); LUT group sizes of 8-16 are the usual balance.",
    ]
    if lin_coarse.accuracy + 1.0 < coarse.accuracy:
        takeaways.append(f"Linear quantization suffers most from a coarse grid: one large weight stretches "
                         f"the per-tensor scale ({lin_coarse.accuracy:.2f}% top-1), while a LUT adapts to "
                         f"the distribution ({coarse.accuracy:.2f}%).")
    takeaways.append("Grouped LUTs and per-block scales need iOS 18 / macOS 15 on Core ML targets.")
    return rows, takeaways


def sensitive_layers(lab: Lab, choice: str) -> tuple[list[Row], list[str]]:
    bits = int(choice)
    rows = []
    for x in lab.layers:
        m, s = lab.compressed(_pal(bits), [x.name])
        kurt = f"kurtosis {x.stats.kurtosis:.1f}" if x.stats else ""
        where = ", ".join(p for p, f in (("first", x.is_first), ("last", x.is_last)) if f)
        rows.append(lab.row(f"only {x.name} at {bits} bits", m, s,
                            lab.size("palettization", {"nbits": bits}, [x.name]),
                            note=f"{x.share:.0%} of params; {kurt}{'; ' + where if where else ''}"))
    # Rank by top-1 lost, then by output fidelity (finer: one sample is 0.28 points of top-1).
    ranked = sorted(zip(rows, lab.layers), key=lambda rx: (-rx[0].drop, _sortable(rx[0].output_snr_db)))
    worst = [x.name for _, x in ranked[:2]]
    everything = [x.name for x in lab.layers]
    m, s = lab.compressed(_pal(bits))
    all_row = lab.row(f"all layers at {bits} bits", m, s, lab.size("palettization", {"nbits": bits}))
    rows.append(all_row)
    for keep in (worst[:1], worst):
        names = [n for n in everything if n not in keep]
        m, s = lab.compressed(_pal(bits), names)
        rows.append(lab.row(f"all at {bits} bits but {', '.join(keep)} kept fp16", m, s,
                            lab.size("palettization", {"nbits": bits}, names)))
    (top, top_x), (low, low_x) = ranked[0], ranked[-1]
    one, two = rows[-2], rows[-1]
    takeaways = [
        f"Sensitivity is uneven: compressed alone, {top_x.name} leaves {db(top.output_snr_db)} dB of output "
        f"signal ({top.drop:.2f} points top-1 lost), {low_x.name} {db(low.output_snr_db)} dB "
        f"({low.drop:.2f} points). Measure it: share, position and kurtosis (in the notes) only hint at it.",
    ]
    if _sortable(two.output_snr_db) > _sortable(all_row.output_snr_db):
        takeaways.append(
            f"Keeping the most sensitive layer(s) at fp16 restores output signal: {db(all_row.output_snr_db)} -> "
            f"{db(one.output_snr_db)} dB (one kept) / {db(two.output_snr_db)} dB (two kept); top-1 "
            f"{all_row.accuracy:.2f}% -> {one.accuracy:.2f}% / {two.accuracy:.2f}%, for "
            f"{human(one.size_bytes)} / {human(two.size_bytes)} instead of {human(all_row.size_bytes)} (estimates).")
    else:
        takeaways.append("Keeping the most sensitive layers did not help here: the loss is spread over many layers.")
    if all_row.drop > top.drop + 0.5:
        takeaways.append(f"Errors compound: all layers together lose {all_row.drop:.2f} points, more than any "
                         f"one layer alone ({top.drop:.2f} at most).")
    return rows, takeaways


def w8a8(lab: Lab, choice: str) -> tuple[list[Row], list[str]]:
    """Calibrate on the first 64 held-out samples, evaluate on the other 296."""
    n_cal = int(choice)
    cal, x, y = lab.x[:64], lab.x[64:], lab.y[64:]
    names = [v.name for v in lab.layers]
    size8 = lab.size("linear_quantization", {"nbits": 8, "granularity": "per_channel"})
    ref = lab.logits(lab.model, x)
    row = lambda label, model, snr, size: lab.row(label, model, snr, size, x=x, y=y, ref=ref)  # noqa: E731
    rows = [row("float", lab.model, None, _fp16_size(lab))]
    m, s = lab.compressed(_lin(8, "per_channel"))
    rows.append(row("W8: int8 weights, fp16 activations", m, s, size8))
    for count, abits in ((n_cal, 8), (1, 8), (n_cal, 4)):
        m, s = lab.compressed(_lin(8, "per_channel"))
        quantize_activations(m, names, cal[:count], abits)
        rows.append(row(f"W8A{abits}: activations calibrated on {count} sample(s)", m, s, size8))
    w8, cal_n, cal_1, a4 = rows[1:]
    more = "costs more" if _sortable(cal_n.output_snr_db) < _sortable(w8.output_snr_db) else "costs no more here"
    takeaways = [
        f"Int8 weights alone keep {db(w8.output_snr_db)} dB of output signal ({w8.accuracy:.2f}% top-1 vs "
        f"{rows[0].accuracy:.2f}%) and halve the size.",
        f"Rounding activations too {more}: {db(cal_n.output_snr_db)} dB with ranges from {n_cal} calibration "
        f"sample(s), {db(cal_1.output_snr_db)} dB from 1 sample, {db(a4.output_snr_db)} dB with 4-bit activations "
        f"(top-1 {cal_n.accuracy:.2f}% / {cal_1.accuracy:.2f}% / {a4.accuracy:.2f}%).",
    ]
    if abs(_sortable(cal_n.output_snr_db) - _sortable(cal_1.output_snr_db)) < 1.0:
        takeaways.append("On this small model with [0, 1] pixel inputs even one sample finds usable ranges; "
                         "models with rare large activations (e.g. transformers) need the ~128 samples the guide suggests.")
    tgt = lab.knowledge.targets.get("ane-a17")
    if tgt is not None:
        i8, f16 = tgt.figures.get("peak_int8_tops"), tgt.figures.get("peak_fp16_tops")
        mode = tgt.mode("w8a8")
        if i8 and f16:
            takeaways.append(f"Why bother: {tgt.title} peaks at {i8.value:g} TOPS int8 vs {f16.value:g} TOPS fp16 "
                             f"(target profile figures). {mode.note if mode and mode.note else ''}".strip())
    takeaways.append("Latency was not measured here (no Neural Engine on this machine): W8A8 pays only where "
                     "the hardware has an int8 fast path; elsewhere it is a size step like W8.")
    return rows, takeaways


def sparsity(lab: Lab, choice: str) -> tuple[list[Row], list[str]]:
    target = float(choice)
    rows = [lab.row("float", lab.model, None, _fp16_size(lab))]
    for s in sorted({0.5, target}):
        m, snr = lab.compressed(lambda _n, w, s=s: magnitude_prune(w, s))
        rows.append(lab.row(f"{s:.0%} of weights pruned (magnitude)", m, snr,
                            lab.size("pruning", {"sparsity": s})))
    m, snr = lab.compressed(_pal(4))
    pal = lab.row("4-bit palettization (for comparison)", m, snr, lab.size("palettization", {"nbits": 4}))
    rows.append(pal)
    chosen = next(r for r in rows if r.setting.startswith(f"{target:.0%}"))
    verdict = ("post-training, fewer bits beat more zeros here" if pal.drop < chosen.drop
               and (pal.size_bytes or 0) <= (chosen.size_bytes or 0) * 1.25 else
               "compare both on your own model")
    tgt = lab.knowledge.targets.get("ane-a17")
    mode = tgt.mode("sparse") if tgt else None
    takeaways = [
        f"Without fine-tuning, pruning {target:.0%} costs {chosen.drop:.2f} points "
        f"({db(chosen.output_snr_db)} dB output signal) for {human(chosen.size_bytes)}; 4-bit palettization "
        f"costs {pal.drop:.2f} points ({db(pal.output_snr_db)} dB) for {human(pal.size_bytes)} (estimates): {verdict}.",
        "High sparsity (75%+) needs training-aware pruning to hold accuracy.",
        "Zeros save time only where the hardware skips them"
        + (f" ({tgt.title}: {mode.note})" if mode and mode.note else "") + "; elsewhere they save size only.",
    ]
    return rows, takeaways


def _fp16_size(lab: Lab) -> int:
    return int(sum(x.bytes_fp16 for x in lab.report.layers))


def human(n: int | None) -> str:
    from compressadvise.ui.render import human_bytes

    return "?" if n is None else human_bytes(n)


LESSONS: dict[str, Lesson] = {
    "palettization": Lesson(
        "palettization", "Palettization vs linear quantization",
        ["Both store each weight in a few bits. Linear quantization maps weights onto an evenly "
         "spaced grid (one scale, maybe a zero-point); palettization learns a small table of "
         "values (a LUT, by k-means) and stores an index per weight.",
         "The experiment compresses every conv/linear layer of the digits model both ways at the "
         "same bit width and compares the kept signal, top-1 and size."],
        Question("Bits per weight to try", ["2", "3", "4", "6", "8"], "3",
                 "fewer bits = smaller model; below 4 the difference between the two methods grows"),
        palettization_vs_linear, ["coremltools optimization guide, C: Workflows", "sources A9"]),
    "granularity": Lesson(
        "granularity", "Granularity: one LUT or scale per tensor, group, channel or block",
        ["A single LUT or scale must serve the whole tensor. Splitting the tensor (groups of "
         "output channels, single channels, blocks along the input) lets each part fit its own "
         "values, at the price of storing more tables or scales.",
         "The experiment compresses every layer at one bit width with finer and finer granularity."],
        Question("Bits per weight to try", ["2", "3", "4"], "2",
                 "granularity matters most at low bit widths"),
        granularity, ["coremltools optimization guide, C: Workflows (grouped LUTs, per-block)"]),
    "sensitive-layers": Lesson(
        "sensitive-layers", "Sensitive layers",
        ["A few layers are far more sensitive to compression than the rest; keeping them at full "
         "precision often recovers most of the accuracy for little size.",
         "The experiment palettizes one layer at a time, ranks the layers by the accuracy they "
         "cost, then compresses everything except the worst one or two."],
        Question("Bits per weight for the sensitivity scan", ["1", "2", "3"], "1",
                 "very low bits make the differences between layers obvious"),
        sensitive_layers, ["sources A12 (recalled): first/last layers often kept at higher precision"]),
    "w8a8": Lesson(
        "w8a8", "W8A8 on the Neural Engine",
        ["Weight-only compression shrinks the model, but the math still runs in fp16. W8A8 "
         "quantizes activations too, so matmuls run int8 x int8, which the A17 Pro / M4 Neural "
         "Engine executes much faster. Activation ranges must be calibrated on real inputs.",
         "The experiment calibrates on the first 64 held-out digits and tests on the other 296."],
        Question("Calibration samples", ["4", "16", "64"], "64",
                 "the guide suggests ~128 real samples; fewer risks ranges that miss real inputs"),
        w8a8, ["coremltools optimization guide, C: Hardware (W8A8 on A17 Pro / M4)"], eval_samples=296),
    "sparsity": Lesson(
        "sparsity", "Sparsity (pruning)",
        ["Pruning sets small weights to zero; the file stores a bit mask plus the non-zero "
         "values. Zeros save size everywhere but time only on hardware that skips them.",
         "The experiment prunes every layer by magnitude, with no fine-tuning, and compares with "
         "4-bit palettization."],
        Question("Sparsity to try", ["0.5", "0.75", "0.9"], "0.75",
                 "the share of weights set to zero"),
        sparsity, ["coremltools optimization guide, C: Workflows (75%+ sparsity needs fine-tuning)"]),
}


@lru_cache(maxsize=1)
def lab() -> Lab:
    return Lab()


def run_lesson(topic: str, choice: str | None = None) -> LessonResult:
    """Run one lesson's experiment (library API; the CLI adds the narration and prompts)."""
    from compressadvise.errors import InvalidKnowledge

    lesson = LESSONS.get(topic)
    if lesson is None:
        raise InvalidKnowledge(f"no lesson {topic!r}", hint=f"lessons: {', '.join(LESSONS)}")
    choice = lesson.question.default if choice is None else str(choice)
    if choice not in lesson.question.choices:
        raise InvalidKnowledge(f"{lesson.question.text.lower()} must be one of {', '.join(lesson.question.choices)}")
    import torch

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs cost more than the math
    try:
        lb = lab()
        rows, takeaways = lesson.run(lb, choice)
    finally:
        torch.set_num_threads(threads)
    return LessonResult(topic=topic, title=lesson.title, choice=choice,
                        samples=lesson.eval_samples or len(lb.y),
                        float_accuracy=rows[0].accuracy + rows[0].drop, rows=rows, takeaways=takeaways,
                        seconds=time.perf_counter() - start)
