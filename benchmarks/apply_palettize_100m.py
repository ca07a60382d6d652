"""Benchmark: `compressadvise apply` with 4-bit palettization on a ~100M-parameter transformer.

The model is built here with random weights (fine for speed and memory: k-means, conversion
and serialization cost do not depend on trained values). The full apply runs: torch side
(coremltools PostTrainingPalettizer), torch.export save, Core ML conversion, Core ML
palettize_weights, .mlpackage save, and both read-backs.

    python benchmarks/apply_palettize_100m.py                 # ~100M params, both sides
    python benchmarks/apply_palettize_100m.py --layers 2      # a quick smoke run
    python benchmarks/apply_palettize_100m.py --granularity per_grouped_channel --group-size 16

Prints wall time per stage, total wall time and peak RSS (this process; k-means runs in it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


class Block(nn.Module):
    """A pre-norm transformer block written with plain nn.Linear (what compression sees)."""

    def __init__(self, d: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, vocab: int, d: int, ffn: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, ffn, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--seq", type=int, default=16, help="example sequence length (conversion input)")
    ap.add_argument("--nbits", type=int, default=4)
    ap.add_argument("--granularity", default="per_tensor", choices=["per_tensor", "per_grouped_channel"])
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--target", default="ane-a17")
    ap.add_argument("--out", default=None, help="output folder (default: a temp folder, removed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import compressadvise as ca
    from compressadvise.model.loading import LoadedModel
    from compressadvise.knowledge.schema import Plan, PlanTarget, Step

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = Transformer(args.vocab, args.d_model, args.ffn, args.d_model // 64, args.layers).eval()
    params = sum(p.numel() for p in model.parameters())
    example = (torch.randint(0, args.vocab, (1, args.seq)),)
    loaded = LoadedModel(source="benchmark:transformer", format="factory", sha256="", has_graph=True,
                         module=model, example_inputs=example)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    step_params = {"nbits": args.nbits, "granularity": args.granularity}
    if args.granularity == "per_grouped_channel":
        step_params["group_size"] = args.group_size
    plan = Plan(target=PlanTarget(name=args.target, os=18),
                steps=[Step(technique="palettization", slot="weights", params=step_params, layers=layers)])
    build_s = time.perf_counter() - t0

    stages: dict[str, float] = {}
    last = {"label": "load, analyze, validate, import libraries", "t": time.perf_counter()}

    peaks: dict[str, float] = {}  # stage -> peak RSS reached by its end (where the memory goes)

    def progress(label: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if label != last["label"]:
            stages[last["label"]] = stages.get(last["label"], 0.0) + now - last["t"]
            peaks[last["label"]] = round(peak_rss_mb(), 0)
            last.update(label=label, t=now)

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(args.out) if args.out else Path(tmp.name) / "out"
    t1 = time.perf_counter()
    result = ca.apply(loaded, plan, out, force=True, progress=progress)
    total = time.perf_counter() - t1
    stages[last["label"]] = stages.get(last["label"], 0.0) + time.perf_counter() - last["t"]
    sizes = {k: v["value"] for k, v in result.manifest["sizes"].items()}
    report = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "params": params, "plan": step_params, "target": args.target,
        "build_model_s": round(build_s, 1), "apply_wall_s": round(total, 1),
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "peak_rss_mb_by_stage_end": peaks,
        "peak_rss_mb": round(peak_rss_mb(), 0), "sizes_bytes": sizes,
        "layers_applied": len(result.manifest["steps"][0]["layers_applied"]),
        "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if tmp:
        tmp.cleanup()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"model: {params / 1e6:.1f}M params (random weights), {report['layers_applied']} layers palettized "
          f"({args.nbits}-bit {args.granularity})")
    print(f"apply wall time: {total:.1f} s (model build {build_s:.1f} s); peak RSS {report['peak_rss_mb']:.0f} MB")
    for k, v in report["stages_s"].items():
        print(f"  {k}: {v:.1f} s (peak RSS by its end: {peaks.get(k, report['peak_rss_mb']):.0f} MB)")
    for k, v in sizes.items():
        print(f"  {k}: {v}")
    print(f"  (on {report['cpus']} CPUs, 1-min load average {report['load_average_1m']})")


if __name__ == "__main__":
    main()
