"""Options shared by several commands: one declaration each, so help, default, type and
validation are the same wherever an option appears (`tests/test_options.py` checks it)."""
from __future__ import annotations

import math
import re
from enum import Enum
from typing import Callable, Optional

import typer

from compressadvise.ui.cli_help import complete_target

DEFAULT_TARGET = "ane-a17"  # the target a command that makes a plan uses when none is given
MB = 1e6  # budgets are in MB of 10^6 bytes, like engine.MB and search.MB

MODEL_ARG = typer.Argument(
    None, metavar="MODEL",
    help="Model file (TorchScript, .pt2, state dict, .safetensors), or module:function, which "
    "imports and runs that Python code (a factory returning an nn.Module): only your own code; "
    "omit for the bundled example.",
)
TRUST_PICKLE = typer.Option(
    False, "--trust-pickle",
    help="Allow loading a full pickled nn.Module. This EXECUTES CODE stored in the file: "
    "only for files from people you trust.",
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
FORCE = typer.Option(False, "--force", help="Replace an existing --out (never the input model); for a "
                     "walkthrough: start over in a folder that already holds a session.")


class Data(str, Enum):
    """The data the user has; the engine's `data` fact (schema.Constraints.data)."""
    none = "none"
    calibration = "calibration"
    training = "training"


class ExecutorKind(str, Enum):
    """Where evaluations run (executors.EXECUTORS)."""
    process = "process"
    ray = "ray"
    serial = "serial"


def value_of(choice: Optional[Enum], default: Optional[str] = None) -> Optional[str]:
    """The plain string of a choice (library APIs and strict schemas take strings, not enums)."""
    return default if choice is None else str(choice.value)


# ------------------------------------------------------------------ names from the knowledge base
def check_name(kind: str, value: Optional[str], known: list[str], *, listing: str = "") -> Optional[str]:
    """A name typed on the command line: unknown is a usage error (exit 2), with a guess
    ('ane-a71' -> did you mean 'ane-a17'?); `listing` replaces a list too long to print."""
    from compressadvise.errors import did_you_mean

    if value is None or value in known:
        return value
    hint = did_you_mean(value, known)
    if listing:
        hint = hint.split("known: ")[0] + listing
    raise typer.BadParameter(f"unknown {kind} {value!r}; {hint}")


def _check_target(value: Optional[str]) -> Optional[str]:
    from compressadvise.knowledge.base import builtin

    return check_name("target", value, list(builtin().targets))


# ------------------------------------------------------------------ target and OS
TARGET = typer.Option(
    None, "--target", autocompletion=complete_target, callback=_check_target,
    help=f"Target profile (see `compressadvise targets`). Default: {DEFAULT_TARGET} where a plan is made "
    "(recommend, search, report, walkthrough); elsewhere none (no target limits, no target estimate).")
OS = typer.Option(None, "--os",
                  help="Minimum OS major version (iOS numbering, e.g. 17); default from the target profile.")


# ------------------------------------------------------------------ budgets
def check_budget(option: str, value: Optional[float], most: Optional[float] = None, *,
                 zero_ok: bool = False) -> Optional[float]:
    """A budget is a finite number > 0 (>= 0 with `zero_ok`), at most `most`: 7 as a size
    fraction, -1 or nan would otherwise run minutes of work towards a budget that means nothing."""
    from compressadvise.plan.budgets import out_of_range

    if value is None:
        return None
    if span := out_of_range(value, most, zero_ok):
        raise typer.BadParameter(f"{option} must be {span} (got {value:g})")
    return value


def _budget_check(option: str, most: Optional[float] = None, *, zero_ok: bool = False
                  ) -> Callable[[Optional[float]], Optional[float]]:
    """A click callback: a nonsense budget is a usage error (exit 2) while parsing, before any work."""
    def callback(value: Optional[float]) -> Optional[float]:
        return check_budget(option, value, most, zero_ok=zero_ok)
    return callback


MAX_SIZE_MB = typer.Option(None, "--max-size-mb", callback=_budget_check("--max-size-mb"),
                           help="Size budget in MB (10^6 bytes), > 0; omit for none.")
SIZE_FRACTION = typer.Option(None, "--size-fraction", callback=_budget_check("--size-fraction", 1.0),
                             help="Size budget as a fraction of the uncompressed (fp16) size, in (0, 1], e.g. 0.25.")
BITS_PER_WEIGHT = typer.Option(None, "--bits-per-weight", callback=_budget_check("--bits-per-weight", 32.0),
                               help="Size budget as average bits per parameter, in (0, 32].")
MAX_LATENCY_MS = typer.Option(None, "--max-latency-ms", callback=_budget_check("--max-latency-ms"),
                              help="Latency budget in ms per inference, > 0 (a roofline estimate on the target "
                              "until measured); omit for none.")
DEVICE_PROFILE = typer.Option(
    None, "--device-profile", metavar="FILE",
    help="Device profile (JSON: latencies measured on a device, from Xcode's Core ML performance report or "
    "`verify --write-device-profile`): calibrates the target's latency per op type; its target is used "
    "when --target is not given, and must match it otherwise (docs/device-profiles.md).")


def profile_target(path: Optional[str]) -> Optional[str]:
    """The target a --device-profile names (None without one): the default target for a command."""
    if not path:
        return None
    from compressadvise.measure.device_profile import load_device_profile

    return load_device_profile(path).target


MAX_ACCURACY_DROP = typer.Option(None, "--max-accuracy-drop",
                                 callback=_budget_check("--max-accuracy-drop", zero_ok=True),
                                 help="Tolerated accuracy drop in points (top-1 or your evaluator's 'accuracy'), >= 0; "
                                 "omit for none given.")


def size_budget_mb(total_bytes_fp16: int, total_params: int, *, max_size_mb: Optional[float] = None,
                   size_fraction: Optional[float] = None, bits_per_weight: Optional[float] = None) -> Optional[float]:
    """The one size budget the user gave, in MB: a fraction is of the fp16 size, bits are per parameter."""
    given = [o for o, v in (("--max-size-mb", max_size_mb), ("--size-fraction", size_fraction),
                            ("--bits-per-weight", bits_per_weight)) if v is not None]
    if len(given) > 1:
        raise typer.BadParameter(f"give one size budget, not {' and '.join(given)}")
    from compressadvise.plan.budgets import budget_bytes

    rel = budget_bytes(total_bytes_fp16, total_params, size_fraction=size_fraction, bits_per_weight=bits_per_weight)
    return max_size_mb if rel is None else rel / MB


# ------------------------------------------------------------------ data and samples
DATA = typer.Option(None, "--data",
                    help="Data you have for compression (default none): calibration unlocks W8A8 and "
                    "sensitive k-means, training unlocks QAT.")
SAMPLES = typer.Option(
    None, "--samples",
    help="Sample file (.npz/.pt/.safetensors with 'inputs', optional 'labels' and 'slices'), a folder of "
    "them, or 'bundled'. Without it: the bundled set for the bundled model; else random inputs where only "
    "outputs are compared (weak evidence, warned), and an error where a technique needs calibration data.")
INPUT_SHAPE = typer.Option(
    None, "--input-shape",
    help="Example input shape, e.g. 1,3,224,224 (or 1x3x224x224): for models without an example input; "
    "adds MACs and activation sizes to the facts and the latency estimate.")


MAX_SHAPE_ELEMENTS = 2 ** 28  # 1 GiB of float32 for one example input: beyond that it is a typo
_SHAPE = re.compile(r"\s*\d+(?:\s*(?:,|(?<=\d)x(?=\d))\s*\d+)*\s*", re.ASCII)
_SEPARATOR = re.compile(r"\s*[,x]\s*")


def parse_shape(text: str | None) -> list[int] | None:
    """`1,3,224,224` (or `1x3x224x224`) -> [1, 3, 224, 224]: positive integers only, and small
    enough to allocate. `x` only separates digits: `1,x,3` is refused, not read as [1, 3]."""
    if not text:
        return None
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    if not _SHAPE.fullmatch(text):
        raise typer.BadParameter(f"--input-shape must be positive integers separated by ',' like 1,3,224,224 "
                                 f"(got {shown})")
    parts = _SEPARATOR.split(text.strip())
    if any(len(p) > 12 for p in parts):  # int() refuses over 4300 digits; no dimension needs 13
        raise typer.BadParameter(f"--input-shape {shown} has a dimension of {max(map(len, parts))} digits: "
                                 "far too large to allocate")
    dims = [int(p) for p in parts]
    if 0 in dims:
        raise typer.BadParameter(f"--input-shape dimensions must be > 0 (got {shown})")
    n = math.prod(dims)
    if n > MAX_SHAPE_ELEMENTS:
        raise typer.BadParameter(f"--input-shape {shown} would allocate {n:,} floats ({n * 4 / 1e9:,.1f} GB); "
                                 f"at most {MAX_SHAPE_ELEMENTS:,} elements (one example input is enough)")
    return dims


def replay_hint(plan_path: str, model: Optional[str], *, trust_pickle: bool = False,
                input_shape: Optional[str] = None) -> str:
    """The `apply` that builds a plan just written, quoted so that it runs when pasted."""
    import shlex

    words = ["compressadvise", "apply", *([model] if model else []), "--plan", plan_path, "--out", "compressed"]
    words += ["--input-shape", input_shape] if input_shape else []
    words += ["--trust-pickle"] if trust_pickle else []
    return f"plan written to {plan_path}: replay with `{shlex.join(words)}`"


def progress_bar(description: str):
    """A Rich progress bar on stderr (so --json stdout stays clean); returns (ctx, callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from compressadvise.ui.render import err

    prog = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True)
    task = prog.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        prog.update(task, completed=done, total=total or None)

    return prog, update
