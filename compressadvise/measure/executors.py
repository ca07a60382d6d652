"""Run one evaluation function over many items: in-process, on a local process pool, or on Ray.

Every executor calls the same module-level function `fn(context, item)`: the context (model,
samples, reference outputs...) is shipped to each worker once, items are small, and results
come back as they finish so the caller can cache each one at once (an interrupted run loses
only the evaluations in flight). Workers run torch single-threaded, so a pool of N workers
uses N cores and every executor computes bit-identical results.

Ray is optional (`pip install "compressadvise[distributed]"`): `RayExecutor(address=...)`
connects to an existing cluster (or starts a local one, on 127.0.0.1, when no address is given
and none is running) once for all its runs, and runs the function in actors that hold the
context. `close()` ends what an executor started; the process pool and serial ones hold nothing.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Protocol

from compressadvise.errors import Unavailable

EvalFn = Callable[[Any, Any], Any]
OnResult = Callable[[Any, Any], None]
EXECUTORS = ("process", "ray", "serial")


class Executor(Protocol):
    name: str
    workers: int

    def run(self, fn: EvalFn, context: Any, items: list[Any], on_result: OnResult) -> None:
        """Call on_result(item, fn(context, item)) for every item, in completion order."""


def _quiet_worker() -> None:
    """Single-threaded torch and no library chatter (tqdm bars, warnings) inside workers."""
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch

    torch.set_num_threads(1)


class SerialExecutor:
    """In this process: no start-up cost, for small jobs and debugging."""

    name = "serial"
    workers = 1

    def run(self, fn: EvalFn, context: Any, items: list[Any], on_result: OnResult) -> None:
        for item in items:
            on_result(item, fn(context, item))

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ process pool
_CONTEXT: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_ENV = "COMPRESSADVISE_PARENT_PID"  # the fork server's parent: the process that started it
_SERVER_PID = 0  # in the fork server: its own pid, the parent of every worker it forks


def _pdeathsig() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        import signal

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)  # orphaned: nobody reads our results, and we hold the caller's pipes open


def die_with_parent(parent: int, *, watchdog: bool = True, pdeathsig: bool = True) -> None:
    """End this process as soon as `parent` dies (even by SIGKILL, which runs no clean-up), so
    that a killed caller leaves no fork server or workers behind holding ~1 GB and its stdout/
    stderr pipes. PR_SET_PDEATHSIG on Linux, plus a thread polling getppid() as the portable
    fallback; the check after prctl covers a parent that died before it was set."""
    armed = pdeathsig and _pdeathsig()
    if os.getppid() != parent:
        os._exit(1)
    if watchdog or not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="compressadvise-parent-watch",
                         daemon=True).start()


def _init_worker(payload: bytes, path: list[str], owner: int = 0) -> None:
    import pickle
    import signal

    # A worker's parent is the fork server (or, under spawn, the caller: `owner`).
    die_with_parent(_SERVER_PID or owner or os.getppid())
    # Ctrl-C goes to the whole process group: the parent decides (it stops the workers), so
    # workers ignore it instead of printing their own tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path[:] = list(dict.fromkeys([*path, *sys.path]))  # models defined next to the caller
    _quiet_worker()
    _CONTEXT["value"] = pickle.loads(payload)


def _call(fn: EvalFn, item: Any) -> tuple[Any, Any]:
    return item, fn(_CONTEXT["value"], item)


PRELOAD = ["compressadvise.measure.executors", "torch", "coremltools.optimize.torch.palettization",
           "coremltools.optimize.torch.quantization", "compressadvise.measure.sensitivity"]
WORKER_ENV = "COMPRESSADVISE_WORKER"


def _mp_context() -> Any:
    """A fork server that imported torch and coremltools once: every later worker is a cheap fork
    of it (a clean, single-threaded process, unlike a fork of this one). Spawn where there is
    no fork server (Windows)."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    # The server quiets library chatter as it preloads, and dies with this process (see below).
    # PR_SET_PDEATHSIG fires when the parent *thread* ends: only the main thread may arm it.
    main_thread = threading.current_thread() is threading.main_thread()
    env = {WORKER_ENV: "1", PARENT_ENV: f"{os.getpid()}:{'thread' if main_thread else 'watch'}"}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        forkserver.ensure_running()
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


class ProcessExecutor:
    """A local pool of `workers` processes forked from a preloaded fork server. At most
    2 x workers items are in flight, so Ctrl-C stops quickly."""

    name = "process"

    def __init__(self, workers: int | None = None):
        self.workers = max(1, int(workers or os.cpu_count() or 1))

    def run(self, fn: EvalFn, context: Any, items: list[Any], on_result: OnResult) -> None:
        import pickle

        if not items:
            return
        # Plain pickle, by value: multiprocessing's own pickler would hand torch tensors over in
        # shared memory, and workers swapping weights in place would then see each other's swaps.
        payload = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(items)), mp_context=_mp_context(),
                                   initializer=_init_worker, initargs=(payload, list(sys.path), os.getpid()))
        pending: set[Future] = set()
        queue = iter(items)
        try:
            for item in queue:
                pending.add(pool.submit(_call, fn, item))
                if len(pending) >= 2 * self.workers:
                    break
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    item, result = fut.result()
                    on_result(item, result)
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.add(pool.submit(_call, fn, nxt))
        except BrokenProcessPool as e:
            _stop(pool)
            raise Unavailable("a worker process died (out of memory, or a script without an "
                              "`if __name__ == \"__main__\":` guard started the pool)",
                              hint="use --workers 1 to evaluate in this process") from e
        except BaseException:  # Ctrl-C or an error: stop now; finished results are already cached
            _stop(pool)
            raise
        pool.shutdown(wait=True)

    def close(self) -> None:
        pass  # each run's pool ends with the run (the fork server ends with this process)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel queued items and end this pool's own worker processes (not waiting for in-flight ones)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()


# ------------------------------------------------------------------ Ray
def _ray():
    try:
        import ray
    except ImportError as e:
        raise Unavailable("the Ray executor needs the optional 'ray' package",
                          hint='pip install "compressadvise[distributed]"') from e
    return ray


def _by_value(ray: Any, context: Any) -> None:
    """Ship the classes of an in-memory model by value when remote workers cannot import them
    (a model defined in a script or a test file rather than an installed package)."""
    model = getattr(context, "model", None)
    modname = getattr(type(model), "__module__", "") if model is not None else ""
    mod = sys.modules.get(modname)
    if not mod or modname.startswith(("torch", "compressadvise")) or modname == "__main__":
        return
    path = getattr(mod, "__file__", "") or ""
    if "site-packages" in path or "dist-packages" in path:
        return
    try:
        ray.cloudpickle.register_pickle_by_value(mod)
    except (ValueError, AttributeError):
        pass


class _ActorBody:
    """One Ray actor: holds the current run's context, evaluates items. Actors live as long as
    their executor, so each run only ships its context (`load`), not a fresh worker's imports."""

    def __init__(self) -> None:
        import importlib

        _quiet_worker()
        for name in PRELOAD:  # now, while the caller prepares, rather than on the first evaluation
            try:
                importlib.import_module(name)
            except ImportError:  # as the fork server does: the evaluation reports what is missing
                pass
        self.context: Any = None

    def load(self, context: Any) -> None:
        self.context = context

    def call(self, fn: EvalFn, item: Any) -> tuple[Any, Any]:
        return item, fn(self.context, item)


LOOPBACK = "127.0.0.1"
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR


@contextmanager
def _loopback(ray: Any) -> Iterator[None]:
    """On Linux Ray swaps a loopback node address for the host's routable one ("cluster mode")
    and its gRPC servers then listen on every interface. With cluster mode off while it starts,
    the node address stays 127.0.0.1 and Ray's servers bind to loopback only."""
    consts = getattr(getattr(ray, "_private", None), "ray_constants", None)
    flag = getattr(consts, "ENABLE_RAY_CLUSTER", None)
    env = os.environ.get(CLUSTER_ENV)
    os.environ[CLUSTER_ENV] = "0"  # for the processes it starts, which read it on import
    if flag is not None:
        consts.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if flag is not None:
            consts.ENABLE_RAY_CLUSTER = flag
        if env is None:
            os.environ.pop(CLUSTER_ENV, None)
        else:
            os.environ[CLUSTER_ENV] = env


def _local_token() -> None:
    """Token authentication on when this machine holds a token (as Ray does for "auto")."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _host_port(address: str) -> tuple[str, int] | None:
    """("host", port) of "HOST:PORT" or "ray://HOST:PORT"; None for "auto" and the like."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    return (host.strip("[]"), int(port)) if host and port.isdigit() else None


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail now on an address nothing listens at: ray.init would retry it for minutes."""
    import socket

    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=timeout_s).close()
    except OSError as e:
        raise Unavailable(f"cannot reach Ray at {address}: {e.strerror or e}",
                          hint="check the address (HOST:PORT of the head node's GCS, as `ray start --head` "
                               "printed it) and that the cluster is up") from e


class RayExecutor:
    """Runs the evaluation function in `workers` Ray actors (default: the cluster's CPUs).

    `address`: an existing cluster ("HOST:PORT" or "auto"); None reuses the Ray instance this
    process already started, or starts a local one bound to 127.0.0.1. Ray starts on the first
    run and every later run of this executor reuses it and its actors; `close()` (or the end of
    the process) stops the actors and shuts down a local instance this executor started (from
    a cluster it connected to it only disconnects). Ray's log lines stay off the user's
    terminal: only its errors show.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None):
        self.address = address
        self.requested = int(workers or 0)
        self.starts = 0  # ray.init calls: one per executor however many runs it serves
        self._ray: Any = None
        self._inited = False  # this executor called ray.init (so it calls ray.shutdown)
        self._actors: list[Any] = []
        self._cpus = 0
        self._log_level: int | None = None

    @property
    def workers(self) -> int:
        """Actors in use; before Ray starts, what it will use (read to size tasks)."""
        if self._actors:
            return len(self._actors)
        return self.requested or self._cpus or os.cpu_count() or 1

    @property
    def warm(self) -> bool:
        return bool(self._ray is not None and self._ray.is_initialized())

    def _connect(self, ray: Any) -> None:
        kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        try:
            if self.address:
                _check_reachable(self.address)
                hp = _host_port(self.address)
                local = bool(hp and _is_loopback(hp[0]))
                # Ray would replace a loopback host by this machine's routable address, where a
                # cluster bound to loopback does not listen; and only a local cluster's token is ours.
                with _loopback(ray) if local else nullcontext():
                    if local:
                        _local_token()
                    ray.init(address=self.address, **kwargs)
            else:  # as many CPUs as workers asked for, like the pool (actors need one each)
                cpus = max(self.requested, os.cpu_count() or 1)
                with _loopback(ray):
                    ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK,
                             num_cpus=cpus, **kwargs)
        except Unavailable:
            raise
        except Exception as e:  # connection refused, version mismatch...
            raise Unavailable(f"cannot connect to Ray at {self.address or 'a new local instance'}: "
                              f"{str(e).splitlines()[0][:200]}") from e
        self._inited = True
        self.starts += 1

    def start(self) -> Any:
        """Start (or connect to) Ray once; later calls return it. Returns the ray module."""
        if self.warm:
            return self._ray
        ray = _ray()
        self._actors = []  # from an instance someone shut down since
        self._quiet(True)
        if not ray.is_initialized():
            try:
                self._connect(ray)
            except Unavailable:
                self._quiet(False)
                raise
        self._cpus = int(ray.cluster_resources().get("CPU", 1))
        self._ray = ray
        atexit.register(self.close)
        if self._inited and not self.address:  # our own instance: its actors start (and import) meanwhile
            self._pool(ray, self.requested or self._cpus)
        return ray

    def _quiet(self, on: bool) -> None:
        """Only errors from Ray's loggers while it serves us (e.g. not its token-authentication notice)."""
        logger = logging.getLogger("ray")
        if on and self._log_level is None:
            self._log_level = logger.level
            logger.setLevel(logging.ERROR)
        elif not on and self._log_level is not None:
            logger.setLevel(self._log_level)
            self._log_level = None

    def _pool(self, ray: Any, items: int) -> list[Any]:
        """The first n actors (started once, kept for later runs); n never above the cluster's CPUs."""
        n = max(1, min(self.requested or self._cpus, self._cpus, items))
        actor_cls = ray.remote(num_cpus=1)(_ActorBody)
        while len(self._actors) < n:
            self._actors.append(actor_cls.remote())
        return self._actors[:n]

    def run(self, fn: EvalFn, context: Any, items: list[Any], on_result: OnResult) -> None:
        if not items:
            return
        ray = self.start()
        _by_value(ray, context)
        actors = self._pool(ray, len(items))
        ctx_ref = ray.put(context)
        for actor in actors:  # runs before their calls below: one caller's actor calls keep their order
            actor.load.remote(ctx_ref)
        try:
            self._drive(ray, actors, fn, items, on_result)
        except BaseException:  # Ctrl-C or an error: abandon the calls in flight with their actors
            self._kill()
            raise

    @staticmethod
    def _drive(ray: Any, actors: list[Any], fn: EvalFn, items: list[Any], on_result: OnResult) -> None:
        """Two items in flight per actor; each finished one hands its actor the next."""
        queue = iter(items)
        pending: dict[Any, Any] = {}
        for actor in actors:
            for _ in range(2):
                item = next(queue, None)
                if item is not None:
                    pending[actor.call.remote(fn, item)] = actor
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(done[0])
            item, result = ray.get(done[0])
            on_result(item, result)
            nxt = next(queue, None)
            if nxt is not None:
                pending[actor.call.remote(fn, nxt)] = actor

    def _kill(self) -> None:
        for actor in self._actors:
            try:
                self._ray.kill(actor)
            except Exception:  # already gone with its node
                pass
        self._actors = []

    def close(self) -> None:
        """Stop the actors; shut Ray down if this executor started it. Safe to call twice."""
        atexit.unregister(self.close)
        if self.warm:
            self._kill()
            if self._inited:
                self._ray.shutdown()
        self._ray, self._inited, self._actors = None, False, []
        self._quiet(False)

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_executor(kind: str = "process", *, workers: int | None = None, address: str | None = None,
                  items: int | None = None) -> Executor:
    """An executor by name. `process` with one worker (or one item) runs in this process."""
    if kind not in EXECUTORS:
        raise Unavailable(f"unknown executor {kind!r}", hint=f"one of {', '.join(EXECUTORS)}")
    if kind == "ray":
        _ray()
        if address:
            _check_reachable(address)  # before the caller loads a model for minutes
        return RayExecutor(address=address, workers=workers)
    if kind == "serial" or (workers or os.cpu_count() or 1) <= 1 or (items is not None and items <= 1):
        return SerialExecutor()
    return ProcessExecutor(workers)


if os.environ.get(WORKER_ENV) == "1":  # imported by the fork server: keep its preloads quiet
    _pid, _, _how = os.environ.pop(PARENT_ENV, "").partition(":")
    if _pid.isdigit():
        _SERVER_PID = os.getpid()
        # No watchdog thread where prctl works: the server forks every worker, best done single-threaded.
        die_with_parent(int(_pid), watchdog=False, pdeathsig=_how == "thread")
    _quiet_worker()
