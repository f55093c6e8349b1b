"""Configuration: typed dataclasses loaded from YAML, then ``INFERENCE_*`` environment variables.

Every value is checked once, at start, so that a typo or an out-of-range number stops the daemon with one
line naming the key, the value and what is allowed, instead of surfacing as a strange failure later.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

ENV_PREFIX = "INFERENCE_"
OPENAI_BASE_URL = "https://api.openai.com"


class ConfigError(Exception):
    """A configuration value is wrong; ``str()`` is the one line shown to the operator."""


# -- constraints -------------------------------------------------------------------------------------------------

Check = Callable[[Any], str | None]  # returns what is allowed when the value is wrong, else None


def _range(low: float | None = None, high: float | None = None, *, above: bool = False) -> Check:
    def check(value: Any) -> str | None:
        too_low = low is not None and (value <= low if above else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            if low is not None and high is not None:
                return f"a number from {low:g} to {high:g}"
            return f"a number {'>' if above else '>='} {low:g}" if low is not None else f"a number <= {high:g}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else "one of " + ", ".join(choices)


def _http_url(value: Any) -> str | None:
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.hostname:
        return None
    return "an http:// or https:// URL with a host, e.g. http://localhost:1234"


def _url_path(value: Any) -> str | None:
    return None if value.startswith("/") else "a path starting with /"


def _origins(value: Any) -> str | None:
    for origin in value:
        parts = urlsplit(origin.rstrip("/"))
        if origin != "*" and not (parts.scheme in ("http", "https") and parts.hostname and not parts.path):
            return f"origins like https://app.example.com or http://localhost:5173, or * for any (not {origin!r})"
    return None


def _limits_store(value: Any) -> str | None:
    if value == "memory" or (urlsplit(value).scheme in ("redis", "rediss") and urlsplit(value).hostname):
        return None
    return "memory, or a Redis URL like redis://localhost:6379/0"


def _usage_store(value: Any) -> str | None:
    parts = urlsplit(value)
    if value in ("none", "auto") or (parts.scheme == "sqlite" and parts.path not in ("", "/")) or \
            (parts.scheme in ("postgresql", "postgres") and parts.hostname):
        return None
    return "none, auto, sqlite:///path/to/usage.db or postgresql://user@host/db"


def _non_empty(value: Any) -> str | None:
    return None if value else "a non-empty value"


def _opt(check: Check | None, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"check": check}, **kwargs)
    return field(default=default, metadata={"check": check}, **kwargs)


# -- schema ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    host: str = _opt(_non_empty, "127.0.0.1")
    port: int = _opt(_range(0, 65535), 3000)
    api_keys: list[str] = _opt(None, [])
    api_keys_file: str | None = _opt(_non_empty, None)  # one key per line; SIGHUP reads it again
    protect_metrics: bool = _opt(None, False)  # /metrics and /health* need a key too
    max_body_bytes: int = _opt(_range(1), 10 * 1024 * 1024)
    max_header_bytes: int = _opt(_range(1024), 16 * 1024)  # request line and headers together
    max_url_bytes: int = _opt(_range(64), 8 * 1024)
    max_messages: int = _opt(_range(1), 1000)
    max_embedding_inputs: int = _opt(_range(1), 2048)  # inputs in one embeddings request (OpenAI's limit)
    max_embedding_size: int = _opt(_range(1), 1_000_000)  # characters and token ids in all of them together
    max_embedding_dimensions: int = _opt(_range(1), 8192)  # the most ``dimensions`` an embeddings request may ask
    request_timeout_secs: float = _opt(_range(0, above=True), 300.0)  # to the answer (a stream: to its start)
    read_timeout_secs: float = _opt(_range(0, above=True), 30.0)  # to receive a whole request, from its 1st byte
    idle_timeout_secs: float = _opt(_range(0, above=True), 75.0)  # keep-alive connection with no request
    cors_origins: list[str] = _opt(_origins, [])  # browser origins allowed to call; empty: CORS off
    shutdown_timeout_secs: float = _opt(_range(0), 30.0)
    reuse_port: bool = _opt(None, False)  # several processes on one port (SO_REUSEPORT)


@dataclass(frozen=True)
class DefaultsConfig:
    max_tokens: int = _opt(_range(1), 100)
    temperature: float = _opt(_range(0, 2), 0.7)


@dataclass(frozen=True)
class HttpConfig:
    timeout_secs: float = _opt(_range(0, above=True), 60.0)
    connect_timeout_secs: float = _opt(_range(0, above=True), 10.0)
    keep_alive_secs: float = _opt(_range(0), 30.0)
    # None: as many as calls can be in flight to the host (see InferenceConfig.idle_connections).
    max_idle_connections: int | None = _opt(_range(0), None)
    max_retries: int = _opt(_range(0, 10), 2)
    # The first-byte deadline instead of timeout_secs when LM Studio says the model is not loaded: it loads
    # the model first (just in time), which takes from seconds to minutes.
    load_timeout_secs: float = _opt(_range(0, above=True), 300.0)


@dataclass(frozen=True)
class MockConfig:
    models: list[str] = _opt(_non_empty, ["mock-model"])
    embedding_models: list[str] = _opt(None, ["mock-embedding"])
    latency_secs: float = _opt(_range(0), 0.0)
    token_delay_secs: float = _opt(_range(0), 0.0)


@dataclass(frozen=True)
class UpstreamConfig:
    """One host of a fleet (``inference.upstreams``)."""

    base_url: str = _opt(_http_url, "http://localhost:1234")
    name: str = _opt(None, "")  # empty: host:port of base_url (names label metrics, so they stay few)
    api_key: str | None = _opt(None, None)
    # The calls it may run at once (its prompt-cache slots too). None: the parallel slots LM Studio 0.4 reports for
    # its loaded models, else DEFAULT_HOST_SLOTS; a number overrides what the host says.
    max_concurrent: int | None = _opt(_range(1), None)
    weight: float = _opt(_range(0, above=True), 1.0)  # a share of new conversations, relative to the others
    provider: str | None = _opt(_one_of("lmstudio", "openai"), None)  # None: inference.provider


@dataclass(frozen=True)
class RoutingConfig:
    # A conversation leaves the host holding its prefix only when that host has this many more requests in
    # flight than the least loaded candidate.
    load_bound: int = _opt(_range(0), 2)
    # Passive health (routing/health.py): a host whose calls fail this many times in a row (5xx, "no model
    # loaded", no answer in time) is left out for eject_secs times the times it was ejected, up to
    # max_eject_secs; never more than max_ejection_percent of the hosts at once (at least one).
    eject_after: int = _opt(_range(1), 3)
    eject_secs: float = _opt(_range(0, above=True), 5.0)
    max_eject_secs: float = _opt(_range(0, above=True), 300.0)
    max_ejection_percent: int = _opt(_range(0, 100), 50)
    # How long a host's model list may take: a probe (checks, refreshes, a host coming back) waits no longer.
    probe_timeout_secs: float = _opt(_range(0, above=True), 2.0)
    # Calls waiting for a host of the fleet to free a slot; one more is answered 429 with Retry-After.
    max_waiting: int = _opt(_range(1), 1024)


@dataclass(frozen=True)
class PlacementConfig:
    # on_demand: a model no host of the fleet has loaded is loaded on one host (LM Studio 0.4's load API) before
    # its calls go there, rather than every host loading it at once on first use. off: hosts load on use.
    mode: str = _opt(_one_of("off", "on_demand"), "off")
    # The most model instances placement keeps on one host: it unloads the least recently used idle one first.
    max_loaded_per_host: int | None = _opt(_range(1), None)
    # Models kept loaded on chosen hosts ({model: [host names]}), loaded at start and when a host comes back.
    pinned: dict[str, list[str]] = _opt(None, {})


@dataclass(frozen=True)
class LimitsConfig:
    # The most output tokens a call may ask for: a larger ask is lowered to it (on every generating route), and a
    # Responses call that asks none gets it. None: the model's loaded context length where LM Studio says it,
    # else DEFAULT_MAX_OUTPUT_TOKENS.
    max_output_tokens: int | None = _opt(_range(1), None)
    # Where tenants' limits are counted: memory (this process) or redis://host:port/db (every process using it).
    store: str = _opt(_limits_store, "memory")
    # The processes sharing the limits: while Redis cannot be reached each counts alone, to its limits divided by it.
    expected_processes: int = _opt(_range(1), 1)


DEFAULT_MAX_OUTPUT_TOKENS = 32768

DEFAULT_HOST_SLOTS = 4
"""A fleet host's slots when neither its configuration nor LM Studio says (LM Studio's default parallel is 4)."""

REPORTED_SLOTS_IDLE_CONNECTIONS = 32
"""The idle connections kept to a fleet host that reports its own slots (LM Studio's parallel, which changes as
models load and unload)."""

UNBOUNDED_IDLE_CONNECTIONS = 256
"""The idle connections kept to one host when nothing bounds the calls in flight (inference.max_concurrent_requests
0); each closes after http.keep_alive_secs unused."""


@dataclass(frozen=True)
class TranslationConfig:
    # Hosted tools (web_search, code_interpreter ...) in a call served through chat completions, which cannot
    # run them: drop them (named on the span), or reject the call with a 400.
    unsupported_tools: str = _opt(_one_of("drop", "reject"), "drop")


@dataclass(frozen=True)
class UsageConfig:
    # The usage ledger (one row per call; never content): none, auto (sqlite in systemd's StateDirectory when the
    # daemon has one, else none), sqlite:///path/usage.db, or postgresql://... for several gateways.
    store: str = _opt(_usage_store, "auto")
    keep_days: int = _opt(_range(1), 90)  # rows older than this are deleted
    max_buffered_rows: int = _opt(_range(1), 10000)  # rows waiting for the store; more are dropped and counted
    flush_secs: float = _opt(_range(0, above=True), 1.0)  # how often buffered rows are written


@dataclass(frozen=True)
class InferenceConfig:
    provider: str = _opt(_one_of("lmstudio", "openai", "mock"), "lmstudio")
    base_url: str = _opt(_http_url, "http://localhost:1234")
    default_model: str = _opt(_non_empty, "local-model")
    allowed_models: list[str] = _opt(None, [])
    api_key: str | None = _opt(None, None)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    models_cache_secs: float = _opt(_range(0), 10.0)
    max_concurrent_requests: int = _opt(_range(0), 0)
    max_queue: int = _opt(_range(0), 64)
    # More calls than this waiting for a slot (the queue, a fleet's wait): sheddable tenants' calls are refused.
    shed_above: int | None = _opt(_range(0), None)
    health_check_secs: float = _opt(_range(0), 10.0)  # 0: no background probe, no fail-fast
    http: HttpConfig = field(default_factory=HttpConfig)
    mock: MockConfig = field(default_factory=MockConfig)
    upstreams: list[UpstreamConfig] = _opt(None, [])  # several hosts; empty: base_url (and api_key) alone
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    translation: TranslationConfig = field(default_factory=TranslationConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)

    def idle_connections(self, host: UpstreamConfig) -> int:
        """The idle connections kept open to ``host``: ``http.max_idle_connections``, else as many as calls can be
        in flight there (a fleet's host: its ``max_concurrent``, or REPORTED_SLOTS_IDLE_CONNECTIONS when the host
        reports its slots; one host: ``max_concurrent_requests``, or
        UNBOUNDED_IDLE_CONNECTIONS when that is unlimited). A pool that keeps fewer opens and closes a connection
        on most calls once more calls than that run at once (with 10 kept, 64 clients got 14% fewer calls a second
        than 16)."""
        if self.http.max_idle_connections is not None:
            return self.http.max_idle_connections
        if len(self.upstreams) > 1:
            return host.max_concurrent or REPORTED_SLOTS_IDLE_CONNECTIONS
        return self.max_concurrent_requests or UNBOUNDED_IDLE_CONNECTIONS

    def hosts(self) -> list[UpstreamConfig]:
        """The hosts calls go to: ``upstreams``, or the one ``base_url`` names."""
        if self.upstreams:
            return list(self.upstreams)
        return [UpstreamConfig(base_url=self.base_url, name=host_name(self.base_url), api_key=self.api_key)]


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = _opt(None, True)
    path: str = _opt(_url_path, "/metrics")
    port: int | None = _opt(_range(0, 65535), None)  # None: on the main port; else a port of their own


@dataclass(frozen=True)
class TracingConfig:
    enabled: bool = _opt(None, True)
    exporter: str = _opt(_one_of("otlp", "console", "none"), "otlp")
    endpoint: str | None = _opt(None, None)
    protocol: str | None = _opt(_one_of("grpc", "http/protobuf"), None)  # None: OTEL_* variables, else grpc
    sample_ratio: float = _opt(_range(0, 1), 1.0)
    capture_content: bool = _opt(None, False)
    implementation: str = _opt(_one_of("lean", "sdk"), "lean")  # sdk: the OpenTelemetry SDK's own spans


@dataclass(frozen=True)
class ObservabilityConfig:
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _opt(_one_of("debug", "info", "warn", "warning", "error", "critical"), "info")
    format: str = _opt(_one_of("text", "json"), "text")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# -- loading -----------------------------------------------------------------------------------------------------


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration: defaults, then the YAML file at ``path``, then ``INFERENCE_*`` variables."""
    return load_with_sources(path, environ)[0]


def load_with_sources(path: str | None = None,
                      environ: Mapping[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """:func:`load`, plus where each key set by the file or the environment came from (``in FILE``,
    ``from VARIABLE``); keys missing from it have their defaults."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        tree = _read_yaml(path)
        sources = {key: f"in {path}" for key in _leaf_paths(tree)}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            keys = resolve_env_name(name)
            _put(tree, keys, value, name)
            sources[".".join(keys)] = f"from {name}"
    config = _build(Config, tree, (), sources)
    if config.inference.provider == "openai":
        config = dataclasses.replace(config, inference=_openai_settings(config.inference, sources, environ))
    elif any(host.provider == "openai" for host in config.inference.upstreams):
        config = dataclasses.replace(config, inference=_openai_hosts(config.inference, environ))
    _check_placement(config.inference)
    return config, sources


def _check_placement(inference: InferenceConfig) -> None:
    """Placement places models across a fleet's hosts: it needs one, and pinned hosts must be among them."""
    placement = inference.placement
    if placement.mode == "off" and not placement.pinned:
        return
    if len(inference.upstreams) < 2:
        raise ConfigError("inference.placement places models across the hosts of a fleet: it needs two or more "
                          "inference.upstreams")
    names = {host.name for host in inference.upstreams}
    for model, hosts in placement.pinned.items():
        unknown = [name for name in hosts if name not in names]
        if unknown:
            raise ConfigError(f"inference.placement.pinned.{model}: no host of inference.upstreams is named "
                              f"{unknown[0]} (the hosts are {', '.join(sorted(names))})")


def settings(config: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """Every leaf setting as (dotted key, value), in schema order."""
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        keys = prefix + (f.name,)
        if dataclasses.is_dataclass(value):
            out += settings(value, keys)
        elif f.name == "upstreams" and value:  # each host's settings, so that its key is shown as a secret
            out += [item for i, host in enumerate(value) for item in settings(host, (*prefix, f"upstreams[{i}]"))]
        else:
            out.append((".".join(keys), value))
    return out


def _openai_settings(inference: InferenceConfig, sources: Mapping[str, str],
                     environ: Mapping[str, str]) -> InferenceConfig:
    """The openai provider talks to api.openai.com unless told otherwise, with a key from OPENAI_API_KEY."""
    changes: dict[str, Any] = {}
    if "inference.base_url" not in sources:
        changes["base_url"] = OPENAI_BASE_URL
    if not inference.api_key and environ.get("OPENAI_API_KEY"):
        changes["api_key"] = environ["OPENAI_API_KEY"]
    inference = dataclasses.replace(inference, **changes)
    if not inference.api_key and urlsplit(inference.base_url).hostname == "api.openai.com":
        raise ConfigError("inference.api_key is not set: provider openai needs an API key "
                          "(inference.api_key, INFERENCE_INFERENCE_API_KEY or OPENAI_API_KEY)")
    return inference


def _openai_hosts(inference: InferenceConfig, environ: Mapping[str, str]) -> InferenceConfig:
    """Hosts of a fleet that are OpenAI's take their key from the host, else ``inference.api_key``, else
    OPENAI_API_KEY; OpenAI itself without a key fails at start."""
    hosts = []
    for i, host in enumerate(inference.upstreams):
        if host.provider == "openai" and not host.api_key:
            host = dataclasses.replace(host, api_key=inference.api_key or environ.get("OPENAI_API_KEY"))
            if not host.api_key and urlsplit(host.base_url).hostname == "api.openai.com":
                raise ConfigError(f"inference.upstreams[{i}].api_key is not set: host {host.name} (provider openai) "
                                  "needs an API key (its api_key, inference.api_key or OPENAI_API_KEY)")
        hosts.append(host)
    return dataclasses.replace(inference, upstreams=hosts)


def resolve_env_name(name: str) -> tuple[str, ...]:
    """Map ``INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS`` to ``("inference", "http", "timeout_secs")``.

    Key names contain underscores, so the name is matched against the schema rather than split blindly;
    ``__`` may be used as an unambiguous separator.
    """
    rest = name[len(ENV_PREFIX):].lower()
    if "__" in rest:
        keys = tuple(rest.split("__"))
        if _schema_type(keys) is not None:
            return keys
        matches: list[tuple[str, ...]] = []
    else:
        matches = _match_env(Config, rest)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"environment variable {name} is ambiguous: it could set " + " or ".join(
            ".".join(m) for m in matches))
    known = [ENV_PREFIX + "_".join(p).upper() for p in _all_leaf_paths(Config)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"unknown environment variable {name}: no such setting{hint}")


def env_name(keys: tuple[str, ...]) -> str:
    """The environment variable that sets the key path ``keys``."""
    return ENV_PREFIX + "_".join(keys).upper()


def _match_env(cls: Any, rest: str) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for f in dataclasses.fields(cls):
        kind = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            if rest.startswith(f.name + "_"):
                found += [(f.name, *sub) for sub in _match_env(kind, rest[len(f.name) + 1:])]
        elif rest == f.name:
            found.append((f.name,))
    return found


def _all_leaf_paths(cls: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for f in dataclasses.fields(cls):
        kind = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            out += _all_leaf_paths(kind, prefix + (f.name,))
        else:
            out.append(prefix + (f.name,))
    return out


def _schema_type(keys: tuple[str, ...]) -> Any | None:
    cls: Any = Config
    for key in keys:
        if not dataclasses.is_dataclass(cls) or key not in _field_types(cls):
            return None
        cls = _field_types(cls)[key]
    return None if dataclasses.is_dataclass(cls) else cls


def _field_types(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def _leaf_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out += _leaf_paths(value, dotted + ".") if isinstance(value, dict) else [dotted]
    return out


def _put(tree: dict[str, Any], keys: tuple[str, ...], value: str, origin: str) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {origin} sets a key inside {key}, which is not a section")
        node = child
    node[keys[-1]] = value


def _build(cls: Any, data: Any, path: tuple[str, ...], sources: Mapping[str, str]) -> Any:
    dotted = ".".join(path) or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{dotted} must be a section (a mapping of keys), not {data!r}")
    types = _field_types(cls)
    for key in data:
        if key not in types:
            allowed = ", ".join(types)
            where = ".".join(path + (str(key),))
            raise ConfigError(f"unknown config key {where} {sources.get(where, '')}".rstrip()
                              + f": allowed keys here are {allowed}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kind = types[f.name]
        keys = path + (f.name,)
        if dataclasses.is_dataclass(kind):
            values[f.name] = _build(kind, data[f.name], keys, sources)
        elif f.name == "upstreams":
            values[f.name] = _upstreams(data[f.name], keys, sources)
        else:
            values[f.name] = _value(kind, f.metadata.get("check"), data[f.name], keys, sources)
    return cls(**values)


def host_name(base_url: str) -> str:
    """A host's name when the configuration gives none: ``host:port`` of its URL."""
    parts = urlsplit(base_url)
    return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def _upstreams(raw: Any, keys: tuple[str, ...], sources: Mapping[str, str]) -> list[UpstreamConfig]:
    """``inference.upstreams``: a list of hosts (mappings, or bare URLs), or URLs separated by commas (the
    environment's form); each named, by its name or its host:port, and no two alike."""
    dotted = ".".join(keys)
    if isinstance(raw, str):
        raw = [url.strip() for url in raw.split(",") if url.strip()]
    if not isinstance(raw, list):
        raise ConfigError(f"{dotted} {sources.get(dotted, '')}".rstrip() + ": expected a list of hosts (each a URL "
                          "or a mapping with base_url, name, api_key, max_concurrent, weight, provider)")
    hosts = []
    for i, item in enumerate(raw):
        at = keys[:-1] + (f"{keys[-1]}[{i}]",)
        host = _build(UpstreamConfig, {"base_url": item} if isinstance(item, str) else item, at, sources)
        hosts.append(host if host.name else dataclasses.replace(host, name=host_name(host.base_url)))
    names = [host.name for host in hosts]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"{dotted}: two hosts are named {twice[0]}; give each a distinct name")
    return hosts


def without_password(value: Any) -> Any:
    """``value`` with the password of a URL in it (redis://:secret@host, postgresql://user:secret@db) hidden."""
    if isinstance(value, str) and "://" in value:
        return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", value)
    return value


def _value(kind: Any, check: Check | None, raw: Any, keys: tuple[str, ...], sources: Mapping[str, str]) -> Any:
    dotted = ".".join(keys)
    origin = sources.get(dotted, "")

    shown = "<redacted>" if "api_key" in dotted else repr(without_password(raw))  # never echo a secret

    def fail(allowed: str) -> ConfigError:
        return ConfigError(f"{dotted} = {shown} {origin}".rstrip() + f": expected {allowed}")

    value = _coerce(kind, raw, fail)
    if check is not None and value is not None:
        problem = check(value)
        if problem is not None:
            raise fail(problem)
    return value


def _coerce(kind: Any, raw: Any, fail: Callable[[str], ConfigError]) -> Any:
    """``raw`` (from YAML, or a string from the environment) as a value of the schema's type ``kind``."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "null", "none")):
            return None
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    coerce = _COERCIONS.get(typing.get_origin(kind) or kind)
    if coerce is None:
        raise AssertionError(f"unsupported config type {kind!r}")
    value, allowed = coerce(raw)
    if allowed is not None:
        raise fail(allowed)
    return value


Coerced = tuple[Any, str | None]  # the value, or None and what is allowed


def _to_bool(raw: Any) -> Coerced:
    if isinstance(raw, bool):
        return raw, None
    word = raw.strip().lower() if isinstance(raw, str) else None
    return (_BOOLS[word], None) if word in _BOOLS else (None, "true or false")


def _to_number(kind: type) -> Callable[[Any], Coerced]:
    allowed = "a whole number" if kind is int else "a number"

    def coerce(raw: Any) -> Coerced:
        if isinstance(raw, bool):
            return None, allowed
        try:
            number = float(raw) if isinstance(raw, str) else raw
        except ValueError:
            return None, allowed
        if not isinstance(number, (int, float)) or number != number or abs(number) == float("inf"):
            return None, allowed
        if kind is int:
            return (int(number), None) if float(number) == int(number) else (None, allowed)
        return float(number), None

    return coerce


def _to_str(raw: Any) -> Coerced:
    if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
        return str(raw), None
    return None, "a string"


def _to_strings(raw: Any) -> Coerced:
    """A list of strings; in an environment variable, separated by commas."""
    if isinstance(raw, str):
        raw = [item.strip() for item in raw.split(",") if item.strip()]
    if raw is None:
        return [], None
    if isinstance(raw, list) and all(isinstance(item, str) and item for item in raw):
        return list(raw), None
    return None, "a list of strings (comma-separated in an environment variable)"


def _to_names_by_key(raw: Any) -> Coerced:
    """A mapping of names to lists of names (``model: [host, ...]``); in an environment variable
    ``model=host1|host2,other=host3``."""
    if isinstance(raw, str):
        pairs = [item.partition("=") for item in raw.split(",") if item.strip()]
        if not all(sep for _, sep, _ in pairs):
            return None, "model=host1|host2,other-model=host3"
        raw = {key.strip(): [name.strip() for name in names.split("|") if name.strip()] for key, _, names in pairs}
    if raw is None:
        return {}, None
    mapping = {key: [value] if isinstance(value, str) else value for key, value in raw.items()} \
        if isinstance(raw, dict) else None
    if mapping is not None and all(isinstance(key, str) and key and _to_strings(names)[1] is None and names
                                   for key, names in mapping.items()):
        return mapping, None
    return None, "a mapping of model to a list of host names, e.g. {qwen3-8b: [mac-studio]}"


_COERCIONS: dict[Any, Callable[[Any], Coerced]] = {
    bool: _to_bool, int: _to_number(int), float: _to_number(float), str: _to_str, list: _to_strings,
    dict: _to_names_by_key,
}

_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
