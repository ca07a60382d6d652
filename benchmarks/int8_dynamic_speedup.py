"""CPU speedup of int8 dynamic activation quantization on a linear-heavy transformer vs fp32.

    python benchmarks/int8_dynamic_speedup.py [--d-model 512] [--layers 4] [--seq 128]
        [--batch 1] [--reps 30] [--warmup 5] [--threads N] [--compile] [--json OUT]

The model is built here (random weights, fixed seed; latency does not depend on trained
values): pre-norm transformer blocks whose q/k/v/o projections and MLP are nn.Linear, so
almost all time is in matrix multiplies. Variants, timed in one run with repetitions
interleaved (A B C, C B A, ...) so machine noise hits them alike:

- fp32: the model as built (eager);
- torchao: torchao.quantization.quantize_ with Int8DynamicActivationInt8WeightConfig (eager);
- torchao+compile: the same under torch.compile (only with --compile; needs a C++ compiler);
- fbgemm: torch.ao.quantization.quantize_dynamic (PyTorch's older dynamic int8 path, deprecated),
  shown for reference where the engine is available.

Each quantized variant's output is checked against fp32 (SNR in dB) so a fast but broken
variant is visible. Figures are "measured" on this machine; the command line, machine and
thread count are printed with them.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compressadvise.measure.latency import machine_description, percentile, time_interleaved  # noqa: E402
from compressadvise.measure.metrics import snr  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, s, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.o(a)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Encoder(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def build(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Encoder(args.d_model, args.layers, args.heads, 4 * args.d_model).eval()
    x = torch.randn(args.batch, args.seq, args.d_model)
    return model, x


def variants(model: nn.Module, x: torch.Tensor, compile_: bool) -> tuple[dict, dict[str, str]]:
    """The models to time, plus a reason for each variant that could not be built."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    out: dict = {"fp32": model}
    skipped: dict[str, str] = {}
    q = copy.deepcopy(model)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    out["torchao int8 dynamic"] = q
    if compile_:
        try:
            c = torch.compile(copy.deepcopy(q))
            with torch.inference_mode():
                c(x)
            out["torchao int8 dynamic + compile"] = c
            cf = torch.compile(model)
            with torch.inference_mode():
                cf(x)
            out["fp32 + compile"] = cf
        except Exception as e:  # no compiler, unsupported op...
            skipped["compile"] = str(e).strip().splitlines()[0][:200]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fb = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
            with torch.inference_mode():
                fb(x)
        out["fbgemm quantize_dynamic (legacy)"] = fb
    except Exception as e:
        skipped["fbgemm quantize_dynamic (legacy)"] = str(e).strip().splitlines()[0][:200]
    return out, skipped


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave the default)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile versions")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x = build(args)
    models, skipped = variants(model, x, args.compile)
    with torch.inference_mode():
        ref = model(x)
        fidelity = {n: snr(ref, m(x)) for n, m in models.items() if n != "fp32"}
        t0 = time.perf_counter()
        times = time_interleaved({n: (lambda m=m: m(x)) for n, m in models.items()},
                                 reps=args.reps, warmup=args.warmup)
        wall = time.perf_counter() - t0
    base = statistics.median(times["fp32"])
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    result = {
        "label": "measured",
        "command": "python benchmarks/int8_dynamic_speedup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(), "cpu_count": __import__("os").cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torchao": __import__("torchao").__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "model": {"d_model": args.d_model, "layers": args.layers, "seq": args.seq, "batch": args.batch,
                  "linear_params": linear_params,
                  "linear_share": linear_params / sum(p.numel() for p in model.parameters())},
        "reps": args.reps, "warmup": args.warmup, "interleaved": True, "timing_wall_s": round(wall, 1),
        "results": {n: {"median_ms": statistics.median(ts), "p90_ms": percentile(ts, 90), "min_ms": min(ts),
                        "speedup_vs_fp32": base / statistics.median(ts), "snr_db_vs_fp32": fidelity.get(n)}
                    for n, ts in times.items()},
        "skipped": skipped,
    }
    print(f"{result['command']}\n{result['machine']}, {result['threads']} threads, torch {result['torch']}, "
          f"torchao {result['torchao']}, {args.reps} reps interleaved (measured)")
    print(f"model: {args.layers} blocks, d={args.d_model}, seq={args.seq}, batch={args.batch}; "
          f"{result['model']['linear_share']:.1%} of parameters in nn.Linear")
    print(f"{'variant':36} {'median ms':>10} {'p90 ms':>10} {'speedup':>8} {'SNR dB':>8}")
    for n, r in result["results"].items():
        s = "-" if r["snr_db_vs_fp32"] is None else f"{r['snr_db_vs_fp32']:.1f}"
        print(f"{n:36} {r['median_ms']:10.2f} {r['p90_ms']:10.2f} {r['speedup_vs_fp32']:7.2f}x {s:>8}")
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
