"""Run the real CLI in this process: the exit code, with the SIGINT handler put back after."""
from __future__ import annotations

import signal


def call_main(*args: object) -> int:
    from compressadvise.cli import main

    handler = signal.getsignal(signal.SIGINT)
    try:
        main([str(a) for a in args])
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        signal.signal(signal.SIGINT, handler)
