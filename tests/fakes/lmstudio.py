"""A fake LM Studio server (twisted.web) that tests can tell how to misbehave.

It speaks the parts of LM Studio's OpenAI-compatible API the gateway uses, records what it receives, and
exposes Deferreds for the moments tests wait on (a request arrived, a connection was closed), so tests
synchronise on events rather than on sleeps.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IPushProducer
from twisted.protocols.policies import WrappingFactory
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from inference.sse import encode

from .messages_api import message_events, message_object
from .responses_api import response_events, response_object

CONTEXT_OVERFLOW = ("Trying to keep the first 5120 tokens when context the overflows. However, the model is loaded "
                    "with context length of only 4096 tokens, which is not enough. Try to load the model with a "
                    "larger context length, or provide a shorter input")


_ARRIVALS = itertools.count()  # one order across every fake, for tests of which host a call reached


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: int = field(default_factory=lambda: next(_ARRIVALS))
    every_header: list[tuple[str, str]] = field(default_factory=list)  # (name, value) as sent, repeats included


@dataclass
class Behaviour:
    """How the next answers look. ``mode`` is one of:

    normal, error_string, error_object, error_in_200, invalid_json, not_json_object, hang (never answers),
    stall_body (headers and half a body, then nothing), drop (closes the connection without answering),
    reset (a TCP RST instead of an answer), truncated (half the promised Content-Length, then closes),
    huge (a 200 JSON body of ``huge_bytes``), redirect (a 307 to ``location``).

    ``stream`` shapes a 200 stream (``stream: true`` with mode normal): normal, no_usage (ignores
    include_usage), no_done (ends without ``[DONE]``), die (two words, then the
    connection is cut), stall (two words, then silence), garbage (two words, then a broken event),
    empty (no events at all, and a non-streamed call is refused: a prompt longer than the context),
    error_event (two words, then an ``error`` event), flood (large events for ``flood_bytes``, obeying flow
    control), comments (SSE comments and CRLF line ends between events), named (an ``event:`` line on every
    event but ``[DONE]``), reasoning (three reasoning deltas before the words), huge_event (two words, then one
    event of ``huge_bytes`` that never ends), late (the headers, then nothing until ``release()``).
    """

    mode: str = "normal"
    stream: str = "normal"
    status: int = 500
    message: str = "something went wrong"
    code: str | None = None
    extra_message_fields: dict[str, Any] = field(default_factory=dict)
    flood_bytes: int = 0
    huge_bytes: int = 0
    location: str = ""


class FakeLMStudio(Resource):
    isLeaf = True

    def __init__(self, models: list[str] | None = None) -> None:
        super().__init__()
        self.models = list(models or ["qwen2.5-7b-instruct", "llama-3.2-3b-instruct"])
        self.chat = Behaviour()
        self.listing = Behaviour()
        self.require_key: str | None = None
        self.chat_only = False  # an upstream without the Responses and Messages APIs (llama.cpp, older LM Studio)
        self.llama_cpp_python = False  # its quirks: see like_llama_cpp_python()
        self._held_listings: list[http.Request] = []  # model lists asked while a generation is held (one slot)
        self.parallel_calls = False  # call every tool offered (up to two) at once, not only the first
        self.generating_elsewhere = False  # a generation another client asked runs (one slot: lists wait for it)
        self.loaded_context: int | None = None  # /api/v0/models says each loaded model's loaded_context_length
        self.native_types: dict[str, str] | None = None  # id -> llm/vlm/embeddings: serve the native API
        self.native_versions: tuple[str, ...] = ("v0",)  # which native APIs: v0 (LM Studio 0.3), v1 (0.4)
        self.parallel: int | None = None  # /api/v1/models says each loaded instance's parallel slots
        self.not_loaded: set[str] = set()  # models /api/v0/models says are not loaded (LM Studio loads on use)
        # LM Studio 0.4's loaded instances by model, once a test sets it (``start_empty``): loads add to it, unloads
        # take from it, and a call for a model with none loads one first (LM Studio's JIT load).
        self.instances: dict[str, list[dict[str, Any]]] | None = None
        self.contexts: dict[str, int] = {}  # a model's loaded context length, when not ``loaded_context``
        self.no_tools: set[str] = set()  # models LM Studio 0.4 says were not trained for tool use
        self.loads: list[str] = []  # the models POST /api/v1/models/load was asked for, in order
        self.unloads: list[str] = []  # the instance ids POST /api/v1/models/unload was asked for
        self.jit_loads: list[str] = []  # models loaded because a call asked for them
        self.load_gate: Deferred[None] | None = None  # loads answer once it fires (else at once)
        self.load_error: str | None = None  # loads fail with this message (a 500, as when memory runs out)
        self.gzip = False  # compress answers for clients that accept gzip (as OpenAI does)
        self.set_cookie: str | None = None  # a Set-Cookie header on every answer
        self.received: list[Received] = []
        self.responses: list[str] = []  # the ids of the responses it gave (a previous_response_id must be one)
        self.pending: list[http.Request] = []  # requests held open by hang / stall_body / late
        self._late: dict[http.Request, bytes] = {}  # the events of a late stream, sent when released
        self._arrivals: list[Deferred[Received]] = []
        self._closed: list[Deferred[None]] = []
        self.site = Site(self)
        self.connections = _ConnectionTracker(self.site)
        self.url = ""

    def like_llama_cpp_python(self) -> FakeLMStudio:
        """Behave as llama-cpp-python's server (0.3.x, one slot) does: chat completions only; ``content: null`` or no
        content on an assistant turn is a 500; a system turn after the first is refused by the chat template; a
        streamed call with tools that the model answers with a tool call (``tool_choice`` auto) is an empty 200;
        the model list waits for the running generation (hold one with ``chat.mode = "hang"``)."""
        self.chat_only = True
        self.llama_cpp_python = True
        return self

    # -- what tests wait on --------------------------------------------------------------------------------------

    def next_arrival(self) -> Deferred[Received]:
        """Fires when the next request reaches the fake."""
        d: Deferred[Received] = Deferred()
        self._arrivals.append(d)
        return d

    def next_close(self) -> Deferred[None]:
        """Fires when a held (hanging) request sees its connection closed by the gateway."""
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        return d

    # -- twisted.web ---------------------------------------------------------------------------------------------

    def render(self, request: http.Request) -> Any:
        answer = self._render(request)
        if self.set_cookie:
            request.setHeader(b"set-cookie", self.set_cookie.encode())
        accepted = (request.getHeader(b"accept-encoding") or b"").split(b",")
        if self.gzip and isinstance(answer, bytes) and b"gzip" in [a.strip() for a in accepted]:
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(answer)
        return answer

    def _render(self, request: http.Request) -> Any:
        """Record the request, check the key, then answer it by its route (``_ROUTES``)."""
        raw = request.content.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        got = Received(request.method.decode(), request.path.decode(), headers, body, every_header=[
            (k.decode().lower(), v.decode()) for k, vs in request.requestHeaders.getAllRawHeaders() for v in vs])
        self.received.append(got)
        arrivals, self._arrivals = self._arrivals, []
        for d in arrivals:
            d.callback(got)
        if self.require_key and headers.get("authorization") != f"Bearer {self.require_key}":
            return self._json(request, 401, {"error": {"message": "Incorrect API key provided",
                                                       "type": "invalid_request_error",
                                                       "code": "invalid_api_key"}})
        handler = self._ROUTES.get((got.method, got.path))
        answer = handler(self, request, body) if handler is not None else None
        if answer is None:
            return self._json(request, 404, {"error": f"Unexpected endpoint or method. ({got.method} {got.path})"})
        return answer

    # -- routes (each answers, or None: not served by this fake as configured, a 404) ---------------------------

    def _models(self, request: http.Request, body: Any) -> Any:
        if self.llama_cpp_python and (self.pending or self.generating_elsewhere):
            self._held_listings.append(request)  # one slot: the list comes after the running generation
            request.notifyFinish().addBoth(lambda _: request in self._held_listings and
                                           self._held_listings.remove(request))
            return NOT_DONE_YET
        listing = [{"id": m, "object": "model", "owned_by": "organization_owner"} for m in self.models]
        return self._answer(request, self.listing, {"object": "list", "data": listing})

    def _v0_models(self, request: http.Request, body: Any) -> Any:
        if self.native_types is None or "v0" not in self.native_versions:
            return None
        native = [{"id": m, "object": "model", "type": self.native_types.get(m, "llm"),
                   "state": "loaded" if self._loaded_instances(m) else "not-loaded",
                   "max_context_length": 4096, "publisher": "fake",
                   **({"loaded_context_length": self.loaded_context} if self.loaded_context else {})}
                  for m in self.models]
        return self._json(request, 200, {"object": "list", "data": native})

    def _v1_models(self, request: http.Request, body: Any) -> Any:
        if self.native_types is None or "v1" not in self.native_versions:
            return None
        return self._json(request, 200, {"models": [self._v1_model(m) for m in self.models]})

    def _jit_load(self, body: Any) -> None:
        """LM Studio loads a model a call asks for before answering (when the test tracks instances)."""
        if isinstance(body, dict) and isinstance(body.get("model"), str) and self.instances is not None and \
                body["model"] in self.models and not self.instances.get(body["model"]):
            self.jit_loads.append(body["model"])
            self._add_instance(body["model"])

    def _messages(self, request: http.Request, body: Any) -> Any:
        if self.chat_only:
            return None
        self._jit_load(body)
        words = f"echo: {self._said(body)}".split(" ")
        if isinstance(body, dict) and body.get("stream") and self.chat.mode == "normal":
            request.setHeader(b"content-type", b"text/event-stream")
            events = message_events("msg_fake123", body["model"], words, "stop", 5)
            if self.chat.stream == "error_event":  # a few events, then Anthropic's error event
                events = events[:4] + [(b'{"type": "error", "error": {"type": "overloaded_error", '
                                        b'"message": "model crashed"}}', b"error")]
            return b"".join(encode(data, name) for data, name in events)
        return self._answer(request, self.chat, message_object("msg_fake123", body["model"], words, "stop", 5))

    def _responses(self, request: http.Request, body: Any) -> Any:
        if self.chat_only:
            return None
        self._jit_load(body)
        words = f"echo: {self._said(body)}".split(" ")
        previous = body.get("previous_response_id") if isinstance(body, dict) else None
        if previous is not None and previous not in self.responses:  # as LM Studio and OpenAI answer it
            return self._json(request, 400, {"error": {
                "message": f"Previous response with id '{previous}' not found.", "type": "invalid_request_error",
                "param": "previous_response_id", "code": "previous_response_not_found"}})
        response_id = f"resp_{id(self):x}_{len(self.responses)}"  # each fake host its own
        self.responses.append(response_id)
        if isinstance(body, dict) and body.get("stream") and self.chat.mode == "normal":
            request.setHeader(b"content-type", b"text/event-stream")
            events = response_events(response_id, body, 1700000000, words, "stop", 5)
            if self.chat.stream == "error_event":  # a few events, then the Responses API's error event
                events = events[:5] + [(b'{"type": "error", "code": "server_error", "message": "model crashed"}',
                                        b"error")]
            return b"".join(encode(data, name) for data, name in events)
        return self._answer(request, self.chat, response_object(response_id, body, 1700000000, words, "stop", 5))

    def _embeddings_route(self, request: http.Request, body: Any) -> Any:
        self._jit_load(body)
        return self._answer(request, self.chat, self._embeddings(body))

    def _completions(self, request: http.Request, body: Any) -> Any:
        """``/v1/chat/completions`` and ``/v1/completions``."""
        self._jit_load(body)
        refused = self._llama_cpp_python_refuses(body) if self.llama_cpp_python else None
        if refused is not None:
            return self._json(request, refused[0], {"error": {"message": refused[1], "type": "server_error"}})
        if self.llama_cpp_python and isinstance(body, dict) and body.get("stream") and \
                self._tool_call(body) is not None and body.get("tool_choice", "auto") == "auto":
            # "Automatic streaming tool choice is not supported": the server raises inside its stream, which
            # ends empty, and closes the connection (a pooled client finds it closed on its next request).
            request.setHeader(b"content-type", b"text/event-stream")
            transport = request.channel.transport
            request.write(b"")
            request.finish()
            transport.loseConnection()
            return NOT_DONE_YET
        if self.chat.mode == "normal" and isinstance(body, dict) and body.get("stream"):
            return self._stream(request, body)
        if self.chat.mode == "normal" and self.chat.stream == "empty":  # as LM Studio answers a prompt too long
            return self._json(request, 400, {"error": CONTEXT_OVERFLOW})
        return self._answer(request, self.chat, self._completion(body))

    def _load_route(self, request: http.Request, body: Any) -> Any:
        return self._load(request, body) if "v1" in self.native_versions else None

    def _unload_route(self, request: http.Request, body: Any) -> Any:
        return self._unload(request, body) if "v1" in self.native_versions else None

    _ROUTES: dict[tuple[str, str], Callable[[FakeLMStudio, http.Request, Any], Any]] = {
        ("GET", "/v1/models"): _models,
        ("GET", "/api/v0/models"): _v0_models,
        ("GET", "/api/v1/models"): _v1_models,
        ("POST", "/api/v1/models/load"): _load_route,
        ("POST", "/api/v1/models/unload"): _unload_route,
        ("POST", "/v1/messages"): _messages,
        ("POST", "/v1/responses"): _responses,
        ("POST", "/v1/embeddings"): _embeddings_route,
        ("POST", "/v1/chat/completions"): _completions,
        ("POST", "/v1/completions"): _completions,
    }

    def _v1_model(self, model: str) -> dict[str, Any]:
        """One model as LM Studio 0.4's ``GET /api/v1/models`` lists it (its documented fields)."""
        kind = (self.native_types or {}).get(model, "llm")
        return {"type": "embedding" if kind == "embeddings" else "llm", "publisher": "fake", "key": model,
                "display_name": model, "max_context_length": 32768, "format": "gguf",
                "loaded_instances": self._loaded_instances(model),
                **({} if kind == "embeddings" else {"capabilities": {
                    "vision": kind == "vlm", "trained_for_tool_use": model not in self.no_tools}})}

    def start_empty(self) -> FakeLMStudio:
        """LM Studio 0.4 with its models downloaded and none loaded: loads and unloads change what it lists."""
        self.native_versions = ("v1",)
        self.native_types = self.native_types or {}
        self.instances = {}
        return self

    def _instance_config(self, model: str) -> dict[str, Any]:
        config: dict[str, Any] = {"context_length": self.contexts.get(model) or self.loaded_context or 4096}
        if self.parallel is not None:
            config["parallel"] = self.parallel
        return config

    def _loaded_instances(self, model: str) -> list[dict[str, Any]]:
        if self.instances is not None:
            return self.instances.get(model, [])
        return [] if model in self.not_loaded else [{"id": model, "config": self._instance_config(model)}]

    def _add_instance(self, model: str) -> str:
        """A new loaded instance of ``model``: LM Studio names the first after the model, the next ``model:2``."""
        assert self.instances is not None
        loaded = self.instances.setdefault(model, [])
        taken = {instance["id"] for instance in loaded}
        instance_id = next(name for n in range(1, 99) if (name := model if n == 1 else f"{model}:{n}") not in taken)
        loaded.append({"id": instance_id, "config": self._instance_config(model)})
        return instance_id

    def _load(self, request: http.Request, body: Any) -> Any:
        """``POST /api/v1/models/load``: answers once the model is loaded; a model loaded already gets a second
        instance (as LM Studio does)."""
        model = body.get("model") if isinstance(body, dict) else None
        if model not in self.models:
            return self._json(request, 404, {"error": {"message": f"Model '{model}' not found", "type": "not_found"}})
        self.loads.append(model)
        if self.load_error is not None:
            return self._json(request, 500, {"error": {"message": self.load_error, "type": "server_error"}})
        if self.instances is None:
            self.instances = {m: self._loaded_instances(m) for m in self.models}

        def loaded(_: object = None) -> bytes:
            instance_id = self._add_instance(model)
            return self._json(request, 200, {"type": "llm", "model_instance_id": instance_id, "status": "loaded",
                                             "config": self._instance_config(model), "load_time_seconds": 1.25})

        if self.load_gate is None:
            return loaded()
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)  # (the gateway gave up on the load: nothing to answer)

        def opened(passed: object) -> object:
            if not finished.called:
                request.write(loaded())
                request.finish()
            return passed

        self.load_gate.addCallback(opened)
        return NOT_DONE_YET

    def _unload(self, request: http.Request, body: Any) -> bytes:
        instance_id = body.get("instance_id") if isinstance(body, dict) else None
        for loaded in (self.instances or {}).values():
            for instance in loaded:
                if instance["id"] == instance_id:
                    loaded.remove(instance)
                    self.unloads.append(instance_id)
                    return self._json(request, 200, {"instance_id": instance_id})
        return self._json(request, 404, {"error": {"message": f"No loaded instance '{instance_id}'"}})

    @staticmethod
    def _llama_cpp_python_refuses(body: Any) -> tuple[int, str] | None:
        """What llama-cpp-python's server refuses in a chat request: (status, its message), or None."""
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            return None
        for message in messages:
            if message.get("role") == "assistant" and not isinstance(message.get("content"), str):
                return 500, "can only concatenate str (not \"NoneType\") to str"
        roles = [message.get("role") for message in messages]
        first_other = next((i for i, role in enumerate(roles) if role != "system"), len(roles))
        if "system" in roles[first_other:]:
            return 400, "System message must be at the beginning."
        return None

    @staticmethod
    def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
        """One 3-dimensional vector per input (its length, and two constants), base64 when asked."""
        given = body["input"]
        inputs = [given] if isinstance(given, str) or isinstance(given[0], int) else given
        data = []
        for index, item in enumerate(inputs):
            vector = [float(len(item)), 0.5, -0.25]
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack("<3f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        return {"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": 2 * len(inputs), "total_tokens": 2 * len(inputs)}}

    @staticmethod
    def _said(body: dict[str, Any]) -> str:
        """What the fake echoes: the last message of a chat, the prompt of a text completion."""
        if "prompt" in body:
            prompt = body["prompt"]
            return prompt if isinstance(prompt, str) else str(prompt[0])
        if "input" in body:
            given = body["input"]
            content = given if isinstance(given, str) else given[-1].get("content")
        else:
            content = body["messages"][-1]["content"]
        if isinstance(content, list):  # content blocks / parts
            return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)

    @staticmethod
    def _tool_call(body: dict[str, Any]) -> tuple[str, str] | None:
        """The tool the fake calls (the one ``tool_choice`` names, else the first) and its arguments, unless the
        request offers none or the conversation ends with a tool's result (then the fake echoes that)."""
        tools, choice = body.get("tools"), body.get("tool_choice")
        if "messages" not in body or not tools or choice == "none" or body["messages"][-1]["role"] == "tool":
            return None
        name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
        return name, json.dumps({"echo": FakeLMStudio._said(body)})

    def _calls(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        """The tool calls the fake makes: the one of ``_tool_call``, or (``parallel_calls``) one per tool offered."""
        call = self._tool_call(body)
        if call is None or not self.parallel_calls:
            return [call] if call is not None else []
        return [(tool["function"]["name"], call[1]) for tool in body["tools"][:2]]

    @staticmethod
    def _words(body: dict[str, Any]) -> tuple[list[str], str]:
        """The words the fake answers, cut to ``max_tokens`` (one word, one token), and its finish reason."""
        words = f"echo: {FakeLMStudio._said(body)}".split(" ")
        limit = body.get("max_tokens")
        return (words[:limit], "length") if isinstance(limit, int) and len(words) > limit else (words, "stop")

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        words, finish = self._words(body)
        text = " ".join(words)
        call = self._tool_call(body)
        if "prompt" in body:
            return {"id": "cmpl-fake123", "object": "text_completion", "created": 1700000000, "model": body["model"],
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
        return {
            "id": "chatcmpl-fake123", "object": "chat.completion", "created": 1700000000,
            "model": body["model"], "system_fingerprint": body["model"],
            "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls" if call else finish,
                         "message": {"role": "assistant", "content": None if call else text,
                                     **({"tool_calls": [{"id": f"call_fake{i + 1}", "type": "function",
                                                         "function": {"name": name, "arguments": arguments}}
                                                        for i, (name, arguments) in enumerate(self._calls(body))]}
                                        if call else {}),
                                     **self.chat.extra_message_fields}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
            "stats": {}, "runtime": "llama.cpp",
        }

    def _answer(self, request: http.Request, behaviour: Behaviour, normal: dict[str, Any]) -> Any:
        mode = behaviour.mode
        if mode == "normal":
            return self._json(request, 200, normal)
        if mode == "error_string":
            return self._json(request, behaviour.status, {"error": behaviour.message})
        if mode == "error_object":
            error = {"message": behaviour.message, "type": "invalid_request_error", "param": None,
                     "code": behaviour.code}
            return self._json(request, behaviour.status, {"error": error})
        if mode == "error_in_200":
            return self._json(request, 200, {"error": behaviour.message})
        if mode == "invalid_json":
            request.setHeader(b"content-type", b"application/json")
            return b'{"choices": [ this is not json'
        if mode == "not_json_object":
            return self._json(request, 200, ["a", "list"])
        if mode == "drop":
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        if mode == "reset":
            reset(request)
            return NOT_DONE_YET
        if mode == "truncated":
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"400")
            request.write(b'{"id": "chatcmpl-cut", "object": "chat.completion", "choices": [{"index": 0, ')
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if mode == "redirect":
            request.setResponseCode(307)
            request.setHeader(b"location", behaviour.location.encode())
            return b""
        if mode == "huge":
            filler = "x" * behaviour.huge_bytes
            return self._json(request, 200, {**normal, "choices": [{"index": 0, "finish_reason": "stop",
                                                                    "message": {"role": "assistant",
                                                                                "content": filler}}]})
        if mode in ("hang", "stall_body"):
            self.pending.append(request)
            request.notifyFinish().addBoth(self._held_closed, request)
            if mode == "stall_body":
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"id": "chatcmpl-stall", "choices": [')
            return NOT_DONE_YET
        raise AssertionError(f"unknown mode {mode}")

    def _stream(self, request: http.Request, body: dict[str, Any]) -> Any:
        """A streamed answer, as ``chat.stream`` says: normal, broken in one of several ways, flooding, late."""
        mode = self.chat.stream
        request.setHeader(b"content-type", b"text/event-stream")
        events = _StreamEvents(body)
        words, finish = self._words(body)
        call = self._tool_call(body)
        pieces = events.opening()
        for i, (name, arguments) in enumerate(self._calls(body)):
            pieces += events.tool_call(i, name, arguments)
        if call is None and mode == "reasoning":  # LM Studio's reasoning deltas first, then the answer
            pieces += [events.delta("", reasoning=w) for w in ("let", " me", " think")]
        if call is None:
            pieces += [events.delta(w if i == 0 else " " + w, reasoning="") for i, w in enumerate(words)]
        if mode in ("die", "stall", "garbage", "error_event", "huge_event"):
            return self._broken_stream(request, pieces[:3], mode)
        if mode == "flood":
            Flood(request, self).start(events.delta("x" * 4000), self.chat.flood_bytes,
                                       events.usage(1, 1) + b"data: [DONE]\n\n")
            return NOT_DONE_YET
        if mode == "empty":
            return b""
        pieces.append(events.finish("tool_calls" if call else finish))
        if (body.get("stream_options") or {}).get("include_usage") and mode != "no_usage":
            pieces.append(events.usage(12, len(words)))
        if mode != "no_done":
            pieces.append(b"data: [DONE]\n\n")
        if mode == "comments":
            pieces = [b": keep-alive\r\n" + p.replace(b"\n", b"\r\n") for p in pieces]
        if mode == "named":
            pieces = [b"event: completion\n" + p for p in pieces[:-1]] + pieces[-1:]
        if mode == "late":  # the headers now, the events when released (as while a model is being loaded)
            request.write(b"")
            self._late[request] = b"".join(pieces)
            self._hold(request)
            return NOT_DONE_YET
        return b"".join(pieces)

    def _broken_stream(self, request: http.Request, sent: list[bytes], mode: str) -> Any:
        """A few events, then the stream breaks as ``mode`` says, and the request is held."""
        request.write(b"".join(sent))
        if mode == "die":  # the process dies: what was sent arrives, then the connection closes
            request.channel.transport.loseConnection()
        elif mode == "huge_event":
            request.write(b'data: {"choices": [{"delta": {"content": "' + b"y" * self.chat.huge_bytes)
        elif mode == "garbage":
            request.write(b'data: {"choices": [{"delta": {"content": "x"\n\n')
        elif mode == "error_event":
            request.write(b'data: {"error": {"message": "model crashed", "type": "server_error"}}\n\n')
        self._hold(request)
        return NOT_DONE_YET

    def _hold(self, request: http.Request) -> None:
        self.pending.append(request)
        request.notifyFinish().addBoth(self._held_closed, request)

    def release(self, count: int | None = None) -> None:
        """Answer the held requests (the ones waiting in ``hang`` mode) normally: the first ``count``, else all."""
        for request in list(self.pending)[:count]:
            self.pending.remove(request)
            late = self._late.pop(request, None)  # a stream held before its first event
            request.write(late if late is not None else
                          self._json(request, 200, self._completion(json.loads(request.content.getvalue()))))
            request.finish()
        listings, self._held_listings = self._held_listings, []
        for request in listings:
            listing = [{"id": m, "object": "model", "owned_by": "organization_owner"} for m in self.models]
            request.write(self._json(request, 200, {"object": "list", "data": listing}))
            request.finish()

    def reset_held(self) -> None:
        """Cut every held request's connection with a TCP RST (a crash in the middle of an answer)."""
        for request in list(self.pending):
            reset(request)

    def _held_closed(self, _: Any, request: http.Request) -> None:
        if request in self.pending:
            self.pending.remove(request)
        closed, self._closed = self._closed, []
        for d in closed:
            d.callback(None)

    @staticmethod
    def _json(request: http.Request, status: int, payload: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(payload).encode()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> Any:
        self.port = reactor.listenTCP(port, self.connections, interface=interface)
        host = f"[{interface}]" if ":" in interface else interface
        self.url = f"http://{host}:{self.port.getHost().port}"
        return self.port

    def stop(self) -> Deferred:
        """Stop listening and drop every open connection (held requests included)."""
        d = self.port.stopListening()
        return DeferredList([d, self.connections.close_all()])


class _StreamEvents:
    """The events of a streamed chat or text completion, as LM Studio writes them."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.text_completion = "prompt" in body
        self._head = {"id": "cmpl-fakestream" if self.text_completion else "chatcmpl-fakestream",
                      "object": "text_completion" if self.text_completion else "chat.completion.chunk",
                      "created": 1700000000, "model": body["model"]}

    def event(self, choices: list[Any], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**self._head, "choices": choices, **extra}).encode() + b"\n\n"

    def opening(self) -> list[bytes]:
        if self.text_completion:
            return []
        return [self.event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]

    def delta(self, content: str, **more: Any) -> bytes:
        if self.text_completion:
            return self.event([{"index": 0, "text": content, "logprobs": None, "finish_reason": None}])
        return self.event([{"index": 0, "delta": {"content": content, **more}, "finish_reason": None}])

    def tool_call(self, index: int, name: str, arguments: str) -> list[bytes]:
        """A call's id and name, then its arguments in two pieces."""
        half = len(arguments) // 2
        opening = {"index": index, "id": f"call_fake{index + 1}", "type": "function",
                   "function": {"name": name, "arguments": ""}}
        calls = [[opening], *[[{"index": index, "function": {"arguments": piece}}]
                              for piece in (arguments[:half], arguments[half:])]]
        return [self.event([{"index": 0, "delta": {"tool_calls": c}, "finish_reason": None}]) for c in calls]

    def finish(self, reason: str) -> bytes:
        if self.text_completion:
            return self.event([{"index": 0, "text": "", "finish_reason": "stop"}])
        return self.event([{"index": 0, "delta": {}, "finish_reason": reason}])

    def usage(self, prompt: int, completion: int) -> bytes:
        return self.event([], usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                     "total_tokens": prompt + completion})


def reset(request: http.Request) -> None:
    """Close the connection with a TCP RST (what a crashing process or a firewall does), not a FIN."""
    transport = request.channel.transport
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abortConnection()


class _ConnectionTracker(WrappingFactory):
    """Wraps the site to count the server-side connections that are open (pooling and aborts show here)."""

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.total = 0
        self._changes: list[Deferred[None]] = []

    @property
    def open(self) -> list[Any]:
        return list(self.protocols)

    def registerProtocol(self, p: Any) -> None:
        self.total += 1
        super().registerProtocol(p)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        changes, self._changes = self._changes, []
        for d in changes:
            d.callback(None)

    async def wait_open(self, count: int) -> None:
        """Wait until at most ``count`` connections are open."""
        while len(self.protocols) > count:
            d: Deferred[None] = Deferred()
            self._changes.append(d)
            await d

    def close_all(self) -> Deferred:
        for proto in list(self.protocols):
            proto.transport.abortConnection()
        return Deferred.fromCoroutine(self.wait_open(0))


@implementer(IPushProducer)
class Flood:
    """Writes one event over and over, as fast as the gateway takes it, then ends the stream."""

    def __init__(self, request: http.Request, fake: FakeLMStudio) -> None:
        self.request = request
        self.written = 0
        self.paused = False
        self.finished = False
        self._pause_waiters: list[Deferred[None]] = []
        fake.flood = self

    def start(self, chunk: bytes, total: int, tail: bytes) -> None:
        self._chunk, self._total, self._tail = chunk, total, tail
        self.request.registerProducer(self, True)
        self._pump()

    def next_pause(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.paused:
            d.callback(None)
        else:
            self._pause_waiters.append(d)
        return d

    def _pump(self) -> None:
        while not self.paused and not self.finished and self.written < self._total:
            self.request.write(self._chunk)
            self.written += len(self._chunk)
        if self.written >= self._total and not self.finished:
            self.finished = True
            self.request.write(self._tail)
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True
        waiters, self._pause_waiters = self._pause_waiters, []
        for d in waiters:
            d.callback(None)

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.finished = True
