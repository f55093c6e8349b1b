"""A provider for any server that speaks OpenAI's HTTP API (LM Studio, OpenAI, llama.cpp, vLLM ...)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from twisted.logger import Logger
from twisted.web.iweb import IAgent

from .. import jsonio
from ..config import InferenceConfig
from ..errors import GatewayError, UpstreamError, from_upstream
from ..operations import CHAT, Operation
from ..reactor import IGatewayReactor
from ..tenants import ANONYMOUS, Caller
from .base import ChatStream, Completion, Provider, Served
from .quirks import (
    LATE_SYSTEM,
    MISSING_ROUTE,
    STREAMED_TOOLS,
    Quirks,
    fold_late_system,
    has_late_system,
    refuses_late_system,
    refuses_streamed_tools,
    with_tool_call_content,
)
from .replay import AnsweredIfEmpty, PreparedStream, answer_events
from .translated import call_translated, open_translated
from .upstream import Answer, UpstreamClient, UpstreamEventStream

log = Logger()


class OpenAICompatibleProvider(Provider):
    name = "openai-compatible"

    def __init__(self, reactor: IGatewayReactor, config: InferenceConfig, retry_connect: bool = True,
                 agent: IAgent | None = None) -> None:
        # The upstream's key, on every request (LM Studio 0.4 asks one on every route when its authentication is on).
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = UpstreamClient(reactor, config.base_url, config.http, headers, retry_connect, agent)
        self.base_url = self.client.base_url
        self._reactor = reactor
        self._idle_timeout = config.http.timeout_secs
        self._load_timeout = config.http.load_timeout_secs
        self.states: dict[str, str | None] = {}  # each model's state ("loaded", "not-loaded"), where LM Studio says
        self._first_seen: dict[str, int] = {}
        self.quirks = Quirks(reactor, config.models_cache_secs)
        self._missing = MissingRoutes(self.quirks)

    async def list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        answer = await self.client.request("GET", "/v1/models", timeout=timeout)
        data = json_answer(answer)
        models = data.get("data")
        if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in models):
            raise UpstreamError("upstream model list is not an OpenAI list of models")
        return [self._complete(model) for model in models]

    def _complete(self, model: dict[str, Any]) -> dict[str, Any]:
        """A model object with every field OpenAI's schema requires (LM Studio and llama.cpp leave ``created``
        out, and strict clients refuse the list then); what the upstream sent, extra fields included, is kept.
        ``created`` is when the gateway first saw the model, so it stays the same from one listing to the next."""
        first_seen = self._first_seen.setdefault(model["id"], int(self._reactor.seconds()))
        complete = {**model, "object": "model"}
        if not isinstance(model.get("created"), int) or isinstance(model.get("created"), bool):
            complete["created"] = first_seen
        if not isinstance(model.get("owned_by"), str):
            complete["owned_by"] = self.name
        return complete

    async def call(self, operation: Operation, body: dict[str, Any], headers: dict[str, str] | None = None,
                   caller: Caller = ANONYMOUS) -> Completion:
        if self._missing.lacks(operation):
            return await call_translated(self, operation, body, headers)
        body = self._shaped(operation, body)
        loading = self._load_deadline(body["model"])
        with _loading(loading):
            answer = await self.client.request("POST", operation.path, jsonio.dumps(self.prepare(operation, body)),
                                               timeout=loading, headers=headers)
        if self._missing.says_missing(operation, answer):
            return await call_translated(self, operation, body, headers)
        try:
            data = json_answer(answer)
        except GatewayError as e:
            if self._refused_late_system(operation, body, e):
                return await self.call(operation, body, headers)
            raise
        if not isinstance(data.get(operation.answer_list), list):
            raise UpstreamError(f"upstream answer has no '{operation.answer_list}'")
        self._loaded(body["model"], loading)
        return Completion(data, answer.body, Served(model_load=loading))

    async def open_stream(self, operation: Operation, body: dict[str, Any], headers: dict[str, str] | None = None,
                          caller: Caller = ANONYMOUS) -> ChatStream:
        if self._missing.lacks(operation):
            return await open_translated(self, operation, body, headers)
        body = self._shaped(operation, body)
        if operation is CHAT and body.get("tools") and self.quirks.has(STREAMED_TOOLS, body["model"]):
            return await self._answer_as_stream(body, headers)
        body = self.prepare(operation, body)
        payload = {**body, "stream": True}
        if operation.asks_usage:  # the client's last chunk then carries usage, and metrics count real tokens
            payload["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        loading = self._load_deadline(body["model"])
        with _loading(loading):
            response = await self.client.open("POST", operation.path, jsonio.dumps(payload), timeout=loading,
                                              headers=headers)
        if isinstance(response, Answer):  # an error, or JSON where a stream was due (LM Studio's error in a 200)
            if self._missing.says_missing(operation, response):
                return await open_translated(self, operation, body, headers)
            try:
                json_answer(response)
            except GatewayError as e:
                if self._refused_late_system(operation, body, e):
                    return await self.open_stream(operation, body, headers)
                if operation is CHAT and body.get("tools") and refuses_streamed_tools(e):
                    self.quirks.note(STREAMED_TOOLS, body["model"])
                    return await self._answer_as_stream(body, headers)
                raise
            raise UpstreamError("upstream answered a streaming request with JSON instead of an event stream")
        self._loaded(body["model"], loading)
        stream = UpstreamEventStream(response, self._reactor, self._idle_timeout, first_timeout=loading)
        stream.served = Served(model_load=loading)
        if operation is CHAT:  # an empty stream is asked again whole: the answer, or the reason there is none
            tools = bool(body.get("tools"))
            return AnsweredIfEmpty(stream, partial(self._answer_events, body, headers, tools), also_if_cut=tools,
                                   clock=self._reactor)
        return stream

    def _shaped(self, operation: Operation, body: dict[str, Any]) -> dict[str, Any]:
        """A chat body as every local server takes it: tool-call turns with ``""`` content, and late system turns
        folded where this model's template refused them."""
        if operation is not CHAT:
            return body
        messages = with_tool_call_content(body["messages"])
        if self.quirks.has(LATE_SYSTEM, body["model"]) and has_late_system(messages):
            messages = fold_late_system(messages)
        return body if messages is body["messages"] else {**body, "messages": messages}

    def _refused_late_system(self, operation: Operation, body: dict[str, Any], error: GatewayError) -> bool:
        """Whether the upstream's template refused a late system turn that was not folded yet (then it is, from
        now on for this model, and the caller asks again)."""
        if operation is not CHAT or self.quirks.has(LATE_SYSTEM, body["model"]):
            return False
        if not (has_late_system(body["messages"]) and refuses_late_system(error)):
            return False
        log.info("upstream {upstream} refuses a system turn after the first for {model} ({error}); such turns are "
                 "folded into the user's turns", upstream=self.base_url, model=body["model"], error=error.message)
        self.quirks.note(LATE_SYSTEM, body["model"])
        return True

    async def _answer_events(self, body: dict[str, Any], headers: dict[str, str] | None,
                             tools: bool) -> list[tuple[bytes, bytes | None]]:
        """The whole answer to a chat stream that ended before its first event, as a stream's events. When that
        answer calls a tool, the upstream cannot stream tool calls: such calls are asked whole from now on."""
        try:
            answer = await self.call(CHAT, _whole(body), headers)
        except UpstreamError as e:
            if e.kind != "interrupted":
                raise
            # llama.cpp's Python server closes the connection its empty stream came on, and the pool may hand that
            # connection to this call before its close is read: the server says "disconnected before llm invoked",
            # so asking again (on a new connection) runs the generation once.
            answer = await self.call(CHAT, _whole(body), headers)
        if tools and not self.quirks.has(STREAMED_TOOLS, body["model"]) and _calls_tools(answer.data):
            log.info("upstream {upstream} sent an empty stream for a call of {model} that calls a tool: it cannot "
                     "stream tool calls; such calls are asked without streaming", upstream=self.base_url,
                     model=body["model"])
            self.quirks.note(STREAMED_TOOLS, body["model"])
        return answer_events(answer.data)

    async def _answer_as_stream(self, body: dict[str, Any], headers: dict[str, str] | None) -> ChatStream:
        answer = await self.call(CHAT, _whole(body), headers)
        stream = PreparedStream(self._reactor, answer_events(answer.data), 0.0, 0.0)
        stream.served = answer.served
        return stream

    def _load_deadline(self, model: str) -> float | None:
        """``http.load_timeout_secs`` when the server would load the model before answering (LM Studio's JIT
        loading takes seconds to minutes), else None: the usual deadline."""
        return self._load_timeout if self.states.get(model) == "not-loaded" else None

    def _loaded(self, model: str, loading: float | None) -> None:
        if loading is not None:
            self.states[model] = "loaded"  # it answered: the model is in memory now

    async def close(self) -> None:
        await self.client.close()


class MissingRoutes:
    """Which of the upstream's routes answered "no such route", so that calls go straight to chat completions
    (for as long as the upstream's quirks are remembered: then the route is tried again, in case the upstream was
    upgraded)."""

    def __init__(self, quirks: Quirks) -> None:
        self._quirks = quirks

    def lacks(self, operation: Operation) -> bool:
        return self._quirks.has(MISSING_ROUTE, operation.path)

    def says_missing(self, operation: Operation, answer: Answer) -> bool:
        """Whether ``answer`` says the upstream has no such route (and the operation can do without it); if so,
        remember it. A 404 about the model (OpenAI's ``model_not_found``) is not about the route."""
        if operation.translation is None:
            return False
        body = answer.body[:2048]
        missing = (answer.status in (404, 405) and b"model_not_found" not in body) or \
            b"Unexpected endpoint" in body  # LM Studio's words, with a 200 in some versions
        if missing:
            self._quirks.note(MISSING_ROUTE, operation.path)
        return missing


def _calls_tools(answer: dict[str, Any]) -> bool:
    choices = answer.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    return isinstance(message, dict) and bool(message.get("tool_calls"))


def _whole(body: dict[str, Any]) -> dict[str, Any]:
    """A streaming call's body, to ask for the whole answer instead."""
    return {key: value for key, value in body.items() if key not in ("stream", "stream_options")}


@contextmanager
def _loading(deadline: float | None) -> Iterator[None]:
    """Mark a failure of a call that was given the loading deadline, so that its span says so."""
    try:
        yield
    except GatewayError as e:
        e.model_load = deadline
        raise


def json_answer(answer: Answer) -> dict[str, Any]:
    """Decode a JSON answer, turning error statuses and errors hidden in a 200 into gateway errors."""
    if answer.status >= 400:
        raise from_upstream(answer.status, answer.body)
    try:
        data = jsonio.loads(answer.body)
    except ValueError:
        raise UpstreamError(f"upstream answered HTTP {answer.status} with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamError("upstream answered JSON that is not an object")
    if data.get("error") is not None:  # LM Studio reports some failures inside a 200
        raise from_upstream(500, answer.body, data)
    return data
