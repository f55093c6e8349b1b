"""The models the gateway serves, cached from the upstream, and how a requested name becomes a model id."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from .errors import AmbiguousModel, InvalidRequest, ModelNotFound
from .providers import Provider
from .tenants import Tenant

# What LM Studio's native API calls a model (``type``), as the kind of call it can serve.
_KINDS = {"llm": "llm", "vlm": "llm", "embeddings": "embeddings"}
_WRONG_KIND = {
    "llm": "The model '{name}' is an embedding model ({type}): it serves POST /v1/embeddings, not generation.",
    "embeddings": "The model '{name}' is a {type} model, not an embedding model: it cannot make embeddings.",
}


def kind_of(model: dict[str, Any]) -> str | None:
    """``llm`` or ``embeddings`` when the upstream said what the model is, else None (it may serve anything)."""
    return _KINDS.get(model.get("type") or "")


class ModelCatalog:
    """The upstream's model list, cached ``ttl`` seconds and filtered by ``allowed`` (empty: everything)."""

    def __init__(self, provider: Provider, clock: IReactorTime, ttl: float, allowed: list[str],
                 default_model: str) -> None:
        self._provider = provider
        self._clock: IReactorTime = clock
        self._ttl = ttl
        self._allowed = set(allowed)
        self._default = default_model
        self._upstream: list[dict[str, Any]] | None = None
        self._fetched_at = 0.0
        self._fetching: Deferred[list[dict[str, Any]]] | None = None
        self._waiters: list[Deferred[list[dict[str, Any]]]] = []
        provider.watch_models(self.expire)

    def expire(self) -> None:
        """The next request fetches the list again (the gateway loaded or unloaded a model)."""
        self._fetched_at = float("-inf")

    async def models(self, refresh: bool = False, tenant: Tenant | None = None) -> list[dict[str, Any]]:
        """The models clients (``tenant``'s, when given) may use, as OpenAI model objects."""
        return [m for m in await self._upstream_models(refresh) if self._is_allowed(m["id"], tenant)]

    def cached(self, requested: str | None, kind: str | None = None, tenant: Tenant | None = None) -> str | None:
        """The id ``requested`` resolves to in a list fetched less than ``ttl`` ago, without waiting; None when
        :meth:`resolve` must decide (no fresh list, or no match)."""
        if self._upstream is None or self._expired():
            return None
        return self._match(requested or self._default, self._upstream, kind, tenant)

    async def resolve(self, requested: str | None, kind: str | None = None, tenant: Tenant | None = None) -> str:
        """Turn a requested name (``None``: the default) into a served model id, or raise a 400/404.

        ``kind`` (``llm`` or ``embeddings``) narrows the candidates when the upstream says what its models are
        (LM Studio's native API does): ``nomic`` then finds the embedding model for ``/v1/embeddings``, and a chat
        naming an embedding model is told so. To ``tenant``, a model it may not use does not exist.
        """
        name = requested or self._default
        fresh = self._upstream is None or self._expired()
        upstream = await self._upstream_models()
        found = self._match(name, upstream, kind, tenant)
        if found is None and not fresh:  # a model loaded since the last fetch is found on a miss
            upstream = await self._upstream_models(refresh=True)
            found = self._match(name, upstream, kind, tenant)
        if found is not None:
            return found
        served = self._candidates(upstream, kind, tenant)
        if requested is None and len(served) == 1:
            return served[0]  # no model asked for, and only one can answer: LM Studio's own habit
        raise self._not_found(name, upstream, kind, tenant)

    async def get(self, model_id: str, tenant: Tenant | None = None) -> dict[str, Any]:
        """The model object served under exactly ``model_id`` (``GET /v1/models/{id}``), or a 404."""
        for refresh in (False, True):
            upstream = await self._upstream_models(refresh)
            for model in upstream:
                if model["id"] == model_id and self._is_allowed(model_id, tenant):
                    return model
        raise self._not_found(model_id, upstream, tenant=tenant)

    def context_length(self, model_id: str) -> int | None:
        """The context length ``model_id`` is loaded with, where the upstream says (LM Studio's native API)."""
        for model in self._upstream or ():
            if model["id"] == model_id:
                length = model.get("loaded_context_length")
                return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None
        return None

    def _not_found(self, name: str, upstream: list[dict[str, Any]], kind: str | None = None,
                   tenant: Tenant | None = None) -> ModelNotFound:
        served = self._candidates(upstream, kind, tenant)
        available = ", ".join(served) or "none (is a model loaded?)"
        if any(m["id"] == name for m in upstream) and (tenant is None or tenant.allows(name)):
            return ModelNotFound(f"The model '{name}' is not allowed on this gateway. Available models: "
                                 f"{available}", param="model")
        return ModelNotFound(f"The model '{name}' does not exist or is not loaded. Available models: {available}",
                             param="model")

    def _candidates(self, upstream: list[dict[str, Any]], kind: str | None, tenant: Tenant | None = None) -> list[str]:
        """The allowed ids that can serve ``kind`` (every allowed id when the upstream does not say)."""
        return [m["id"] for m in upstream
                if self._is_allowed(m["id"], tenant) and (kind is None or kind_of(m) in (None, kind))]

    def _match(self, name: str, upstream: list[dict[str, Any]], kind: str | None = None,
               tenant: Tenant | None = None) -> str | None:
        ids = self._candidates(upstream, kind, tenant)
        if name in ids:
            return name
        other = next((m for m in upstream if m["id"] == name and self._is_allowed(name, tenant)), None)
        if other is not None:  # served, but of another kind
            raise InvalidRequest(_WRONG_KIND[kind or ""].format(name=name, type=other.get("type")), param="model")
        lowered = name.lower()
        for candidates in ([i for i in ids if i.lower() == lowered], [i for i in ids if lowered in i.lower()]):
            if len(candidates) == 1:
                return candidates[0]
            if candidates:
                raise AmbiguousModel(f"The model name '{name}' matches several models: {', '.join(candidates)}. "
                                     "Use the full id.", param="model")
        return None

    def _is_allowed(self, model_id: str, tenant: Tenant | None = None) -> bool:
        """Served by this gateway (``allowed_models``) and, when a tenant asks, one it may use."""
        return (not self._allowed or model_id in self._allowed) and (tenant is None or tenant.allows(model_id))

    def _expired(self) -> bool:
        return self._clock.seconds() - self._fetched_at >= self._ttl

    async def _upstream_models(self, refresh: bool = False) -> list[dict[str, Any]]:
        if self._upstream is not None and not refresh and not self._expired():
            return self._upstream
        # One fetch serves every request that needs it; a waiter that is cancelled (its client left)
        # stops waiting without cancelling the fetch the others share.
        waiter: Deferred[list[dict[str, Any]]] = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        if self._fetching is None:
            self._fetching = Deferred.fromCoroutine(self._provider.list_models())
            self._fetching.addBoth(self._fetched)
        return await waiter

    def _fetched(self, result: Any) -> None:
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, list):
            self._upstream = result
            self._fetched_at = self._clock.seconds()
            for waiter in waiters:
                waiter.callback(result)
        else:
            for waiter in waiters:
                waiter.errback(result)
