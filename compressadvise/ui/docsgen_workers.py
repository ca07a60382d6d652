"""Docs generator: the worker processes that run the documented commands, one scratch folder per page."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from compressadvise.ui.docsgen_blocks import DocsError, Job
from compressadvise.ui.docsgen_firing import firing_examples

WIDTH = 100  # what the site's code column shows without scrolling; tables wrap, words stay whole


def _worker() -> None:
    """Entry of a worker process: argv[1] = request file, argv[2] = result file.

    One process runs several pages (torch is imported once), each in its own scratch folder.
    """
    req_path, res_path = sys.argv[1], sys.argv[2]
    req = json.loads(Path(req_path).read_text())
    result: dict[str, Any] = {"pages": {}, "firing": firing_examples() if req.get("scenarios") else None}
    for i, (page, steps) in enumerate(req["pages"].items()):
        cwd = Path(req["scratch"]) / str(i)
        cwd.mkdir(parents=True)
        os.chdir(cwd)
        runs = [r for r in (_run_step(s) for s in steps) if r is not None]
        for r in runs:  # scratch paths mean nothing to a reader
            for key in ("stdout", "stderr"):
                r[key] = r[key].replace(str(cwd) + os.sep, "").replace(str(cwd), ".")
        result["pages"][page] = runs
    Path(res_path).write_text(json.dumps(result))


def _run_step(step: dict) -> dict | None:
    import contextlib
    import runpy
    import signal

    if "file" in step:
        path = Path(step["file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(step["content"])
        return None
    argv = [_resolve(w) for w in step["argv"]]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sigint = signal.getsignal(signal.SIGINT)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if argv[0] == "cat":
                out.write(Path(argv[1]).read_text())
            elif argv[0] == "python":
                saved, sys.argv = sys.argv, argv[1:]
                try:
                    runpy.run_path(argv[1], run_name="__main__")
                finally:
                    sys.argv = saved
            else:
                from compressadvise.ui.cli import main

                main(argv[1:])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # a failing example script: report it like a failing command
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            signal.signal(signal.SIGINT, sigint)
    return {"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _resolve(word: str) -> str:
    """`{plan_rule}`: the rule that chose the first step of ./plan.yaml (written by an earlier
    block), so a page can explain a rule that really fired instead of naming a code by hand."""
    if word != "{plan_rule}":
        return word
    import yaml

    plan = yaml.safe_load(Path("plan.yaml").read_text())
    codes = [c for s in plan.get("steps", []) for c in s.get("rules", [])]
    codes += [a["code"] for a in plan.get("advisories", [])]
    if not codes:
        raise DocsError("{plan_rule}: plan.yaml has no step or advisory")
    return codes[0]


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE")}
    env.update(COLUMNS=str(WIDTH), COMPRESSADVISE_WIDTH=str(WIDTH), LINES="50", NO_COLOR="1", TERM="dumb", PYTHONHASHSEED="0",
               PYTHONWARNINGS="ignore")
    return env


def run_worker(pages: dict[str, list[dict]], scenarios: bool = False, timeout: int = 600) -> dict:
    """Run pages' steps (and the firing scenarios) in one fresh interpreter."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="docsgen-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps({"pages": pages, "scenarios": scenarios, "scratch": str(Path(tmp) / "work")}))
        try:
            entry = f"from {__name__} import _worker; _worker()"
            proc = subprocess.run([sys.executable, "-c", entry, str(req), str(res)], env=_worker_env(),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DocsError(f"docs worker for {', '.join(pages) or 'the firing scenarios'} ran over "
                            f"{timeout} s") from None
        if proc.returncode != 0 or not res.exists():
            raise DocsError(f"docs worker failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
        out = json.loads(res.read_text())
        out["seconds"] = round(time.monotonic() - start, 1)
        return out


STEP_COST = {"apply": 10, "verify": 5, "python": 2}  # rough CPU seconds, to balance the workers
SCENARIO_COST = 12


def _cost(job: Job) -> int:
    words = [s["argv"][1] if s["argv"][0] == "compressadvise" and len(s["argv"]) > 1 else s["argv"][0]
             for s in job.steps if "argv" in s]
    return sum(STEP_COST.get(w, 1) for w in words)


def run_all(jobs: list[Job], workers: int) -> tuple[dict[str, list[dict]], dict]:
    """Spread the pages over `workers` processes by estimated cost (largest first); the firing
    scenarios go to the first one."""
    groups: list[dict[str, list[dict]]] = [{} for _ in range(max(1, workers))]
    load = [SCENARIO_COST] + [0] * (len(groups) - 1)
    for job in sorted(jobs, key=lambda j: (-_cost(j), j.page)):
        i = load.index(min(load))
        groups[i][job.page] = job.steps
        load[i] += _cost(job)
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        futures = [pool.submit(run_worker, g, i == 0) for i, g in enumerate(groups) if g or i == 0]
        outs = [f.result() for f in futures]
    results = {page: runs for out in outs for page, runs in out["pages"].items()}
    for out in outs:
        print(f"docsgen worker: {out['seconds']} s for {', '.join(out['pages']) or '-'}"
              + (" + firing scenarios" if out["firing"] is not None else ""), file=sys.stderr)
    return results, outs[0]["firing"]
