"""Fault injection for the stand-in: seeded, switchable at run time, targeted by route kind.

A :class:`Fault` matches a request by route kind (``"any"`` or one or more of :data:`ROUTE_KINDS`), optionally
by method and a path substring. A matching request *fires* the fault with probability ``rate`` (drawn from the
fault's own ``random.Random`` seeded from the server seed and the fault's number, so a given request order
always gives the same faults) until ``times`` firings are used up (None: no limit).

Kinds:

- ``"status"``: answer ``status`` (default 503) instead of handling the request. 500 has Django's plain
  "Server Error (500)" page; 502/503/504 an nginx-like HTML page (as a proxy in front of CVAT sends).
- ``"throttle"``: 429 with ``Retry-After: <retry_after>`` and DRF's throttling ``{"detail"}``.
- ``"delay"``: sleep ``delay`` seconds, then answer normally (delays combine with one other fault).
- ``"reset"``: close the connection without sending any response.
- ``"drop"``: send the status line, the headers and ``fraction`` of the body, then close (a chunked download
  stays chunked and ends without its final chunk).
- ``"truncate"``: send ``Content-Length`` of the whole body (also for downloads that are normally chunked),
  only ``fraction`` of it, then close.
- ``"export_fail"``: an export request created by a matching request (route kind ``export``), or a
  task-creation request created by a matching ``POST /api/tasks/{id}/data`` (route kind ``create``), ends
  ``failed`` with ``message`` when polled to completion.
- ``"tamper"`` (a hostile server): the request is handled normally, then ``transform`` rewrites the response
  body: a JSON body is decoded and ``transform(data)`` returns what to send instead (e.g. a job with
  ``stop_frame`` 1e10); any other body (frames, export zips) is given as bytes and ``transform(body)`` returns
  bytes (e.g. a zip bomb from :mod:`tests.cvat_standin.hostile`). Every firing tamper applies, in the order
  they were added, and combines with the other kinds (not with ``status``/``throttle``/``reset``, which replace
  the answer). The request log shows ``fault="tamper"`` when only a tamper fired.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = ("status", "throttle", "delay", "reset", "drop", "truncate", "export_fail", "tamper")
# "create": POST /api/tasks and POST /api/tasks/{id}/data (tell them apart with path_contains="/data");
# "update": the other writes (annotations PUT/PATCH/DELETE, PATCH /api/jobs/{id}, DELETE /api/tasks/{id})
ROUTE_KINDS = ("server", "auth", "user", "list", "detail", "meta", "frame", "annotations", "export", "request",
               "download", "update", "create", "unknown")


@dataclass
class Fault:
    kind: str
    route: str | tuple[str, ...] = "any"
    rate: float = 1.0
    times: int | None = None
    method: str | None = None
    path_contains: str | None = None
    status: int = 503
    retry_after: int = 1
    delay: float = 0.5
    fraction: float = 0.5
    message: str = "OSError: [Errno 28] No space left on device (stand-in fault)"
    transform: Callable[[Any], Any] | None = field(default=None, repr=False)
    fired: int = 0
    seen: int = 0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        routes = (self.route,) if isinstance(self.route, str) else tuple(self.route)
        bad = [r for r in routes if r != "any" and r not in ROUTE_KINDS]
        if bad:
            raise ValueError(f"route kinds must be 'any' or among {ROUTE_KINDS}, got {bad}")
        self.route = routes
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {self.rate}")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")
        if (self.kind == "tamper") != (self.transform is not None):
            raise ValueError("a 'tamper' fault needs transform=..., and only a tamper takes one")

    def matches(self, route: str, method: str, path: str) -> bool:
        if "any" not in self.route and route not in self.route:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path_contains is None or self.path_contains in path

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times


class FaultSet:
    """The server's active faults (thread-safe)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._faults: list[Fault] = []
        self._count = 0
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._count += 1
            fault.rng = random.Random(self.seed * 1_000_003 + self._count)
            self._faults.append(fault)
            return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def active(self) -> list[Fault]:
        """The faults switched on, in the order they were added (exhausted ones included)."""
        with self._lock:
            return list(self._faults)

    def tampers(self, route: str, method: str, path: str) -> list[Fault]:
        """The ``tamper`` faults that fire for this request (all of them, in the order they were added)."""
        fired: list[Fault] = []
        with self._lock:
            for fault in self._faults:
                if fault.kind == "tamper" and not fault.exhausted and fault.matches(route, method, path) \
                        and _fires(fault):
                    fired.append(fault)
        return fired

    def pick(self, route: str, method: str, path: str, kinds: tuple[str, ...]) -> list[Fault]:
        """The faults (of ``kinds``) that fire for this request: all firing delays, then at most one other."""
        fired: list[Fault] = []
        with self._lock:
            for fault in self._faults:
                if fault.kind not in kinds or fault.exhausted or not fault.matches(route, method, path):
                    continue
                if fault.kind != "delay" and any(f.kind != "delay" for f in fired):
                    continue
                if _fires(fault):
                    fired.append(fault)
        return fired


def _fires(fault: Fault) -> bool:
    """Count one matching request for ``fault``; True when it fires this time (its ``rate``)."""
    fault.seen += 1
    if fault.rate >= 1.0 or fault.rng.random() < fault.rate:
        fault.fired += 1
        return True
    return False
