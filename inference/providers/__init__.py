"""Model servers behind the gateway, chosen by ``inference.provider``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from twisted.web.iweb import IAgent

from ..config import InferenceConfig, UpstreamConfig
from ..reactor import IGatewayReactor
from .base import Provider

Connector = Callable[[str], IAgent]
"""How the gateway reaches an upstream, by its base URL: the default pools real connections; tests hand in an
in-memory agent per fake upstream (``tests/memory.py``)."""


def make_provider(reactor: IGatewayReactor, config: InferenceConfig, connect: Connector | None = None) -> Provider:
    """Build the configured provider: the mock, one host's, or a fleet's routing across several hosts."""
    provider = _make(reactor, config, connect)
    for each in (provider, *(host.provider for host in getattr(provider, "hosts", ()))):
        each.reject_unsupported_tools = config.translation.unsupported_tools == "reject"
    return provider


def _make(reactor: IGatewayReactor, config: InferenceConfig, connect: Connector | None) -> Provider:
    if config.provider == "mock":
        from .mock import MockProvider
        return MockProvider(reactor, config.mock)
    hosts = config.hosts()
    if len(hosts) == 1:
        return _host_provider(reactor, config, hosts[0], True, connect)
    from .fleet import FleetProvider, Host
    # A host that cannot be connected to is passed over at once (the next host is the retry); a pooled
    # connection that failed before the request went out is still retried on the same host.
    return FleetProvider([Host(host, _host_provider(reactor, config, host, False, connect))
                          for host in hosts], config.routing, reactor, placement=config.placement,
                         load_timeout=config.http.load_timeout_secs, shed_above=config.shed_above)


def _host_provider(reactor: IGatewayReactor, config: InferenceConfig, host: UpstreamConfig,
                   retry_connect: bool, connect: Connector | None) -> Provider:
    """One host's provider, with its key: the host's own, else ``inference.api_key`` when that was set for hosts
    of this kind (an OpenAI key, from OPENAI_API_KEY, is never sent to an LM Studio host)."""
    kind = host.provider or config.provider
    shared_key = config.api_key if kind == config.provider else None
    http = dataclasses.replace(config.http, max_idle_connections=config.idle_connections(host))
    config = dataclasses.replace(config, base_url=host.base_url, api_key=host.api_key or shared_key, provider=kind,
                                 http=http)
    agent = connect(host.base_url) if connect is not None else None
    if kind == "openai":
        from .openai import OpenAIProvider
        return OpenAIProvider(reactor, config, retry_connect, agent)
    from .lmstudio import LMStudioProvider
    return LMStudioProvider(reactor, config, retry_connect, agent)


__all__ = ["Connector", "Provider", "make_provider"]
