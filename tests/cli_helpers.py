"""Run the real CLI in this process: the exit code, with the SIGINT handler put back after."""
from __future__ import annotations

import signal


def call_main(*args: object) -> int:
    from compressadvise.ui.cli import main

    handler = signal.getsignal(signal.SIGINT)
    try:
        main([str(a) for a in args])
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        signal.signal(signal.SIGINT, handler)


def run_captured(capsys, *args: object) -> tuple[int, str, str]:
    """`call_main` with the output captured: (exit code, stdout, stderr)."""
    code = call_main(*args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err
