"""The usage ledger: one row per API call (when, whose, which key id, model, host, operation, status, tokens, time
to first token, duration; never content), written in batches off the reactor thread (twisted.enterprise.adbapi)
to SQLite, or to PostgreSQL for several gateways.

Rows wait in a bounded buffer and are written every ``flush_secs``; a store that is full or cannot be reached
never fails a call: rows stay buffered up to ``max_buffered_rows``, then the oldest are dropped and counted
(``inference_usage_rows_dropped_total``). Rows older than ``keep_days`` are deleted once an hour.
"""

from __future__ import annotations

import importlib
import os
import re
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import astuple, dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ConfigError, UsageConfig
from .reactor import IGatewayReactor

log = Logger()

RETENTION_EVERY_SECS = 3600
MAX_GROUPS = 10000  # the most rows a usage query answers (one per group)
GROUPS = ("tenant", "key_id", "model", "host", "operation", "status", "day")
COLUMNS = ("at", "tenant", "key_id", "model", "host", "operation", "status", "input_tokens", "output_tokens",
           "ttft_ms", "duration_ms")
SCHEMA = ("CREATE TABLE IF NOT EXISTS inference_usage (at DOUBLE PRECISION NOT NULL, tenant TEXT NOT NULL, "
          "key_id TEXT, model TEXT, host TEXT, operation TEXT, status INTEGER, input_tokens INTEGER, "
          "output_tokens INTEGER, ttft_ms DOUBLE PRECISION, duration_ms DOUBLE PRECISION)",
          "CREATE INDEX IF NOT EXISTS inference_usage_at ON inference_usage (at)")


@dataclass(frozen=True)
class UsageRow:
    at: float  # when the call ended (Unix seconds)
    tenant: str
    key_id: str | None
    model: str | None
    host: str | None
    operation: str
    status: int
    input_tokens: int | None
    output_tokens: int | None
    ttft_ms: float | None
    duration_ms: float


@dataclass(frozen=True)
class Dialect:
    """What differs between the stores: the driver, its placeholder, how a time becomes its UTC day."""

    driver: str
    placeholder: str
    day: str  # SQL of the UTC day of ``at``, as YYYY-MM-DD


SQLITE = Dialect("sqlite3", "?", "date(at, 'unixepoch')")
POSTGRES = Dialect("psycopg2", "%s", "to_char(to_timestamp(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')")


def resolve_store(config: UsageConfig, environ: Mapping[str, str]) -> str:
    """``usage.store`` with ``auto`` made concrete: SQLite in systemd's StateDirectory when the daemon has one (the
    units in systemd/ give it /var/lib/inference), else none (a gateway run by hand keeps no ledger unasked)."""
    if config.store != "auto":
        return config.store
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return f"sqlite:///{state.lstrip('/')}/usage.db" if state else "none"


def connect_args(store: str) -> tuple[Dialect, tuple[Any, ...], dict[str, Any]]:
    """The dialect and DB-API connect arguments for a ``sqlite:///path`` or ``postgresql://`` store URL."""
    parts = urlsplit(store)
    if parts.scheme == "sqlite":
        return SQLITE, ("/" + parts.path.lstrip("/"),), {"check_same_thread": False, "timeout": 5}
    kwargs = {"host": parts.hostname, "port": parts.port or 5432, "dbname": unquote(parts.path.lstrip("/")),
              "user": unquote(parts.username) if parts.username else None,
              "password": unquote(parts.password) if parts.password else None, "connect_timeout": 5}
    return POSTGRES, (), {k: v for k, v in kwargs.items() if v is not None}


def where_store(store: str) -> str:
    """The store as it may be said (no password)."""
    parts = urlsplit(store)
    if parts.scheme == "sqlite":
        return "sqlite:///" + parts.path.lstrip("/")
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def summary_sql(dialect: Dialect, group_by: Sequence[str]) -> str:
    """Calls, errors and tokens per group, between two times (the query's two parameters)."""
    columns = [dialect.day if name == "day" else name for name in group_by]
    selected = "".join(f"{column} AS {name}, " for column, name in zip(columns, group_by, strict=True))
    grouping = f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}" if columns else ""
    p = dialect.placeholder
    return (f"SELECT {selected}COUNT(*), SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END), "
            f"COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0) FROM inference_usage "
            f"WHERE at >= {p} AND at < {p}{grouping} LIMIT {MAX_GROUPS}")


SUMS = ("requests", "errors", "input_tokens", "output_tokens")


def summary_rows(group_by: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """The query's rows as objects: the group's values, then its sums."""
    width = len(group_by)
    return [{**dict(zip(group_by, row[:width], strict=True)),
             **dict(zip(SUMS, (int(value or 0) for value in row[width:]), strict=True))} for row in rows]


_AGE = re.compile(r"([0-9]{1,5})([dhm])")
_SECONDS = re.compile(r"[0-9]{1,11}(?:\.[0-9]{1,6})?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATE_TIME = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}):([0-9]{2})(\.[0-9]+)?"
                        r"([Zz]|[+-][0-9]{2}:[0-9]{2})")


def parse_when(value: str, now: float) -> float:
    """A time in a usage query, in exactly the forms /openapi.json gives: ``7d`` / ``24h`` / ``30m`` ago, Unix
    seconds, a date (``2026-12-01``, UTC) or an RFC 3339 time (``2026-12-01T10:00:00Z``); :class:`ValueError`
    otherwise."""
    age = _AGE.fullmatch(value)
    if age is not None:
        return _within(now - int(age[1]) * {"d": 86400, "h": 3600, "m": 60}[age[2]])
    if _SECONDS.fullmatch(value):
        return _within(float(value))
    if _DATE.fullmatch(value):
        return _within(datetime.fromisoformat(value).replace(tzinfo=timezone.utc).timestamp())
    moment = _DATE_TIME.fullmatch(value)
    if moment is None:
        raise ValueError(f"not a time: {value[:40]!r}")
    day, minutes, seconds, fraction, zone = moment.groups()
    seconds = min(seconds, "59")  # (a leap second is the second before it)
    zone = "+00:00" if zone in ("Z", "z") else zone
    return _within(datetime.fromisoformat(f"{day}T{minutes}:{seconds}{(fraction or '')[:7]}{zone}").timestamp())


LATEST = 253402300799.0  # 9999-12-31T23:59:59Z: the last time an answer can write


def _within(seconds: float) -> float:
    """A time the ledger can hold and an answer can write (0 for the distant past, 9999 for the far future)."""
    if seconds != seconds:  # NaN
        raise ValueError("not a time")
    return min(max(seconds, 0.0), LATEST)


def parse_group_by(value: str) -> list[str]:
    """``tenant,model,day`` as a list of known groups (each once); :class:`ValueError` naming what is not one."""
    names = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))  # (in order, once)
    unknown = [name for name in names if name not in GROUPS]
    if unknown or not names:
        raise ValueError(f"group_by takes names among {', '.join(GROUPS)} (not {', '.join(unknown) or 'none'})")
    return names


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _create(connection: Any) -> None:
    """The table and its index, on every new connection (adbapi's ``cp_openfun``)."""
    cursor = connection.cursor()
    for statement in SCHEMA:
        cursor.execute(statement)
    connection.commit()


def _create_sqlite(connection: Any) -> None:
    """The same, with SQLite's write-ahead log: several gateway processes may share one file (a writer does not
    block the readers of /v1/usage)."""
    connection.execute("PRAGMA journal_mode=WAL")
    _create(connection)


class UsageLedger:
    """Rows buffered here and written to the store in batches, by a thread of adbapi's pool."""

    def __init__(self, store: str, config: UsageConfig, reactor: IGatewayReactor,
                 dropped: Callable[[int], None] = lambda rows: None) -> None:
        self.dialect, args, kwargs = connect_args(store)
        try:
            importlib.import_module(self.dialect.driver)
        except ImportError:
            raise ConfigError(f"inference.usage.store: {where_store(store)} needs the {self.dialect.driver} driver: "
                              "pip install 'inference[postgres]'") from None
        if self.dialect is SQLITE:
            try:
                os.makedirs(os.path.dirname(args[0]) or ".", exist_ok=True)
            except OSError as e:
                raise ConfigError(f"inference.usage.store: cannot make the folder of {args[0]}: "
                                  f"{e.strerror or e}") from None
        self._where = where_store(store)
        self._pool = adbapi.ConnectionPool(self.dialect.driver, *args, cp_min=1, cp_max=1, cp_reactor=reactor,
                                           cp_openfun=_create_sqlite if self.dialect is SQLITE else _create,
                                           **kwargs)
        self._reactor = reactor
        self._config = config
        self._buffer: deque[UsageRow] = deque()
        self._writing: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._retention: IDelayedCall | None = None
        self._dropped = dropped  # counts rows dropped (inference_usage_rows_dropped_total)
        self._up = True
        self._closed = False
        self._insert = (f"INSERT INTO inference_usage ({', '.join(COLUMNS)}) VALUES "
                        f"({', '.join([self.dialect.placeholder] * len(COLUMNS))})")

    def start(self) -> None:
        self._timer = self._reactor.callLater(self._config.flush_secs, self._tick)
        self._retention = self._reactor.callLater(0, self._forget_old)

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def record(self, row: UsageRow) -> None:
        """Keep ``row`` for the next write; past the bound the oldest row is dropped (and counted)."""
        if len(self._buffer) >= self._config.max_buffered_rows:
            self._buffer.popleft()
            self._dropped(1)
        self._buffer.append(row)

    def flush(self) -> Deferred[None]:
        """Write what is buffered now (after a write under way); fires when it is written, or failed and kept."""
        if self._writing is not None:
            return self._writing.addCallback(lambda _: self.flush())
        if not self._buffer:
            return Deferred.fromCoroutine(_nothing())
        batch = list(self._buffer)
        self._buffer.clear()
        self._writing = self._pool.runInteraction(_write_rows, self._insert, [astuple(row) for row in batch])
        self._writing.addCallbacks(self._written, self._not_written, errbackArgs=(batch,))
        return self._writing

    def _written(self, _: Any) -> None:
        self._writing = None
        if not self._up:
            self._up = True
            log.info("usage store {where} is written again", where=self._where)

    def _not_written(self, failure: Failure, batch: list[UsageRow]) -> None:
        """Keep the batch (ahead of newer rows) within the bound; say so once until a write succeeds."""
        self._writing = None
        room = self._config.max_buffered_rows - len(self._buffer)
        kept = batch[-room:] if room > 0 else []
        if len(kept) < len(batch):
            self._dropped(len(batch) - len(kept))
        self._buffer.extendleft(reversed(kept))
        if self._up:
            self._up = False
            log.error("usage store {where} cannot be written ({error}); rows are kept, up to {bound}, and "
                      "written when it can be", where=self._where, error=failure.getErrorMessage()[:200],
                      bound=self._config.max_buffered_rows)

    def _tick(self) -> None:
        self.flush()
        self._timer = self._reactor.callLater(self._config.flush_secs, self._tick)

    def _forget_old(self) -> None:
        cutoff = self._reactor.seconds() - self._config.keep_days * 86400
        self._pool.runOperation(f"DELETE FROM inference_usage WHERE at < {self.dialect.placeholder}",
                                (cutoff,)).addErrback(lambda failure: None)  # (a store that is away: next hour)
        self._retention = self._reactor.callLater(RETENTION_EVERY_SECS, self._forget_old)

    async def summary(self, since: float, until: float, group_by: Sequence[str]) -> list[dict[str, Any]]:
        """Calls and tokens per group between ``since`` and ``until`` (what is buffered is written first)."""
        await self.flush()
        rows = await self._pool.runQuery(summary_sql(self.dialect, group_by), (since, until))
        return summary_rows(group_by, rows)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._timer, self._retention):
            if timer is not None and timer.active():
                timer.cancel()
        try:
            await self.flush()
        finally:
            self._pool.close()


def _write_rows(cursor: Any, insert: str, rows: list[tuple[Any, ...]]) -> None:
    cursor.executemany(insert, rows)


async def _nothing() -> None:
    return None
