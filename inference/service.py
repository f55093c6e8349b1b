"""Assemble the daemon: config -> provider -> Klein app -> Site -> listening service."""

from __future__ import annotations

from io import BytesIO
from typing import Any, Optional

from twisted.application import service, strports
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument
from twisted.logger import Logger
from twisted.web.server import Request, Site

from . import __version__
from .api import Gateway
from .config import Config, ServerConfig
from .providers import make_provider

log = Logger()


class GatewayRequest(Request):
    """A request whose body is kept in memory and stops growing at ``max_body_bytes``.

    twisted.web spools bodies over 100 kB to a temporary file (blocking disk I/O on the reactor) and has no
    size limit; here an oversized body is dropped as it arrives and the handler answers 413.
    """

    body_too_large = False

    def gotLength(self, length: Optional[int]) -> None:
        self.content = BytesIO()
        if length is not None and length > self.channel.site.max_body_bytes:
            self.body_too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        if self.content.tell() + len(data) > self.channel.site.max_body_bytes:
            self.body_too_large = True
            self.content = BytesIO()
            return
        self.content.write(data)


class GatewaySite(Site):
    requestFactory = GatewayRequest

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(gateway.app.resource())
        self.gateway = gateway
        self.max_body_bytes = gateway.config.server.max_body_bytes


def build_site(config: Config, reactor: Any) -> GatewaySite:
    """The web site for ``config``; its ``gateway.provider`` must be closed when done (``close_site``)."""
    return GatewaySite(Gateway(config, make_provider(reactor, config.inference), reactor))


def default_endpoint(server: ServerConfig) -> str:
    return f"tcp:port={server.port}:interface={quoteStringArgument(server.host)}"


class _ProviderService(service.Service):
    """Closes the provider's connections when the daemon stops."""

    def __init__(self, site: GatewaySite, endpoint: str) -> None:
        self._site = site
        self._endpoint = endpoint

    def startService(self) -> None:
        super().startService()
        gateway = self._site.gateway
        log.info("inference {version} serving provider {provider} ({upstream}) on {endpoint}",
                 version=__version__, provider=gateway.provider.name, upstream=gateway.provider.base_url,
                 endpoint=self._endpoint)

    def stopService(self) -> Any:
        super().stopService()
        return Deferred.fromCoroutine(self._site.gateway.provider.close())


def make_service(config: Config, listen: Optional[str] = None, reactor: Any = None) -> service.MultiService:
    """The whole daemon as a Twisted service: listen on ``listen`` (an endpoint string) or the config's."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor
        reactor = default_reactor
    site = build_site(config, reactor)
    endpoint = listen or default_endpoint(config.server)
    top = service.MultiService()
    _ProviderService(site, endpoint).setServiceParent(top)
    strports.service(endpoint, site).setServiceParent(top)
    return top

