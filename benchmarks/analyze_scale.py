"""Analyze a synthetic OpenELM-1.1B-sized fp16 .safetensors checkpoint: wall time and peak RSS.

    python benchmarks/analyze_scale.py [--keep PATH]

Writes the checkpoint itself (streamed, one tensor at a time, ~2.2 GB on disk, random
weights: this measures the inventory's speed and memory, not advice quality), then runs
`compressadvise analyze FILE --json` in a child process and reports the child's wall time and
peak resident memory. Targets (issue 2): under 20 s and under 1.5 GB on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time

import torch

VOCAB, D, LAYERS = 32000, 2048, 28


def layout() -> list[tuple[str, tuple[int, ...]]]:
    """OpenELM-style layer-wise scaling: the FFN widens with depth; embeddings tied (stored once)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("transformer.token_embeddings.weight", (VOCAB, D))]
    for i in range(LAYERS):
        ffn = int(1024 + (6144 - 1024) * i / (LAYERS - 1)) // 64 * 64
        p = f"transformer.layers.{i}"
        shapes += [
            (f"{p}.attn_norm.weight", (D,)),
            (f"{p}.attn.qkv_proj.weight", (3 * D, D)),
            (f"{p}.attn.out_proj.weight", (D, D)),
            (f"{p}.ffn_norm.weight", (D,)),
            (f"{p}.ffn.proj_1.weight", (2 * ffn, D)),
            (f"{p}.ffn.proj_2.weight", (D, ffn)),
        ]
    shapes.append(("transformer.norm.weight", (D,)))
    return shapes


def write_checkpoint(path: str) -> int:
    shapes = layout()
    header, offset = {}, 0
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes:
            t = torch.randn(*shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.float16)
            f.write(t.numpy().tobytes())
    return offset // 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="write the checkpoint here and keep it")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="ca-scale-")
    path = args.keep or os.path.join(folder, "openelm-1.1b-synthetic.safetensors")
    t0 = time.perf_counter()
    params = write_checkpoint(path)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compressadvise.ui.cli", "analyze", path, "--json"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode:
        sys.exit(proc.stderr)
    report = json.loads(proc.stdout)
    print(json.dumps({
        "benchmark": "analyze_scale", "params": params, "file_gb": round(os.path.getsize(path) / 1e9, 2),
        "layers": len(report["layers"]), "write_s": round(write_s, 1), "analyze_wall_s": round(wall, 2),
        "analyze_peak_rss_gb": round(rss_kb / 1e6, 2), "cpus": os.cpu_count(),
        "machine": platform.platform(), "torch_threads": torch.get_num_threads(),
    }, indent=2))
    if not args.keep:
        os.remove(path)


if __name__ == "__main__":
    main()
