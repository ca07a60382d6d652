"""Reproduce the host-CPU measurements cited by playbooks/host.yaml and techniques/*.yaml.

Four 1024x1024 nn.Linear layers (fp32, 2 threads), interleaved repetitions so background load
hits every variant alike. Prints state-dict sizes, eager latency (median and best) at batch 1
and 32, and which GPU-only torchao configs raise on this CPU. Nothing is downloaded.

    python benchmarks/torchao_host.py
"""
from __future__ import annotations

import copy
import io
import statistics
import time
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")


def state_bytes(m: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    return buf.tell()


def variants(base: nn.Module) -> dict[str, nn.Module]:
    import torchao.quantization as tq
    from torchao.quantization.granularity import PerGroup

    out = {"fp32": base}
    for name, cfg in [("torchao int8 weight-only", tq.Int8WeightOnlyConfig()),
                      ("torchao int8 dynamic", tq.Int8DynamicActivationInt8WeightConfig()),
                      ("torchao intx int4 g32", tq.IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                         granularity=PerGroup(32)))]:
        m = copy.deepcopy(base)
        tq.quantize_(m, cfg)
        out[name] = m
    out["torch.ao dynamic (fbgemm)"] = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
    return out


def timings(models: dict[str, nn.Module], batch: int, reps: int = 30) -> dict[str, list[float]]:
    x = torch.randn(batch, 1024)
    ms: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(reps):
            for k, m in models.items():
                t = time.perf_counter()
                m(x)
                ms[k].append((time.perf_counter() - t) * 1e3)
    return ms


def gpu_only(base: nn.Module) -> None:
    import torchao.quantization as tq
    from torchao.sparsity import semi_sparse_weight, sparsify_

    for name, fn in [("Int4WeightOnlyConfig", lambda m: tq.quantize_(m, tq.Int4WeightOnlyConfig(group_size=32))),
                     ("Float8DynamicActivationFloat8WeightConfig",
                      lambda m: tq.quantize_(m, tq.Float8DynamicActivationFloat8WeightConfig())),
                     ("sparsify_(semi_sparse_weight)", lambda m: sparsify_(m, semi_sparse_weight()))]:
        m = copy.deepcopy(base)
        try:
            fn(m)
            m(torch.randn(2, 1024))
            print(f"  {name}: runs on this CPU")
        except Exception as e:  # the point is to record what each raises
            print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    base = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).eval()
    models = variants(base)
    print("state-dict bytes (measured):")
    for k, m in models.items():
        if not k.startswith("torch.ao"):
            print(f"  {k:28s} {state_bytes(m) / 1e6:7.2f} MB")
    for batch in (1, 32):
        ms = timings(models, batch)
        print(f"eager latency, batch {batch} (measured, ms: median / best):")
        for k, v in ms.items():
            print(f"  {k:28s} {statistics.median(v):8.2f} / {min(v):8.2f}")
    print("GPU-only configs on this CPU:")
    gpu_only(base)


if __name__ == "__main__":
    main()
