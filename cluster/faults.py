"""Failpoints: named places in the workers where a test (or an operator rehearsing an outage)
injects a stall or an error, e.g. ``prefill.set_fault.remote(Fault("stage", "stall", 10))``.
Off unless set; each fault fires ``count`` times, then clears itself."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Literal, get_args

# prefill worker: running a prefill, staging a transfer's payload, sending it
Point = Literal["prefill", "stage", "send"]
Kind = Literal["stall", "fail"]


class InjectedFault(RuntimeError):
    """Raised at a failpoint set to ``fail``."""


@dataclass(frozen=True)
class Fault:
    point: Point
    kind: Kind
    seconds: float = 0.0  # how long a stall lasts
    count: int = 1

    def __post_init__(self) -> None:
        if self.point not in get_args(Point) or self.kind not in get_args(Kind):
            raise ValueError(f"fault point must be one of {get_args(Point)} and kind one of "
                             f"{get_args(Kind)}; got {self.point!r}, {self.kind!r}")
        if self.seconds < 0 or self.count < 1:
            raise ValueError("fault seconds must be >= 0 and count >= 1")


class Failpoints:
    """The faults set on one worker process."""

    def __init__(self) -> None:
        self._faults: dict[str, list] = {}  # point -> [fault, remaining]
        self._lock = threading.Lock()

    def set(self, fault: Fault) -> None:
        with self._lock:
            self._faults[fault.point] = [fault, fault.count]

    def hit(self, point: Point) -> None:
        """Called by the worker at ``point``: stalls or raises when a fault is set there."""
        with self._lock:
            entry = self._faults.get(point)
            if entry is None:
                return
            fault = entry[0]
            entry[1] -= 1
            if entry[1] == 0:
                del self._faults[point]
        if fault.kind == "stall":
            time.sleep(fault.seconds)
        else:
            raise InjectedFault(f"injected fault at {point}")
