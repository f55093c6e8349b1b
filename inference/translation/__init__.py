"""Serving an API through chat completions, for upstreams that lack it (llama.cpp, older LM Studio, OpenAI for
Anthropic's Messages API): each :class:`Translation` says how a request becomes a chat request and how the chat
answer, whole or streamed, becomes the API's own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import messages, responses
from .chat import ChatResult, ChatStreamReader, StreamWriter, result_of


@dataclass(frozen=True)
class Translation:
    # (the API's request, refuse hosted tools) -> a chat request (or a 400)
    chat_request: Callable[[dict[str, Any], bool], dict[str, Any]]
    answer: Callable[[ChatResult, dict[str, Any]], dict[str, Any]]  # (chat answer, the request) -> the API's answer
    stream_writer: Callable[[dict[str, Any]], StreamWriter]  # the request -> the writer of its stream's events
    dropped: Callable[[dict[str, Any]], list[str]]  # the request -> what the chat request leaves out

    def translate_answer(self, chat_answer: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        return self.answer(result_of(chat_answer), body)

    def stream_reader(self, body: dict[str, Any]) -> ChatStreamReader:
        return ChatStreamReader(self.stream_writer(body))


RESPONSES_VIA_CHAT = Translation(responses.chat_request, responses.answer, responses.ResponseEvents, responses.dropped)
MESSAGES_VIA_CHAT = Translation(messages.chat_request, messages.answer, messages.MessageEvents, messages.dropped)
