"""Time `recommend` on a model with ~1,000 weight layers (after loading and analysis).

    python benchmarks/recommend_scale.py [--blocks 110] [--repeat 5]

The model is built here: an LLM-style decoder of BLOCKS blocks, each with 9 weight layers
(2 norms, q/k/v/o, gate/up/down), plus a tied embedding/LM head: 110 blocks give 992 layers.
Target (issue 3): recommend under 2 s after loading, with the built-in playbooks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.mlp_norm = nn.LayerNorm(d)
        self.gate_proj, self.up_proj = nn.Linear(d, 4 * d), nn.Linear(d, 4 * d)
        self.down_proj = nn.Linear(4 * d, d)


class Decoder(nn.Module):
    def __init__(self, blocks: int, d: int = 64, vocab: int = 1000) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=110)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import compressadvise as ca
    from compressadvise.knowledge.base import builtin
    from compressadvise.model.loading import LoadedModel

    torch.manual_seed(0)
    model = Decoder(args.blocks).eval()
    t0 = time.perf_counter()
    report = ca.analyze(LoadedModel("bench", "factory", "0", has_graph=True, module=model))
    analyze_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    k = builtin()
    knowledge_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        plan = ca.recommend(report, target="ane-a17", constraints={"max_size_mb": 1.0}, knowledge=k)
        times.append(time.perf_counter() - t0)
    print(json.dumps({
        "benchmark": "recommend_scale", "layers": len(report.layers), "rules": len(k.rules),
        "steps": len(plan.steps), "analyze_s": round(analyze_s, 2), "load_knowledge_s": round(knowledge_s, 3),
        "recommend_median_s": round(statistics.median(times), 3), "recommend_max_s": round(max(times), 3),
        "cpus": os.cpu_count(), "machine": platform.platform(),
    }, indent=2))


if __name__ == "__main__":
    main()
