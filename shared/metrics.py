"""Prometheus metrics of one daemon: a registry of its own (never the global one, so
several daemons can share a process), the counters the request paths feed, and gauges
read from the database when scraped.

The scrape is answered by prometheus_client's HTTP server in its own thread. That thread
never touches the database: it asks the daemon's event loop for a reading and waits a
bounded time, falling back to the last reading if the loop is slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from shared.errors import FleetwireError, InvalidArgument
from shared.peers import check_address

log = logging.getLogger(__name__)

# Where inbox refusals come from (the `reason` label): a fixed set, never free text.
REJECTION_REASONS = (
    "malformed", "unknown_key", "inactive_sender", "bad_signature", "sender_mismatch",
    "wrong_recipient", "skew", "tls_mismatch", "unexpected_body", "replay", "other")
AGENT_STATES = ("pending", "running", "succeeded", "failed", "killed", "timed_out", "lost")
SPOKE_STATES = ("online", "offline", "unknown")
# Commands range from a list (milliseconds) to a kill that waits out a grace period.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# How long a scrape waits for the event loop to read the gauges, and how long a reading
# is reused (a burst of scrapes costs one read).
READ_TIMEOUT_SECONDS = 2.0
READING_MAX_AGE_SECONDS = 1.0


def outcome_of(err: FleetwireError) -> str:
    """A refusal as an `outcome` label: its gRPC status in lower case (not_found, ...)."""
    return str(err.status.name).lower()


@dataclass(frozen=True)
class Reading:
    """One gauge's values at scrape time, by the value of its one label (or, with label
    "", a single value under the key "")."""

    name: str
    help: str
    label: str
    values: dict[str, float]


def by_label(name: str, help: str, label: str, known: Iterable[str],
             counts: dict[str, int]) -> Reading:
    """A labelled gauge where every known value is present (0 if absent from counts)."""
    values: dict[str, float] = dict.fromkeys(known, 0.0)
    for key, count in counts.items():
        values[key.lower()] = float(count)
    return Reading(name, help, label, values)


def single(name: str, help: str, value: float) -> Reading:
    return Reading(name, help, "", {"": value})


class Observation:
    """The outcome `Metrics.command` and `Metrics.operator_request` count on exit: "ok"
    unless set by `refused` (a refusal answered rather than raised) or an exception."""

    def __init__(self) -> None:
        self.outcome = "ok"

    def refused(self, err: FleetwireError) -> None:
        self.outcome = outcome_of(err)


class _Gauges(Collector):
    def __init__(self, loop: asyncio.AbstractEventLoop,
                 read: Callable[[], Awaitable[list[Reading]]]) -> None:
        self._loop = loop
        self._read = read
        self._last: list[Reading] = []
        self._read_at = 0.0
        self._lock = threading.Lock()

    async def _read_now(self) -> list[Reading]:
        return await self._read()

    def _readings(self) -> list[Reading]:
        with self._lock:
            fresh = time.monotonic() - self._read_at < READING_MAX_AGE_SECONDS
            if fresh or self._loop.is_closed() or _on_loop(self._loop):
                return self._last
            future = asyncio.run_coroutine_threadsafe(self._read_now(), self._loop)
            try:
                self._last = future.result(READ_TIMEOUT_SECONDS)
                self._read_at = time.monotonic()
            except Exception as exc:
                future.cancel()
                log.warning("metrics: reading gauges failed (%s); serving the last reading",
                            type(exc).__name__)
            return self._last

    def collect(self) -> Iterator[Metric]:
        for reading in self._readings():
            family = GaugeMetricFamily(reading.name, reading.help,
                                       labels=[reading.label] if reading.label else None)
            for key, value in sorted(reading.values.items()):
                family.add_metric([key] if reading.label else [], value)
            yield family


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class Metrics:
    """One daemon's metrics. Built by every daemon; served only with --metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._commands = Counter(
            "fleetwire_commands", "Commands: on a hub those it sent to spokes, on a spoke "
            "those it carried out; by action and outcome (ok or the refusal's status).",
            ["kind", "outcome"], registry=self.registry)
        self._command_seconds = Histogram(
            "fleetwire_command_duration_seconds", "Time to carry out (spoke) or to send and "
            "get the verified answer of (hub) a command, by action.",
            ["kind"], buckets=DURATION_BUCKETS, registry=self.registry)
        self._requests = Counter(
            "fleetwire_operator_requests", "Operator API requests (hub), by gRPC method "
            "and outcome.", ["method", "outcome"], registry=self.registry)
        self._request_seconds = Histogram(
            "fleetwire_operator_request_duration_seconds", "Time to answer an operator "
            "request (hub), by gRPC method.", ["method"], buckets=DURATION_BUCKETS,
            registry=self.registry)
        self._rejections = Counter(
            "fleetwire_envelope_rejections", "Signed envelopes refused by this instance, "
            "by which rule refused them.", ["reason"], registry=self.registry)
        for reason in REJECTION_REASONS:
            self._rejections.labels(reason)
        self._streams = Gauge(
            "fleetwire_command_streams", "Exchange streams from hubs open now (spoke).",
            registry=self.registry)
        self._stream_deliveries = Counter(
            "fleetwire_stream_deliveries", "Envelopes that came on an Exchange stream "
            "(spoke); the rest came as unary Deliver calls.", registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        # The labelled series each command kind and method feeds, looked up once.
        self._observed: dict[tuple[Histogram, str], _Children] = {}

    def command(self, kind: str) -> _Observing:
        """Time and count one command (`kind` is the Command's action field)."""
        return _Observing(self._children(self._commands, self._command_seconds, kind))

    def operator_request(self, method: str) -> _Observing:
        """Time and count one operator request (`method` is the gRPC method name)."""
        return _Observing(self._children(self._requests, self._request_seconds, method))

    def _children(self, counter: Counter, histogram: Histogram, name: str) -> _Children:
        found = self._observed.get((histogram, name))
        if found is None:
            found = self._observed[(histogram, name)] = _Children(counter, histogram, name)
        return found

    @contextlib.contextmanager
    def command_stream(self) -> Iterator[Callable[[], None]]:
        """Count one Exchange stream as open while inside; yields what to call for each
        envelope it carries."""
        self._streams.inc()
        try:
            yield self._stream_deliveries.inc
        finally:
            self._streams.dec()

    def envelope_rejected(self, reason: str) -> None:
        self._rejections.labels(reason if reason in REJECTION_REASONS else "other").inc()

    def read_gauges(self, read: Callable[[], Awaitable[list[Reading]]]) -> None:
        """Serve the gauges `read` returns; it runs on the calling (the daemon's) loop."""
        self.registry.register(_Gauges(asyncio.get_running_loop(), read))

    def serve(self, address: str) -> str:
        """Serve /metrics over HTTP on HOST:PORT (port 0: any free port); returns the
        bound HOST:PORT."""
        check_address(address)
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            self._server, self._thread = start_http_server(int(port), host,
                                                           registry=self.registry)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        bound = f"{f'[{host}]' if ':' in host else host}:{self._server.server_port}"
        log.info("metrics on http://%s/metrics (plain HTTP, no authentication)", bound)
        return bound

    async def close(self) -> None:
        """Stop serving (a scrape in progress is cut off)."""
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()


class _Children:
    """The series one command kind (or method) feeds: its histogram's, and its counter's
    per outcome. prometheus_client's labels() validates and locks on every call; these
    are looked up once."""

    def __init__(self, counter: Counter, histogram: Histogram, name: str) -> None:
        self.seconds = histogram.labels(name)
        self._counter = counter
        self._name = name
        self._counts: dict[str, Counter] = {}

    def count(self, outcome: str) -> None:
        child = self._counts.get(outcome)
        if child is None:
            child = self._counts[outcome] = self._counter.labels(self._name, outcome)
        child.inc()


class _Observing:
    """Times one command or request and counts it by outcome when it ends: "ok", the
    refusal's status, "cancelled" or "internal"."""

    __slots__ = ("_children", "_seen", "_started")

    def __init__(self, children: _Children) -> None:
        self._children = children
        self._seen = Observation()
        self._started = 0.0

    def __enter__(self) -> Observation:
        self._started = time.perf_counter()
        return self._seen

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        seen = self._seen
        if exc is not None and seen.outcome == "ok":
            if isinstance(exc, FleetwireError):
                seen.refused(exc)
            elif isinstance(exc, asyncio.CancelledError):
                seen.outcome = "cancelled"
            elif isinstance(exc, Exception):
                seen.outcome = "internal"
        self._children.seconds.observe(time.perf_counter() - self._started)
        self._children.count(seen.outcome)
