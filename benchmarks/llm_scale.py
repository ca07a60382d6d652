"""Benchmark: analyze -> recommend -> apply -> verify on an OpenELM-shaped decoder at 270M and 1.1B.

The decoder is written here (RMSNorm, rotary positions, grouped-query attention with per-head
q/k norms, SwiGLU FFN, OpenELM's layer-wise scaling: query heads and FFN widths interpolated
from the first layer to the last, tied input embedding / LM head, vocab 32,000). Its weights are
random, seeded, written once as fp16 safetensors into a cache folder, and memory-mapped by the
factories below (`compressadvise apply benchmarks.llm_scale:openelm_270m ...`), so the library
sees a model whose weights live in a file, as a real checkpoint does. Random weights are fine
for time and memory: k-means, conversion and serialization do not depend on trained values.

The model speaks what a transformers causal LM speaks for generation (a `config` under OpenELM's
Hugging Face names, with query and KV heads listed per layer; a forward taking an additive 4-D
mask, position ids and a `Cache` it updates once a layer), so on a Core ML target at iOS 18 apply
ships its KV cache as state exactly as it does for a Hugging Face model: one pair of states per
KV head count (OpenELM's layers have 3..5 KV heads at 270M, 4..8 at 1.1B), read back from the
saved package.

    python benchmarks/llm_scale.py --size 270m                       # whole pipeline, both targets
    python benchmarks/llm_scale.py --size 1.1b --targets ane-a17 --stages apply
    python benchmarks/llm_scale.py --size tiny --json                 # a quick smoke run

Every stage runs as its own `compressadvise` CLI process; its wall time and peak RSS come from
os.wait4 (the child's own ru_maxrss, measured). apply's manifest adds its per-stage peaks.
Weights go to $LLM_SCALE_CACHE (default ~/.cache/compressadvise-llm-scale).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


# ====================================================================== the model (OpenELM's shape)
@dataclass(frozen=True)
class Config:
    name: str
    layers: int
    dim: int
    head_dim: int = 64
    gqa_groups: int = 4  # query heads per KV head
    qkv_mult: tuple[float, float] = (0.5, 1.0)
    ffn_mult: tuple[float, float] = (0.5, 4.0)
    ffn_divisor: int = 256
    vocab: int = 32000
    seq: int = 16  # example input length (analysis and the fixed-window export)
    context: int = 2048  # OpenELM's max_context_length: the KV cache's length on Core ML

    def query_heads(self, i: int) -> int:
        q = _divisible(self.dim * _interp(self.qkv_mult, i, self.layers), self.head_dim * self.gqa_groups)
        return math.ceil(q / self.head_dim)

    def ffn_dim(self, i: int) -> int:
        return _divisible(_interp(self.ffn_mult, i, self.layers) * self.dim, self.ffn_divisor)


SIZES = {  # OpenELM-270M and -1.1B's published shapes; tiny for tests and smoke runs
    "tiny": Config("tiny", layers=4, dim=256, head_dim=32, gqa_groups=2, vocab=4096, context=256),
    "270m": Config("270m", layers=16, dim=1280),
    "1.1b": Config("1.1b", layers=28, dim=2048),
}


def _interp(span: tuple[float, float], i: int, n: int) -> float:
    """OpenELM: multipliers linearly spaced from the first layer to the last, rounded to 2 places."""
    return round(span[0] + (span[1] - span[0]) * (i / (n - 1) if n > 1 else 0.0), 2)


def _divisible(v: float, divisor: int) -> int:
    """OpenELM's make_divisible: nearest multiple of `divisor`, never 10% below `v`."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * v else new)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotary positions on (batch, heads, seq, head_dim) at token positions `pos` (batch, seq), computed
    from the positions (no table: a cached call's positions start past the prompt)."""
    d = x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos[:, None, :, None].float() * inv
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config, i: int) -> None:
        super().__init__()
        self.layer_idx = i
        self.q_heads = cfg.query_heads(i)
        self.kv_heads = max(1, self.q_heads // cfg.gqa_groups)
        self.hd = cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.dim, (self.q_heads + 2 * self.kv_heads) * self.hd, bias=False)
        self.q_norm, self.k_norm = RMSNorm(self.hd), RMSNorm(self.hd)
        self.out_proj = nn.Linear(self.q_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, self.q_heads + 2 * self.kv_heads, self.hd).transpose(1, 2)
        q, k, v = qkv.split([self.q_heads, self.kv_heads, self.kv_heads], dim=1)
        q, k = _rope(self.q_norm(q), pos), _rope(self.k_norm(k), pos)
        if cache is not None:  # transformers' Cache protocol: this call's keys and values in, all so far out
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.q_heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = (nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) if mask is None
             else nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype)))
        return self.out_proj(a.transpose(1, 2).reshape(b, t, self.q_heads * self.hd))


class FFN(nn.Module):
    def __init__(self, cfg: Config, i: int) -> None:
        super().__init__()
        self.hidden = cfg.ffn_dim(i)
        self.proj_1 = nn.Linear(cfg.dim, 2 * self.hidden, bias=False)  # gate and up, fused (OpenELM)
        self.proj_2 = nn.Linear(self.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.proj_1(x).split(self.hidden, dim=-1)
        return self.proj_2(nn.functional.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg: Config, i: int) -> None:
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.dim), Attention(cfg, i)
        self.ffn_norm, self.ffn = RMSNorm(cfg.dim), FFN(cfg, i)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), pos, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class HFConfig:
    """The model's sizes under OpenELM's Hugging Face config names (per-layer query and KV heads), so the
    library reads its KV cache the way it reads a checkpoint's config.json."""

    def __init__(self, cfg: Config) -> None:
        q = [cfg.query_heads(i) for i in range(cfg.layers)]
        self.values = {"architectures": ["OpenELMForCausalLM"], "model_type": "openelm", "vocab_size": cfg.vocab,
                       "num_transformer_layers": cfg.layers, "model_dim": cfg.dim, "head_dim": cfg.head_dim,
                       "num_query_heads": q, "num_kv_heads": [max(1, h // cfg.gqa_groups) for h in q],
                       "num_gqa_groups": cfg.gqa_groups, "max_context_length": cfg.context,
                       "share_input_output_layers": True}
        self.vocab_size = cfg.vocab

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


class OpenELMShaped(nn.Module):
    """Logits for token ids; the LM head is the input embedding (tied, as in OpenELM). The forward takes
    what a transformers causal LM takes for generation (an additive 4-D mask, positions, a Cache), so
    the library's KV-cache export wraps it as it wraps a Hugging Face model."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.config = HFConfig(cfg)
        self.token_embeddings = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_cache: bool = False,
                past_key_values: Any = None) -> torch.Tensor:
        x = self.token_embeddings(input_ids)
        pos = position_ids if position_ids is not None else torch.arange(input_ids.shape[-1])[None]
        mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
        cache = past_key_values if use_cache else None
        for layer in self.layers:
            x = layer(x, pos, mask, cache)
        return nn.functional.linear(self.norm(x), self.token_embeddings.weight)


# ====================================================================== weights on disk, memory-mapped
def cache_dir() -> Path:
    return Path(os.environ.get("LLM_SCALE_CACHE", Path.home() / ".cache" / "compressadvise-llm-scale"))


def weights_path(size: str) -> Path:
    return cache_dir() / f"openelm_{size}_fp16.safetensors"


def write_weights(cfg: Config, path: Path, seed: int = 0) -> int:
    """Random seeded fp16 weights, streamed tensor by tensor into a safetensors file (memory stays at
    about one tensor); returns the parameter count."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in OpenELMShaped(cfg).named_parameters()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, (name, shape) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
            f.write(t.to(torch.float16).numpy().tobytes())
    tmp.replace(path)
    return sum(math.prod(s) for s in shapes.values())


def build(size: str) -> tuple[nn.Module, tuple]:
    """The decoder on meta, its parameters assigned from the memory-mapped fp16 file (no copy)."""
    from compressadvise.model.loading import mmap_safetensors

    cfg = SIZES[size]
    path = weights_path(size)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run `python benchmarks/llm_scale.py --size {size}` to write it")
    with torch.device("meta"):
        model = OpenELMShaped(cfg)
    model.load_state_dict(mmap_safetensors(path), assign=True, strict=True)
    ids = torch.randint(0, cfg.vocab, (1, cfg.seq), generator=torch.Generator().manual_seed(1))
    return model.eval(), (ids,)


def openelm_tiny() -> tuple[nn.Module, tuple]:
    return build("tiny")


def openelm_270m() -> tuple[nn.Module, tuple]:
    return build("270m")


def openelm_1_1b() -> tuple[nn.Module, tuple]:
    return build("1.1b")


FACTORY = {"tiny": "openelm_tiny", "270m": "openelm_270m", "1.1b": "openelm_1_1b"}


# ====================================================================== the stages, each its own process
def run_stage(label: str, argv: list[str], log: Path) -> dict[str, Any]:
    """One CLI process: wall time, its peak RSS (os.wait4; Linux starts a child's high-water mark at
    this driver's ~0.3 GB, below every stage's own), exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rec = {"stage": label, "seconds": round(time.perf_counter() - started, 1),
           "peak_rss_mb": round(usage.ru_maxrss / 1024), "rc": proc.returncode,
           "load_average_1m": round(os.getloadavg()[0], 2)}
    if proc.returncode:
        rec["error"] = log.read_text()[-600:]
    print(json.dumps(rec), file=sys.stderr, flush=True)
    return rec


def pipeline(size: str, target: str, work: Path, stages: list[str], fraction: float,
             measure: bool = True) -> dict[str, Any]:
    spec = f"benchmarks.llm_scale:{FACTORY[size]}"
    cli = [sys.executable, "-c", "import sys; from compressadvise.console import main; sys.argv[0] = 'compressadvise'; "
           "sys.exit(main())"]
    plan, out = work / f"plan_{target}.yaml", work / f"out_{target}"
    argv = {
        "analyze": cli + ["analyze", spec],
        "recommend": cli + ["recommend", spec, "--target", target, "--size-fraction", str(fraction),
                            "--out", str(plan)] + ([] if measure else ["--no-measure"]),
        "apply": cli + ["apply", spec, "--plan", str(plan), "--out", str(out), "--force"],
        "verify": cli + ["verify", spec, str(out)],
    }
    recs = []
    for stage in stages:
        recs.append(run_stage(f"{target} {stage}", argv[stage], work / f"{target}_{stage}.log"))
        if recs[-1]["rc"] and stage in ("recommend", "apply"):
            break
    result: dict[str, Any] = {"target": target, "stages": recs}
    manifest = out / "manifest.json"
    if "apply" in stages and manifest.is_file() and not recs[-1].get("error"):
        result["apply"] = _apply_figures(json.loads(manifest.read_text()))
    return result


def _apply_figures(m: dict[str, Any]) -> dict[str, Any]:
    sizes = {k: v.get("value") for k, v in m.get("sizes", {}).items() if isinstance(v, dict)}
    return {"planned_vs_built": m.get("planned_vs_built"), "sizes": sizes, "resources": m.get("resources"),
            "steps": [{"technique": s["technique"], "params": s["params"], "layers": len(s["layers_applied"])}
                      for s in m.get("steps", [])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="270m")
    ap.add_argument("--targets", default="mac-gpu,ane-a17")
    ap.add_argument("--stages", default="analyze,recommend,apply,verify")
    ap.add_argument("--size-fraction", type=float, default=0.25, help="recommend's budget, of the fp16 size")
    ap.add_argument("--no-measure", action="store_true", help="recommend without measuring the plan's fidelity")
    ap.add_argument("--work", default=None, help="folder for plans, outputs and logs (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cfg = SIZES[args.size]
    path = weights_path(args.size)
    t0 = time.perf_counter()
    if not path.is_file():
        write_weights(cfg, path)
    write_s = round(time.perf_counter() - t0, 1)
    with torch.device("meta"):
        params = sum(p.numel() for p in OpenELMShaped(cfg).parameters())
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / f"llm_scale_{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runs = [pipeline(args.size, t, work, args.stages.split(","), args.size_fraction, not args.no_measure)
            for t in args.targets.split(",")]
    report = {"command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]), "size": args.size,
              "config": asdict(cfg), "params": params, "fp16_mb": round(path.stat().st_size / 1e6, 1),
              "weights_written_s": write_s, "wall_s": round(time.perf_counter() - started, 1), "runs": runs,
              "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()]}
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else _text(report))


def _text(r: dict[str, Any]) -> str:
    lines = [f"OpenELM-shaped {r['size']}: {r['params'] / 1e6:.0f}M params, fp16 file {r['fp16_mb']} MB; "
             f"total {r['wall_s']} s (load average {r['load_average']})"]
    for run in r["runs"]:
        for s in run["stages"]:
            lines.append(f"  {s['stage']}: {s['seconds']} s, peak RSS {s['peak_rss_mb']} MB, rc {s['rc']}")
        if a := run.get("apply"):
            lines.append(f"    built: {a['planned_vs_built']}")
            lines.append(f"    resources: {a['resources']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
