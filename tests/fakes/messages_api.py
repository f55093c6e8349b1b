"""The fake LM Studio's native Messages API answers: a ``message`` object, or the events Anthropic streams it as."""

from __future__ import annotations

from typing import Any

from inference import jsonio


def message_object(message_id: str, model: str, words: list[str], finish: str, input_tokens: int,
                   done: bool = True) -> dict[str, Any]:
    """A ``message`` as Anthropic's Messages API shapes it (not ``done``: as ``message_start`` carries it)."""
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": " ".join(words)}] if done else [],
            "stop_reason": ("max_tokens" if finish == "length" else "end_turn") if done else None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": len(words) if done else 1}}


def message_events(message_id: str, model: str, words: list[str], finish: str,
                   input_tokens: int) -> list[tuple[bytes, bytes | None]]:
    """The events of a streamed message, each with its ``event:`` name, in Anthropic's order."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": message_object(message_id, model, words, finish, input_tokens, False)},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *[{"type": "content_block_delta", "index": 0,
           "delta": {"type": "text_delta", "text": word if i == 0 else " " + word}} for i, word in enumerate(words)],
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens" if finish == "length" else "end_turn",
                                            "stop_sequence": None},
         "usage": {"output_tokens": len(words)}},
        {"type": "message_stop"},
    ]
    return [(jsonio.dumps(event), event["type"].encode()) for event in events]
