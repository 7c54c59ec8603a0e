"""Fault injection for tests: off unless the process was started with REFIT_FAULT_INJECTION=1.

The fault campaign (`harness.faults`) and the reliability tests start their trainer and
engine processes with ``REFIT_FAULT_INJECTION=1`` and then arm a fault per rank: `hook(kind,
at)` is a `RefitRank.on_phase` callback that, when a phase whose name contains `at` starts,
raises (``"raise"``), ends the process (``"exit"``) or sleeps (``"sleep:S"``). In any other
process the switches that would arm one refuse (`enabled` is False), so nothing reachable in
production can end or stall a rank.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

__all__ = ["ENV", "enabled", "hook"]

ENV = "REFIT_FAULT_INJECTION"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def hook(kind: str, at: str) -> Callable[[str], None]:
    if not enabled():
        raise RuntimeError(f"fault injection is disabled in this process (set {ENV}=1 in tests)")

    def on_phase(phase: str) -> None:
        if at not in phase:
            return
        if kind == "raise":
            raise RuntimeError(f"injected fault in {phase}")
        if kind == "exit":
            os._exit(17)
        if kind.startswith("sleep:"):
            time.sleep(float(kind.split(":", 1)[1]))

    return on_phase
