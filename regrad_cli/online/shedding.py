"""Shedding stalled clients: the HTTP protocol `regrad serve` runs uvicorn with.

uvicorn times out an idle keep-alive connection, but never a client that sends part of its
request headers (or of its body) and then waits: each such connection holds a file descriptor
forever, and a few hundred of them exhaust the process's descriptors (EMFILE on every accept,
``/healthz`` unreachable, a traceback per failed accept on stderr). This protocol, a subclass of
uvicorn's h11 one, adds what a proxy in front would give:

* **header deadline**: a request's headers must be complete ``header_timeout_s`` after the
  connection opened (or after the previous response on a keep-alive connection);
* **body deadline**: its body must be complete ``body_timeout_s`` after its headers;
* **read deadline**: a connection whose answer has waited unsent for ``body_timeout_s`` (the
  client pipelines requests, or asks for a reply, and never reads it) is dropped, also after
  the server closed it (a close waits for the unsent bytes);
* **connection cap**: at most ``max_connections`` connections (never more than the descriptor
  limit allows); a new connection beyond it pushes out the oldest one that has not yet sent a
  complete request (a stalled one), or is closed itself when every connection is busy.

A shed connection is aborted without an answer: closed at once, its unsent bytes dropped (a
plain close waits to flush them, which a client that never reads never allows: its descriptor
stayed held for good). Time
spent computing an answer is never limited: the deadlines cover only what the client sends and
whether it reads. Warnings from uvicorn and asyncio are
rate-limited (``RateLimit``), so no client can fill the server's stderr.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("regrad.serve")

# Descriptors kept free beyond the connection cap (the bank's files, the model, logs, accept).
RESERVED_FDS = 64


@dataclass
class ClientLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1000

    def effective_max_connections(self) -> int:
        """``max_connections``, lowered so that the connections never use up the descriptors."""
        soft = _fd_limit()
        return self.max_connections if soft is None else min(self.max_connections, max(8, soft - RESERVED_FDS))

    def backlog(self) -> int:
        """Connections the kernel queues and asyncio accepts in one go, before any is shed: a
        share of the descriptors still free, so that one burst cannot reach the limit."""
        soft, used = _fd_limit(), _open_fds()
        if soft is None or used is None:
            return 2048
        return min(2048, max(16, (soft - used) // 8))


def _fd_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _open_fds() -> int | None:
    """Descriptors open in this process (Linux; None elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def protocol_class(limits: ClientLimits, backlog: int) -> type:
    """An ``H11Protocol`` subclass enforcing ``limits`` (pass it as uvicorn's ``http``) for a
    listening socket with this ``backlog``."""
    cap = limits.effective_max_connections()
    soft = _fd_limit()

    class SheddingProtocol(_Shedding):
        header_timeout = float(limits.header_timeout_s)
        body_timeout = float(limits.body_timeout_s)
        max_connections = cap
        # Shed while fewer descriptors than one accept burst (and a margin) are left.
        max_fds = None if soft is None else soft - backlog - 16

    return SheddingProtocol


class _Shedding(H11Protocol):
    header_timeout = 10.0
    body_timeout = 30.0
    max_connections = 1000
    max_fds: int | None = None
    shed_count = 0  # connections shed by this process (all classes)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened = self._phase_start = time.monotonic()
        self._cycle_seen = None
        self._unsent_since: float | None = None
        self._arm()
        fds = _open_fds() if self.max_fds is not None else None
        if len(self.connections) > self.max_connections or (fds is not None and fds > self.max_fds):
            stalled = [c for c in self.connections
                       if c is not self and isinstance(c, _Shedding) and (c._waiting_for_request() or c._not_reading())]
            victim = min(stalled, key=lambda c: c._phase_start) if stalled else self
            victim._shed("the connection cap was reached")

    def connection_lost(self, exc) -> None:
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._phase_start = time.monotonic()  # a keep-alive connection waits for new headers

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._cycle_seen:  # new request headers
            self._cycle_seen = self.cycle
            self._phase_start = time.monotonic()

    # --------------------------------------------------------------------------------------
    def _waiting_for_request(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _not_reading(self) -> bool:
        """Bytes for the client have waited unsent since the last check or longer."""
        return getattr(self, "_unsent_since", None) is not None

    def _arm(self) -> None:
        period = max(0.05, min(1.0, self.header_timeout / 4, self.body_timeout / 4))
        self._timer = self.loop.call_later(period, self._check)

    def _check(self) -> None:
        now = time.monotonic()
        try:
            unsent = self.transport.get_write_buffer_size()
        except (AttributeError, NotImplementedError, RuntimeError):
            unsent = 0
        if not unsent:
            self._unsent_since = None
        elif self._unsent_since is None:
            self._unsent_since = now
        elif now - self._unsent_since > self.body_timeout:
            self._shed(f"the client read none of its answer for {self.body_timeout:g} s")
            return
        if self.transport.is_closing():
            if unsent:  # closed after its answer: held until the bytes go, so keep watching
                self._arm()
            return
        waited = now - self._phase_start
        if self._waiting_for_request():
            if waited > self.header_timeout:
                self._shed(f"no complete request headers within {self.header_timeout:g} s")
                return
        elif getattr(self.cycle, "more_body", False) and waited > self.body_timeout:
            self._shed(f"no complete request body within {self.body_timeout:g} s")
            return
        self._arm()

    def _shed(self, why: str) -> None:
        _Shedding.shed_count += 1
        log.debug("closing %s: %s", self.client, why)
        self.transport.abort()  # close() would wait for unsent bytes a non-reading client never takes


class RateLimit(logging.Filter):
    """Lets at most ``burst`` records through per ``window_s`` seconds, then one line saying how
    many were dropped: no client can make the server's log grow without bound."""

    def __init__(self, burst: int = 20, window_s: float = 10.0):
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._start, self._count, self._dropped = 0.0, 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._start > self.window_s:
            if self._dropped:
                record.msg = f"({self._dropped} similar log lines dropped) {record.msg}"
            self._start, self._count, self._dropped = now, 0, 0
        self._count += 1
        if self._count > self.burst:
            self._dropped += 1
            return False
        if record.exc_info and isinstance(record.exc_info[1], OSError):
            # asyncio's "socket.accept() out of system resource": the errno says it all.
            record.msg = f"{record.getMessage().splitlines()[0]}: {record.exc_info[1]}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def install_log_limits() -> None:
    """Rate-limit the loggers a flood of clients can reach (idempotent)."""
    for name in ("uvicorn.error", "uvicorn.access", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimit) for f in logger.filters):
            logger.addFilter(RateLimit())
