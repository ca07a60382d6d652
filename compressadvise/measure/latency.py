"""Latency and memory measured on this machine, original and compressed interleaved.

Repetitions alternate between the models (A B, B A, A B...) so a noisy neighbour, thermal
drift or a frequency change hits both alike and the ratio holds even when absolute figures
wander. Everything here is "measured"; estimates for other hardware live in estimate.py.
"""
from __future__ import annotations

import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from compressadvise.measure.metrics import ResultModel

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


class Timing(ResultModel):
    label: Literal["measured"] = "measured"
    mode: Literal["eager", "compile", "coreml"]
    median_ms: float
    p90_ms: float
    min_ms: float
    reps: int
    p99_ms: float | None = Field(None, description="None in results written before it was recorded")
    peak_rss_delta_mb: float | None = Field(
        None, description="peak resident memory above the level before this model's memory pass")


class LatencyReport(ResultModel):
    label: Literal["measured"] = "measured"
    machine: str
    device: str = Field(description="cpu, or the CUDA device name")
    threads: int = Field(description="torch.get_num_threads() during the run")
    batch_size: int
    warmup: int
    interleaved: bool = True
    timings: dict[str, list[Timing]] = Field(description="per model: eager (and compile) timings")
    process_peak_rss_mb: float | None = Field(None, description="peak RSS of this process so far")
    notes: list[str] = []

    def best(self, name: str) -> Timing | None:
        """The fastest mode measured for one model (what a deployment would pick)."""
        rows = self.timings.get(name) or []
        return min(rows, key=lambda t: t.median_ms) if rows else None

    def get(self, name: str, mode: str = "eager") -> Timing | None:
        return next((t for t in self.timings.get(name, []) if t.mode == mode), None)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and the int8-relevant ISA flags (Linux /proc/cpuinfo; else platform)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags_line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(flags_line.split(":", 1)[-1].split())
    return name or platform.machine(), [f for f in INT8_FLAGS if f in flags]


def machine_description() -> str:
    name, flags = cpu_info()
    isa = f"; {' '.join(flags)}" if flags else ""
    return f"{platform.system()} {platform.machine()} ({name}{isa}), Python {platform.python_version()}"


def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """A function timing one call in ms: CUDA events on a GPU, perf_counter on the CPU."""
    import torch

    if device != "cpu":
        def cuda_time(call: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        return cuda_time

    def cpu_time(call: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        call()
        return (time.perf_counter() - t0) * 1e3
    return cpu_time


def time_interleaved(calls: dict[str, Callable[[], Any]], *, reps: int, warmup: int,
                     device: str = "cpu") -> dict[str, list[float]]:
    """Per-call times (ms) for each callable, repetitions interleaved and order alternated."""
    timer = _timer(device)
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(timer(calls[name]))
    return out


class _RssSampler:
    """Samples this process's RSS in a thread; the peak above the starting level is the cost."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.start_rss = self._proc.memory_info().rss
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start_rss) / 1e6


def peak_rss_delta_mb(call: Callable[[], Any], repeats: int = 3) -> float:
    """Peak RSS growth while running `call` a few times (activations, workspaces, caches)."""
    import gc

    gc.collect()
    with _RssSampler() as s:
        for _ in range(repeats):
            call()
    return round(max(s.delta_mb, 0.0), 3)


def process_peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3  # bytes on macOS, KiB on Linux


def _compiled(fn: Callable, inputs: tuple) -> tuple[Callable | None, str | None]:
    """torch.compile the callable and run it once; (None, reason) when that fails."""
    import torch

    try:
        compiled = torch.compile(fn)
        with torch.inference_mode():
            compiled(*inputs)
        return compiled, None
    except Exception as e:  # missing compiler, unsupported op, tensor subclass...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return None, f"torch.compile unavailable: {reason}"


def measure(models: dict[str, Callable], inputs: tuple, *, reps: int = 30, warmup: int = 5,
            compile: bool = False, device: str | None = None, memory: bool = True) -> LatencyReport:
    """Time each model on `inputs` (one batch), interleaved; optionally torch.compile too."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    if device != "cpu":
        models = {n: _to_device(m, device) for n, m in models.items()}
        inputs = tuple(t.to(device) for t in inputs)
        notes.append("timed with CUDA events on the GPU")
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    for name, fn in models.items():
        calls[(name, "eager")] = _bind(fn, inputs)
    if compile:
        for name, fn in models.items():
            compiled, why = _compiled(fn, inputs)
            if compiled is None:
                notes.append(f"{name}: {why}")
            else:
                calls[(name, "compile")] = _bind(compiled, inputs)
    with torch.inference_mode():
        times = time_interleaved({f"{n}|{m}": c for (n, m), c in calls.items()},
                                 reps=reps, warmup=warmup, device=device)
        mem = {}
        if memory and device == "cpu":
            for (name, mode), call in calls.items():
                mem[(name, mode)] = peak_rss_delta_mb(call)
        elif memory:
            for (name, mode), call in calls.items():
                torch.cuda.reset_peak_memory_stats()
                call()
                mem[(name, mode)] = torch.cuda.max_memory_allocated() / 1e6
            notes.append("memory on the GPU: peak allocated by torch (not RSS)")
    timings: dict[str, list[Timing]] = {n: [] for n in models}
    for (name, mode) in calls:
        ts = times[f"{name}|{mode}"]
        timings[name].append(Timing(mode=mode, median_ms=statistics.median(ts), p90_ms=percentile(ts, 90),
                                    p99_ms=percentile(ts, 99), min_ms=min(ts), reps=len(ts),
                                    peak_rss_delta_mb=mem.get((name, mode))))
    dev_name = "cpu" if device == "cpu" else torch.cuda.get_device_name(0)
    return LatencyReport(machine=machine_description(), device=dev_name, threads=torch.get_num_threads(),
                         batch_size=int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1,
                         warmup=warmup, timings=timings, process_peak_rss_mb=process_peak_rss_mb(),
                         notes=notes)


def _bind(fn: Callable, inputs: tuple) -> Callable[[], Any]:
    return lambda: fn(*inputs)


def _to_device(fn: Any, device: str) -> Any:
    """A copy on the device: nn.Module.to() moves in place, and the caller's model must not change."""
    import copy

    to = getattr(fn, "to", None)
    return copy.deepcopy(fn).to(device) if callable(to) else fn


# ------------------------------------------------------------------ Core ML (macOS only)
def coreml_available() -> tuple[bool, str]:
    """Whether .mlpackage files can be timed here, with the reason when not."""
    if sys.platform != "darwin":
        return False, (f"on-device timing is unavailable here: Core ML runs only on macOS "
                       f"(this machine runs {platform.system()}); the target figures are estimates")
    try:
        import coremltools  # noqa: F401
    except ImportError:
        return False, "on-device timing is unavailable: coremltools is not installed"
    return True, ""


def coreml_model(mlpackage: str, compute_units: str = "ALL") -> Any:
    """The .mlpackage loaded (compiled) by Core ML with the requested compute units (macOS only)."""
    from compressadvise.errors import Unavailable

    ok, why = coreml_available()
    if not ok:
        raise Unavailable(why)
    import coremltools as ct

    if compute_units not in COMPUTE_UNITS:
        raise Unavailable(f"unknown compute units {compute_units!r}", hint=f"use one of {', '.join(COMPUTE_UNITS)}")
    return ct.models.MLModel(mlpackage, compute_units=getattr(ct.ComputeUnit, compute_units))


def coreml_timing(mlpackage: str, inputs: dict[str, Any], *, compute_units: str = "ALL",
                  reps: int = 30, warmup: int = 5, model: Any = None) -> Timing:
    """Time an .mlpackage's predict() with the requested compute units (macOS only). `model`: one
    already loaded by `coreml_model`, so a caller that also reads its compute plan compiles it once."""
    model = model if model is not None else coreml_model(mlpackage, compute_units)
    ts = time_interleaved({"m": lambda: model.predict(inputs)}, reps=reps, warmup=warmup)["m"]
    return Timing(mode="coreml", median_ms=statistics.median(ts), p90_ms=percentile(ts, 90),
                  p99_ms=percentile(ts, 99), min_ms=min(ts), reps=len(ts))
