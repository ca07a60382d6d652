"""Ray vs the local process pool (and one process) for sensitivity: where Ray's start-up pays.

    python benchmarks/ray_vs_pool.py [--workers 2] [--cases bundled,deep] [--executors serial,process,ray]
                                     [--layers 64] [--width 128] [--samples 128] [--repeat 1] [--write]

Three workloads, each row in a fresh process (so the fork server's preloads, Ray's start and
the workers' first imports are its own):
- bundled: the digits CNN that ships with the package, default candidate grid (what
  `compressadvise sensitivity --executor ...` runs on the bundled example);
- deep: "many layers x settings", an MLP built here (--layers Linear layers of --width,
  orthogonal random weights, seed 0; nothing downloaded) on --samples random inputs, 6
  settings per layer spread over int8/int4 quantization and 4/2-bit palettization;
- search: `compressadvise search --size-fraction 0.3` on the bundled example (several
  evaluation batches: adaptive rounds, then the confirmations), run once.

Sensitivity runs 1 + --repeat times per executor, no cache: the first run pays the start-up
(the pool's fork server; Ray's local instance, its actors and their imports), the later ones
show the steady state that a search's later batches see. One process runs it once (it has no
start-up). For Ray a thread records every gcs_server process while the row runs, and every
address the process tree listens on; then it counts those left after close(). --write puts the table in
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from doc_section import in_fresh_process, write_section  # noqa: E402

HEADING = "## Ray vs the process pool"
DEEP_SETTINGS = [("linear_quantization", {"nbits": 8, "granularity": "per_channel", "mode": "linear_symmetric"}),
                 ("linear_quantization", {"nbits": 4, "granularity": "per_channel", "mode": "linear_symmetric"}),
                 ("linear_quantization", {"nbits": 4, "granularity": "per_block", "block_size": 32, "mode": "linear"}),
                 ("palettization", {"nbits": 4, "granularity": "per_tensor"}),
                 ("palettization", {"nbits": 4, "granularity": "per_grouped_channel", "group_size": 8}),
                 ("palettization", {"nbits": 2, "granularity": "per_tensor"})]


# ------------------------------------------------------------------ workloads
def deep_mlp(layers: int, width: int, samples: int):
    """(LoadedModel, Samples): `layers` Linear layers with ReLUs between, built and seeded here."""
    import torch
    from torch import nn

    from compressadvise.model.loading import LoadedModel
    from compressadvise.model.samples import Samples

    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(layers):
        lin = nn.Linear(width, width if i < layers - 1 else 10)
        nn.init.orthogonal_(lin.weight, gain=math.sqrt(2))  # activations keep their scale through the depth
        nn.init.zeros_(lin.bias)
        mods += [lin, nn.ReLU()] if i < layers - 1 else [lin]
    model = nn.Sequential(*mods).eval()
    x = torch.randn(samples, width, generator=torch.Generator().manual_seed(1))
    loaded = LoadedModel(source=f"deep MLP {layers}x{width}", format="module", sha256=f"deep-mlp-{layers}x{width}",
                         has_graph=True, module=model, example_inputs=(x[:1],))
    return loaded, Samples([x], source=f"{samples} random inputs")


def workload(case: str, args: argparse.Namespace):
    """(Prepared, settings or None for the default grid)."""
    from compressadvise.measure.sensitivity import Setting, prepare

    if case in ("bundled", "search"):
        return prepare(None, None), None
    loaded, samples = deep_mlp(args.layers, args.width, args.samples)
    return prepare(loaded, samples, max_samples=args.samples), [Setting.of(t, **kw) for t, kw in DEEP_SETTINGS]


# ------------------------------------------------------------------ one row, in a fresh process
def _ray_view() -> tuple[set[int], set[str]]:
    """The gcs_server processes under this one, and every address this process tree listens on."""
    import psutil

    me = psutil.Process()
    gcs, listen = set(), set()
    for p in [me, *me.children(recursive=True)]:
        try:
            if p.name().startswith("gcs_server"):
                gcs.add(p.pid)
            listen |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # ended meanwhile
            pass
    return gcs, listen


class _Watch:
    """Polls this process tree every half second: every gcs_server seen, every listening address."""

    def __init__(self) -> None:
        import threading

        self.gcs: set[int] = set()
        self.listen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            gcs, listen = _ray_view()
            self.gcs |= gcs
            self.listen |= listen
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _run_once(case: str, prep: Any, grid: Any, ex: Any) -> tuple[int, int]:
    """One sensitivity (or, for `search`, one budget search at 30% of fp16): (evaluations, workers)."""
    from compressadvise.measure.sensitivity import Cache, sensitivity

    if case == "search":
        from compressadvise.plan.search import search

        res = search(prepared=prep, size_fraction=0.3, cache=Cache(enabled=False), executor=ex)
        return res.evaluations["single_layer"] + res.evaluations["full_model_run_now"], ex.workers
    rep = sensitivity(prepared=prep, settings=grid, cache=Cache(enabled=False), executor=ex)
    return rep.evaluations, rep.workers


def measure_row(case: str, kind: str, args: argparse.Namespace, queue: Any) -> None:
    from compressadvise.measure.executors import make_executor

    prep, grid = workload(case, args)
    ex = make_executor(kind, workers=args.workers)
    row: dict[str, Any] = {"case": case, "executor": kind, "load": os.getloadavg()[0]}
    watch = _Watch() if kind == "ray" else None
    t0 = time.perf_counter()
    if kind == "ray":
        ex.start()
        row["ray_start_s"] = time.perf_counter() - t0
    walls = []
    for _ in range(1 if kind == "serial" or case == "search" else 1 + args.repeat):
        t = time.perf_counter()
        row["evaluations"], row["workers"] = _run_once(case, prep, grid, ex)
        walls.append(time.perf_counter() - t)
    row.update(run1_s=walls[0] + row.get("ray_start_s", 0.0), warm_s=walls[1:])
    ex.close()
    if watch is not None:
        time.sleep(1.0)  # the processes it shut down finish exiting
        watch.stop()
        row.update(gcs_during=len(watch.gcs), gcs_after=len(_ray_view()[0]), starts=ex.starts,
                   listen=sorted(watch.listen))
    queue.put(row)


# ------------------------------------------------------------------ report
def _fmt(row: dict[str, Any]) -> list[str]:
    warm = row["warm_s"]
    gcs = f"{row['gcs_during']} / {row['gcs_after']}" if "gcs_during" in row else "-"
    return [row["case"], row["executor"], str(row["workers"]), str(row["evaluations"]),
            f"{row['ray_start_s']:.1f}" if "ray_start_s" in row else "-", f"{row['run1_s']:.1f}",
            " / ".join(f"{w:.1f}" for w in warm) or "-", gcs, f"{row['load']:.1f}"]


COLUMNS = ["workload", "executor", "workers", "evaluations", "Ray start s", "1st run s (with start-up)",
           "later runs s", "gcs_server running / after close", "load avg"]


def _summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per sensitivity workload: Ray's start-up beyond the pool's, and their later runs."""
    out = []
    by = {(r["case"], r["executor"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):
        pool, ray = by.get((case, "process")), by.get((case, "ray"))
        if not (pool and ray and pool["warm_s"] and ray["warm_s"]):
            continue
        rw, pw = min(ray["warm_s"]), min(pool["warm_s"])
        extra = max(0.0, (ray["run1_s"] - rw) - (pool["run1_s"] - pw))  # Ray's start-up beyond the pool's
        per_eval = pw / pool["evaluations"]
        out.append(f"- {case}: first run {ray['run1_s']:.1f} s on Ray vs {pool['run1_s']:.1f} s on the pool "
                   f"(x{ray['run1_s'] / pool['run1_s']:.2f}; Ray's own start {ray['ray_start_s']:.1f} s of it), "
                   f"best later run {rw:.1f} s vs {pw:.1f} s (x{rw / pw:.2f}). Ray's start-up costs {extra:.0f} s "
                   f"more than the pool's; " + _pays(extra, rw, pw, per_eval) + ".")
    return out


def _pays(extra: float, ray_warm: float, pool_warm: float, per_eval: float) -> str:
    """Whether Ray's steady state pays its start-up back on this machine, or where it is amortised."""
    if ray_warm < 0.9 * pool_warm:
        return f"its faster later runs pay that back after {math.ceil(extra / (pool_warm - ray_warm))} runs"
    if ray_warm > 1.1 * pool_warm:
        return "its later runs are slower too, so on this machine it never pays back"
    return (f"its later runs are as fast, so it stays that constant behind: under 10% once a run's evaluations "
            f"take {10 * extra:.0f} s on the pool (about {10 * extra / per_eval:,.0f} evaluations like these)")


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    import torch

    listen = sorted({a for r in rows for a in r.get("listen", [])})
    loads = [r["load"] for r in rows]
    cmd = " ".join(["python benchmarks/ray_vs_pool.py", *sys.argv[1:]]).replace(" --write", "")
    text = [HEADING, "",
            f"`{cmd}` on {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the rows"
            + (" (other jobs were using the cores: times are upper bounds)." if max(loads) > 1.0 else "."),
            f"Workloads: the bundled digits CNN with the default grid; a {args.layers}-layer MLP of width "
            f"{args.width} built in the script (random weights) x {len(DEEP_SETTINGS)} settings on "
            f"{args.samples} random inputs; the bundled example's `search --size-fraction 0.3`. Each row is a "
            f"fresh process running the same sensitivity (no cache) 1 + {args.repeat} times (one process and "
            "the search: once).", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    text += ["| " + " | ".join(_fmt(r)) + " |" for r in rows]
    text += ["", f"Addresses Ray's processes listened on: {', '.join(listen) or '-'}. "
             f"Ray instances started per row (ray.init calls): "
             f"{', '.join(str(r['starts']) for r in rows if 'starts' in r) or '-'}.", ""]
    text += _summary(rows)
    text += ["", "Where Ray's start-up goes: its local instance (GCS, raylet and four Python helpers: dashboard "
             "agent, runtime-env agent, log monitor, autoscaler monitor), then actors that import torch and "
             "coremltools themselves, where the pool forks workers from a server that imported them once. "
             "After that, one executor keeps the instance and its actors for every later run (search rounds, "
             "confirmations). On one machine the pool stays the default; Ray is for spreading the evaluations "
             "over several machines (`--address`), where its start-up is small against the work."]
    return "\n".join(text) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cases", default="bundled,deep,search")
    ap.add_argument("--executors", default="serial,process,ray")
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=1, help="runs after the first (pool and Ray)")
    ap.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = []
    print(" | ".join(COLUMNS), flush=True)
    for case in args.cases.split(","):
        for kind in args.executors.split(","):
            rows.append(in_fresh_process(measure_row, case, kind, args))
            print(" | ".join(_fmt(rows[-1])), flush=True)
    text = report(rows, args)
    print(text)
    if args.write:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
