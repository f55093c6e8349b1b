"""The fake LM Studio's native Responses API: a ``response`` object, or the typed events OpenAI streams it as."""

from __future__ import annotations

from typing import Any

from inference import jsonio


def response_object(response_id: str, body: dict[str, Any], created: int, words: list[str], finish: str,
                    input_tokens: int, done: bool = True) -> dict[str, Any]:
    """A ``response`` as OpenAI's Responses API shapes it (``done``: with its output and usage)."""
    text = " ".join(words)
    incomplete = finish == "length"
    message = {"id": f"msg_{response_id}", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {
        "id": response_id, "object": "response", "created_at": created, "model": body["model"],
        "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
        "output": [message] if done else [], "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and incomplete else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "parallel_tool_calls": True, "previous_response_id": body.get("previous_response_id"),
        "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0), "tool_choice": "auto",
        "tools": [], "text": {"format": {"type": "text"}}, "metadata": {},
        "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": input_tokens + len(words)} if done else None,
    }


def response_events(response_id: str, body: dict[str, Any], created: int, words: list[str], finish: str,
                    input_tokens: int) -> list[tuple[bytes, bytes | None]]:
    """The events of a streamed response, each with its ``event:`` name, in OpenAI's order."""
    item_id = f"msg_{response_id}"
    text = " ".join(words)
    started = response_object(response_id, body, created, words, finish, input_tokens, done=False)
    finished = response_object(response_id, body, created, words, finish, input_tokens)
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where, "part": part},
        *[{"type": "response.output_text.delta", **where, "delta": word if i == 0 else " " + word, "logprobs": []}
          for i, word in enumerate(words)],
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": finished["output"][0]},
        {"type": "response.incomplete" if finished["status"] == "incomplete" else "response.completed",
         "response": finished},
    ]
    return [(jsonio.dumps({**event, "sequence_number": n}), event["type"].encode())
            for n, event in enumerate(events)]
