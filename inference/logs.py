"""Logging: one line per event (text or JSON), filtered by level, with the request's ids attached.

Lines go where twistd's options say (see :func:`log_output`): stdout under ``twistd -n`` (journald), the file of
``--logfile``, or ``twistd.log`` for a daemon. The request id and trace id of the request being served live in a
context variable, set while twisted.web dispatches the request: Klein's handler coroutine copies that context, so
every event the handler (and the upstream client it awaits) logs carries the ids without passing them around.
Events from protocol callbacks run in the reactor's root context and simply have none.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import sys
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import IO, Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import FilteringLogObserver, ILogObserver, Logger, LogLevel, LogLevelFilterPredicate, formatEvent
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

from .config import LoggingConfig
from .record import CallRecord

access = Logger(namespace="inference.access")

CURRENT_IDS: ContextVar[tuple[str, str | None] | None] = ContextVar("inference_request_ids", default=None)
"""(request id, trace id) of the request whose code is running."""

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "warning": LogLevel.warn,
           "error": LogLevel.error, "critical": LogLevel.critical}
# Keys of legacy twisted.python.log events that are not fields worth a JSON key.
_LEGACY_KEYS = {"format", "system", "time", "isError", "message", "why", "failure", "printed", "debug",
               "access_text"}  # (the access line's text is the JSON message already)


_ID_PREFIX = secrets.token_hex(8)  # random per process, so ids from several processes never collide
_ID_COUNTER = itertools.count(1)


def request_id_for(header: bytes | None) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else a new one (a header must not inject lines).

    New ids are 32 hex digits: a random per-process prefix and a counter (a quarter of the cost of uuid4).
    """
    if header:
        text = header.decode("latin-1")
        if _VALID_REQUEST_ID.fullmatch(text):
            return text
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# Twisted logs "Starting factory _HTTP11ClientFactory(...)" and "Stopping factory ..." at info level for every
# upstream connection the pool opens or closes (the factory is the gateway's subclass of Twisted's): below debug
# they would bury the access lines.
_QUIET_NAMESPACES = ("inference.providers.upstream._ClientFactory", "twisted.web.client._HTTP11ClientFactory")


class TextSink(Protocol):
    """Where lines are written: stdout, or a :class:`LogFile`."""

    def write(self, text: str, /) -> Any: ...

    def flush(self) -> None: ...


class FlushedPerTurn:
    """Lines held and handed to ``out`` in one write, flushed, once per reactor turn, not once per line: under load
    the flush per access line cost 4.6% of the gateway's CPU (issue 24's profile). The lines are held here, not in
    ``out``'s buffer: with ``PYTHONUNBUFFERED=1`` (set by most container images, ours included) stdout writes each
    line at once, one system call per request. A warning or worse is flushed at once (the line before a crash is
    the one that matters), and ``flush()`` runs at shutdown and before a reopen, so no line is lost. A line written
    from another thread goes out at once, with any held before it: timers belong to the reactor's thread."""

    MAX_HELD = 256
    """Lines held at most before they are written (still flushed at the turn's end): a turn that logs a flood of
    lines holds a bounded amount of text."""

    def __init__(self, out: TextSink, clock: IReactorTime) -> None:
        self._out = out
        self._clock = clock
        self._held: list[str] = []
        self._lock = threading.Lock()  # another thread's line, and the reactor's writing out what it held
        self._pending: IDelayedCall | None = None

    def write(self, text: str, /) -> None:
        with self._lock:
            self._held.append(text)
            held = len(self._held)
        if not isInIOThread():
            self._write_held()
            self._out.flush()
            return
        if self._pending is None:
            self._pending = self._clock.callLater(0, self.flush)
        if held >= self.MAX_HELD:
            self._write_held()

    def flush(self) -> None:
        if self._pending is not None:
            if self._pending.active():
                self._pending.cancel()
            self._pending = None
        self._write_held()
        self._out.flush()

    def _write_held(self) -> None:
        with self._lock:  # in the order they were held, whichever thread writes them out
            held, self._held = self._held, []
            if held:
                self._out.write("".join(held))


def make_observer(config: LoggingConfig, out: TextSink | None = None) -> ILogObserver:
    """An observer writing events at ``config.level`` and above to ``out`` (stdout), in ``config.format``; each
    line is flushed at once, unless ``out`` flushes on its own schedule (:class:`FlushedPerTurn`)."""
    out = sys.stdout if out is None else out
    writer = JSONLines(out) if config.format == "json" else TextLines(out)
    level = _LEVELS[config.level]
    levels = LogLevelFilterPredicate(defaultLogLevel=level)
    levels.setLogLevelForNamespace(access.namespace, level)  # found at once, not by walking the namespace's parents
    if level != LogLevel.debug:
        for namespace in _QUIET_NAMESPACES:
            levels.setLogLevelForNamespace(namespace, LogLevel.warn)
    return FilteringLogObserver(writer, [levels])


class LogFile:
    """A log file opened for appending, line by line. ``reopen()`` opens the file at the same path again: after
    logrotate has moved it away, SIGUSR1 makes the daemon write to a new one (twistd's own signal for its logs)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)  # a daemon may change its directory later
        self._file = self._open()

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        old, self._file = self._file, self._open()
        old.close()


class DaemonStdout(Exception):
    """``--logfile -`` without ``--nodaemon``: a daemon has no stdout to write to."""


def log_output(twistd: Mapping[str, Any] | None) -> TextSink | None:
    """Where the gateway's lines go, following twistd's options as every twistd application does.

    ``--logfile PATH``: that file; ``--logfile -``: stdout; neither under ``-n``: stdout (journald under systemd);
    neither as a daemon: ``twistd.log`` in the directory it starts in. None when ``--logger`` or ``--syslog``
    hands logging to twistd itself. ``twistd`` is twistd's own options (None when not run by twistd: stdout).
    """
    if twistd is None:
        return sys.stdout
    if twistd.get("logger") or twistd.get("syslog"):
        return None
    path = twistd.get("logfile") or ""
    daemon = not twistd.get("nodaemon")
    if path == "-":
        if daemon:
            raise DaemonStdout("Daemons cannot log to stdout: use --logfile PATH, or --nodaemon")
        return sys.stdout
    if not path and not daemon:
        return sys.stdout
    return LogFile(path or "twistd.log")


def _ids(event: dict[str, Any]) -> tuple[str | None, str | None]:
    if "request_id" in event:
        return event["request_id"], event.get("trace_id")
    current = CURRENT_IDS.get()
    return current if current is not None else (None, None)


_SECOND: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _timestamp(event: dict[str, Any]) -> str:
    """``2026-11-24T08:00:00.123Z``; the date and time part is formatted once per second."""
    when = event.get("log_time") or 0.0
    second = int(when)
    if second != _SECOND[0]:
        _SECOND[:] = [second, datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_SECOND[1]}.{int((when - second) * 1000):03d}Z"


def _message(event: dict[str, Any]) -> str:
    rendered = event.get("access_text")  # already rendered (log_access)
    if isinstance(rendered, str):
        return rendered
    text = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text += "\n" + failure.getTraceback()
    return text


def _flush_now(out: TextSink, level: LogLevel) -> None:
    """A line is flushed at once unless ``out`` flushes per turn and the line is below a warning."""
    if not isinstance(out, FlushedPerTurn) or level >= LogLevel.warn:
        out.flush()


@implementer(ILogObserver)
class TextLines:
    """``2026-11-24T08:00:00.000Z info [inference.access] message request_id=... trace_id=...``"""

    def __init__(self, out: TextSink) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level") or LogLevel.info
        request_id, trace_id = _ids(event)
        line = f"{_timestamp(event)} {level.name} [{event.get('log_namespace', '-')}] {_message(event)}"
        if request_id:
            line += f" request_id={request_id}"
        if trace_id:
            line += f" trace_id={trace_id}"
        self._out.write(line + "\n")
        _flush_now(self._out, level)


@implementer(ILogObserver)
class JSONLines:
    """One JSON object per line: timestamp, level, logger, message, request_id, trace_id, and the event's fields."""

    def __init__(self, out: TextSink) -> None:
        self._out = out

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level") or LogLevel.info
        request_id, trace_id = _ids(event)
        record: dict[str, Any] = {"timestamp": _timestamp(event), "level": level.name,
                                  "logger": event.get("log_namespace", "-"), "message": _message(event)}
        for key, value in event.items():
            if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
                continue
            if value is None or isinstance(value, (str, int, float, bool)):
                record[key] = value
        record["request_id"], record["trace_id"] = request_id, trace_id
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        _flush_now(self._out, level)


class Accessed(Protocol):
    """What the access line reads of a request (a twisted.web request carrying its record)."""

    method: bytes
    path: bytes
    sentLength: int
    request_id: str
    record: CallRecord

    def getClientAddress(self) -> object: ...


def log_access(request: Accessed, status: int | None) -> None:
    """The access line of one request (``status`` None: the client left before the answer was complete)."""
    record = request.record
    fields: dict[str, Any] = {
        "method": request.method.decode("latin-1"), "path": request.path.decode("latin-1")[:200],
        "route": record.route, "status": status if status is not None else 499,
        "duration_ms": round(record.duration * 1000, 2), "bytes": request.sentLength,
        "client": getattr(request.getClientAddress(), "host", "-"),
        "request_id": request.request_id, "trace_id": record.trace_id}
    # The text is rendered here with an f-string: twisted.logger's format parsing, once per request, showed up in
    # the benchmark's profile. JSON lines still carry every field.
    text = (f'{fields["client"]} "{fields["method"]} {fields["path"]}" {fields["status"]} {fields["bytes"]}B '
            f'{fields["duration_ms"]}ms')
    caller = record.caller
    if caller is not None and caller.key_id is not None:  # the tenant and which of its keys; never the key
        fields.update(tenant=caller.tenant.name, key_id=caller.key_id)
        text += f" tenant={caller.tenant.name} key={caller.key_id}"
    if record.model is not None:
        ttft = record.time_to_first_token
        fields.update(model=record.model, input_tokens=record.input_tokens, output_tokens=record.output_tokens,
                      ttft_ms=round(ttft * 1000, 2) if ttft is not None else None)
        text += f" model={record.model}"
        if ttft is not None:  # only streams have a first token to time
            text += f" ttft_ms={fields['ttft_ms']}"
        text += f" tokens={_or_dash(record.input_tokens)}/{_or_dash(record.output_tokens)}"
        if record.upstream is not None:  # the host of a fleet that served it
            fields["upstream"] = record.upstream
            text += f" upstream={record.upstream}"
        if record.via is not None:  # the upstream lacks the API: the gateway translated the call
            fields["via"] = record.via
            text += f" via={record.via}"
    access.info("{access_text}", access_text=text, **fields)


def _or_dash(count: int | None) -> str:
    return "-" if count is None else str(count)
