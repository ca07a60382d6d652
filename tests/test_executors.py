"""The Ray executor: silent on the user's terminal and on loopback (one start for every run of an
executor, and close(): tests/test_sensitivity.py::test_process_pool_and_ray_identical), and
--address to a cluster it did not start."""
from __future__ import annotations

import logging
import operator
import os
import re
import subprocess
import sys
import time

import pytest

from compressadvise.measure.executors import RayExecutor, SerialExecutor, make_executor

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'compressadvise[distributed]')")
psutil = pytest.importorskip("psutil")

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
NOISE = re.compile(r"\b(ray|raylet|gcs_server|token|auth)\b|started a local", re.I)


def _gcs_servers(root: psutil.Process) -> set[int]:
    pids = set()
    for p in root.children(recursive=True):
        try:
            if p.name().startswith("gcs_server"):
                pids.add(p.pid)
        except psutil.Error:
            pass
    return pids


def _listening(root: psutil.Process) -> set[str]:
    addrs = set()
    for p in [root, *root.children(recursive=True)]:  # Ray's processes all descend from the driver
        try:
            addrs |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return addrs


def test_serial_and_pool_close_is_a_no_op():
    SerialExecutor().close()
    make_executor("process", workers=2).close()


def test_cli_sensitivity_on_ray_is_quiet_and_on_loopback(tmp_path):
    """The bundled model on a local Ray instance: nothing from Ray on stdout or stderr, one
    gcs_server listening on loopback while it runs, none left after."""
    code = "from compressadvise.ui.cli import main; main()"
    cmd = [sys.executable, "-c", code, "sensitivity", "--executor", "ray", "--workers", "2", "--no-cache",
           "--layer", "fc", "--layer", "pw", "--techniques", "palettization:nbits=4|2", "--max-samples", "64"]
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    gcs: set[int] = set()
    listening: set[str] = set()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:  # the pipes hold a few lines only: no risk of filling them meanwhile
        try:
            gcs |= _gcs_servers(root)
            if gcs:
                listening |= _listening(root)
        except psutil.Error:
            break
        time.sleep(0.3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "4 evaluation(s) run (ray, 2 worker(s))" in out
    ours = "evaluation(s) run (ray, "
    noisy = [line for line in (out + err).splitlines() if ours not in line and NOISE.search(line)]
    assert not noisy, noisy
    assert len(gcs) == 1
    assert listening and all(a in LOOPBACK for a in listening), listening
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in gcs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_address_nothing_listens_at_fails_at_once():
    from compressadvise.errors import Unavailable

    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="cannot reach Ray"):
        make_executor("ray", address=f"127.0.0.1:{_free_port()}")
    assert time.monotonic() - t0 < 5


def test_address_joins_a_loopback_cluster_and_leaves_it_running():
    """`--address` to a cluster bound to loopback (Ray would otherwise dial this machine's routable
    address), with its token; close() disconnects and the cluster stays up."""
    if ray.is_initialized():
        ray.shutdown()
    port = _free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        root = psutil.Process(head.pid)
        deadline = time.monotonic() + 90
        # the GCS process exists a while before it listens: wait for the port, not the process
        while not (_gcs_servers(root) and _accepts(port)) and time.monotonic() < deadline:
            time.sleep(0.5)
        gcs = _gcs_servers(root)
        assert gcs and _accepts(port), "the test cluster did not start"
        ex = make_executor("ray", address=f"127.0.0.1:{port}")
        got: list[int] = []
        ex.run(operator.add, 1, [1, 2], lambda item, res: got.append(res))
        ex.close()
        assert sorted(got) == [2, 3] and ex.starts == 1 and not ray.is_initialized()
        assert _gcs_servers(root) == gcs and head.poll() is None  # still up
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        head.wait(timeout=60)
