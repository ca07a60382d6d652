"""A non-editable install must find the knowledge base and the bundled example."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_knowledge_and_example(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("compressadvise-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("playbooks", "techniques", "targets"):
        shipped = {n.rsplit("/", 1)[-1] for n in names if n.startswith(f"compressadvise/_knowledge/{kind}/")}
        in_repo = {p.name for p in (ROOT / kind).glob("*.yaml")}
        assert in_repo and shipped == in_repo, kind
    assert "compressadvise/examples/data/digits_cnn.safetensors" in names
    assert "compressadvise/examples/data/digits_eval.npz" in names
    # Installed elsewhere, the package resolves the copied knowledge, not the checkout.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("from compressadvise.knowledge.base import knowledge_root, load_knowledge\n"
            "root = knowledge_root(); k = load_knowledge()\n"
            "assert '_knowledge' in str(root), root\nprint(len(k.rules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) > 0


def test_api_functions_stay_callable_after_their_modules_load(monkeypatch):
    """`ca.verify` etc. are package functions whose modules live in stage folders
    (`compressadvise.measure.verify`): importing a module never rebinds the package attribute
    (with flat modules of the same name it once returned a module)."""
    import importlib

    import compressadvise as ca

    for name, module in (("apply", "backends.apply"), ("verify", "measure.verify"),
                         ("sensitivity", "measure.sensitivity"), ("search", "plan.search")):
        mod = importlib.import_module(f"compressadvise.{module}")
        monkeypatch.setattr(mod, name, lambda *a, **kw: ("called", a, kw))
        assert getattr(ca, name)(1, x=2) == ("called", (1,), {"x": 2}), name