"""Training data for training-aware steps (DKM palettization, QAT, gradual pruning), and the loop.

A training hook is `module:function` (given with `--train`; importing it runs your code) that
returns a `Training`, or a dict with the same keys:

    def train():
        return {"loader": DataLoader(ds, batch_size=64, shuffle=True),  # batches: (inputs, target)
                "loss": torch.nn.functional.cross_entropy,               # (output, target) -> scalar
                "optimizer": lambda params: torch.optim.SGD(params, lr=1e-3),  # optional
                "steps": 500}                                              # optional

`bundled` trains the bundled digits model on the training split its weights came from (never
the held-out samples `--samples bundled` evaluates on).

The loop (`fit`) writes a checkpoint every `every` optimizer steps into a folder beside the
output (`.OUT.resume/`, removed when apply succeeds), so an interrupted run continues with
`--resume`. Checkpoints hold tensors and numbers only and are read with
`torch.load(weights_only=True)`: resuming never runs code from a file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from compressadvise.errors import InvalidKnowledge

BUNDLED = "bundled"
CHECKPOINT_EVERY_S = 30.0  # at most this long between checkpoints (and every `every` steps)


@dataclass
class Training:
    """What a training step needs: batches of (inputs, target), a loss, optionally an optimizer and a step count."""

    loader: Iterable[Any]
    loss: Callable[[Any, Any], Any] | None = None  # (output, target) -> scalar; default cross-entropy / MSE
    optimizer: Callable[[Iterable[Any]], Any] | None = None  # params -> torch.optim.Optimizer; default Adam
    steps: int | None = None  # overrides the technique's `steps`
    source: str = ""


def load_training(spec: str | Training) -> Training:
    """`bundled`, or `module:function` (imported and called: user code) -> a checked Training."""
    if isinstance(spec, Training):
        return spec
    if str(spec) == BUNDLED:
        return bundled()
    from compressadvise.model.loading import import_callable

    fn = import_callable(str(spec), "training hook")
    try:
        got = fn()
    except Exception as e:
        raise InvalidKnowledge(f"training hook {spec} raised {type(e).__name__}: {e}") from e
    if isinstance(got, dict):
        unknown = set(got) - {"loader", "loss", "optimizer", "steps"}
        if unknown or "loader" not in got:
            raise InvalidKnowledge(f"training hook {spec} returned a dict with keys {sorted(got)}",
                                   hint="it needs 'loader' and may have 'loss', 'optimizer', 'steps'")
        got = Training(**got)
    if not isinstance(got, Training):
        raise InvalidKnowledge(f"training hook {spec} returned {type(got).__name__}, not a dict or Training")
    _check(got, str(spec))
    got.source = str(spec)
    return got


def _check(t: Training, spec: str) -> None:
    if not hasattr(t.loader, "__iter__"):
        raise InvalidKnowledge(f"training hook {spec}: 'loader' is {type(t.loader).__name__}, not iterable")
    for key in ("loss", "optimizer"):
        if getattr(t, key) is not None and not callable(getattr(t, key)):
            raise InvalidKnowledge(f"training hook {spec}: {key!r} must be callable")
    if t.steps is not None and (not isinstance(t.steps, int) or t.steps < 1):
        raise InvalidKnowledge(f"training hook {spec}: 'steps' must be a positive integer (got {t.steps!r})")


def bundled(batch_size: int = 64, seed: int = 0) -> Training:
    """The digits training split (1,437 images), shuffled batches of 64, cross-entropy."""
    import torch

    from compressadvise.examples import digits

    x, y = digits.train_split()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)

    class Batches:  # re-iterable: a fresh shuffle per pass, reproducible from the seed
        def __init__(self) -> None:
            self.gen = torch.Generator().manual_seed(seed)

        def __iter__(self):
            perm = torch.randperm(len(xs), generator=self.gen)
            for i in range(0, len(xs), batch_size):
                idx = perm[i:i + batch_size]
                yield xs[idx], ys[idx]

    return Training(loader=Batches(), loss=torch.nn.functional.cross_entropy,
                    source="bundled digits training split (1,437 images; the 360 held-out never seen)")


def default_loss(output: Any, target: Any) -> Any:
    import torch

    if not target.is_floating_point() and output.dim() >= 2:
        return torch.nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))
    return torch.nn.functional.mse_loss(output, target.to(output.dtype))


@dataclass
class TrainingRun:
    """What apply hands the training steps: the data, where checkpoints go, and what each step did."""

    spec: Training
    checkpoints: "Checkpoints | None" = None
    results: dict[int, dict[str, Any]] = field(default_factory=dict)  # plan step index -> fit summary


# ====================================================================== checkpoints
class Checkpoints:
    """One step's checkpoint beside the output: `.OUT.resume/step{N}.pt` + `.json` (what it is for)."""

    def __init__(self, out: str | Path, key: str, resume: bool) -> None:
        out = Path(out)
        self.folder = out.parent / f".{out.name}.resume"
        self.key, self.resume = key, resume

    def path(self, step: int) -> Path:
        return self.folder / f"step{step + 1}.pt"

    def load(self, step: int, meta: dict[str, Any]) -> dict[str, Any] | None:
        """The saved state for plan step `step` when resuming and one exists for this plan and model."""
        side = self.path(step).with_suffix(".json")
        if not self.resume or not self.path(step).is_file() or not side.is_file():
            return None  # (a run killed between the two writes of its first checkpoint: nothing to resume)
        import torch

        try:
            info = json.loads(side.read_text())
        except ValueError as e:
            raise InvalidKnowledge(f"{side}: unreadable checkpoint record ({e})",
                                   hint=f"drop --resume to start over, or remove {self.folder}") from e
        if info.get("key") != self.key or any(info.get(k) != v for k, v in meta.items()):
            raise InvalidKnowledge(f"{self.path(step)} is a checkpoint of another plan, model or step "
                                   f"({info.get('technique')}, {info.get('total')} steps)",
                                   hint=f"drop --resume to start over, or remove {self.folder}")
        return torch.load(str(self.path(step)), weights_only=True, map_location="cpu")

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(step).with_suffix(".pt.part")
        torch.save(state, str(tmp))
        os.replace(tmp, self.path(step))  # a kill mid-write leaves the previous checkpoint whole
        from compressadvise.fsutil import write_text_atomic

        write_text_atomic(self.path(step).with_suffix(".json"),
                          json.dumps({"key": self.key, **meta, "done": state["done"]}) + "\n")

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def checkpoint_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# ====================================================================== the loop
@dataclass
class FitResult:
    steps: int
    resumed_from: int
    first_loss: float | None
    last_loss: float | None
    seconds: float


def fit(model: Any, training: Training, *, steps: int, lr: float, label: str, every: int = 50,
        on_step: Callable[[], None] | None = None, progress: Callable[[str, int, int], None] | None = None,
        checkpoints: Checkpoints | None = None, index: int = 0, meta: dict[str, Any] | None = None) -> FitResult:
    """Train `model` (already prepared by the compressor) for `steps` optimizer steps.

    `on_step` runs after every optimizer step (the compressor's schedule: palettizer/pruner
    `.step()`); on resume it is replayed for the steps already done, so schedules continue."""
    import torch

    opt = training.optimizer(model.parameters()) if training.optimizer else torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = training.loss or default_loss
    meta = {"technique": label, "total": steps, **(meta or {})}
    done = _restore(model, opt, checkpoints, index, meta, on_step, training.loader)
    resumed_from, first, last, ema = done, None, None, None
    started = saved_at = time.perf_counter()
    model.train()
    try:
        for inputs, target in _batches(training.loader, steps - done):
            out = model(*inputs)
            loss = loss_fn(out, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if on_step is not None:
                on_step()
            value = float(loss.detach())
            first = value if first is None else first
            last, ema = value, value if ema is None else 0.9 * ema + 0.1 * value
            if progress is not None:
                progress(f"{label}: step {done}/{steps}, loss {ema:.4f}, "
                         f"ETA {_eta(started, done - resumed_from, steps - done)}", done, steps)
            if checkpoints is not None and (done % every == 0 or time.perf_counter() - saved_at > CHECKPOINT_EVERY_S):
                _save(checkpoints, index, model, opt, done, steps, meta)
                saved_at = time.perf_counter()
    except BaseException as e:  # Ctrl-C: KeyboardInterrupt, or the CLI's Interrupted (a BaseException)
        if checkpoints is not None and not isinstance(e, Exception):
            _say(f"training interrupted at step {done}/{steps}; the last checkpoint is in {checkpoints.folder}: "
                 "rerun the same command with --resume to continue from it")
        raise
    model.eval()
    if checkpoints is not None:
        _save(checkpoints, index, model, opt, done, steps, meta)
    return FitResult(steps=done, resumed_from=resumed_from, first_loss=first, last_loss=last,
                     seconds=round(time.perf_counter() - started, 2))


def _restore(model: Any, opt: Any, checkpoints: Checkpoints | None, index: int, meta: dict[str, Any],
             on_step: Callable[[], None] | None, loader: Iterable[Any]) -> int:
    state = checkpoints.load(index, meta) if checkpoints is not None else None
    if state is None:
        return 0
    import torch

    # A compressor sets up part of its state on the first forward pass (DKM's partitions), and
    # load_state_dict expects it there: one pass without gradients, then the saved state over it.
    model.train()
    with torch.no_grad():
        for inputs, _ in _batches(loader, 1):
            model(*inputs)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    done = int(state["step"])
    for _ in range(done):  # the compressor's own schedule counters are not in the state dict
        if on_step is not None:
            on_step()
    return done


def _save(checkpoints: Checkpoints, index: int, model: Any, opt: Any, done: int, steps: int,
          meta: dict[str, Any]) -> None:
    import torch

    checkpoints.save(index, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done,
                             "rng": torch.get_rng_state(), "done": done >= steps}, meta)


def _batches(loader: Iterable[Any], n: int) -> Iterable[tuple[tuple, Any]]:
    """`n` batches, passing over the loader as many times as needed; inputs always a tuple."""
    given = 0
    while given < n:
        empty = True
        for batch in loader:
            empty = False
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise InvalidKnowledge(f"a training batch must be (inputs, target); got {type(batch).__name__}"
                                       + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
            inputs, target = batch
            yield (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target
            given += 1
            if given >= n:
                return
        if empty:
            raise InvalidKnowledge("the training loader yielded no batches")


def _eta(started: float, done: int, left: int) -> str:
    if done <= 0:
        return "?"
    s = (time.perf_counter() - started) / done * left
    return f"{math.ceil(s)} s" if s < 120 else f"{s / 60:.1f} min"


def _say(message: str) -> None:
    stream = sys.__stderr__ or sys.stderr  # backends run with sys.stderr redirected (library noise)
    stream.write(message + "\n")
    stream.flush()
