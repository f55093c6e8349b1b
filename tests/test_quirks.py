"""What the gateway learns of an upstream's quirks (tests/test_agents.py shows them over HTTP): how long it
remembers one, on a clock the test moves, and how a refused late system turn is folded."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from inference.errors import UpstreamClientError, UpstreamError
from inference.providers.quirks import (
    LATE_SYSTEM,
    Quirks,
    fold_late_system,
    has_late_system,
    refuses_late_system,
    with_tool_call_content,
)


def test_a_quirk_is_remembered_for_a_while_then_tried_again():
    clock = Clock()
    quirks = Quirks(clock, recheck_secs=10)
    quirks.note(LATE_SYSTEM, "qwen")
    assert quirks.has(LATE_SYSTEM, "qwen") and not quirks.has(LATE_SYSTEM, "llama")
    clock.advance(9.9)
    assert quirks.has(LATE_SYSTEM, "qwen")
    clock.advance(0.1)
    assert not quirks.has(LATE_SYSTEM, "qwen")  # the server (or its model) may have changed: ask again


@pytest.mark.parametrize("message, refused", [
    ("System message must be at the beginning.", True),  # Qwen's template
    ("Error rendering prompt with jinja template: \"System message must be at the beginning.\"", True),  # LM Studio
    ("Conversation roles must alternate user/assistant/user/assistant/...", True),  # Mistral, Gemma
    ("System role not supported", True),  # Gemma 2
    ("Trying to keep the first 5120 tokens when context the overflows", False),
    ("model not found", False),
])
def test_a_template_refusing_a_late_system_turn_is_recognised(message, refused):
    assert refuses_late_system(UpstreamClientError(message, status=400)) is refused
    assert refuses_late_system(UpstreamError(f"upstream error (HTTP 500): {message}", kind="server_error")) is refused


def test_late_system_turns_are_folded_into_the_users_turns():
    messages = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "system", "content": "Agents: explore, plan."},  # Claude Code's notes
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                {"role": "system", "content": [{"type": "text", "text": "Plan mode is on."}]},
                {"role": "user", "content": "go on"},
                {"role": "system", "content": "Be brief."}]
    assert has_late_system(messages) and not has_late_system(messages[:2])
    folded = fold_late_system(messages)
    assert [m["role"] for m in folded] == ["system", "user", "assistant", "tool", "user"]
    assert folded[1]["content"] == [{"type": "text", "text": "hi"},
                                    {"type": "text", "text": "<system>\nAgents: explore, plan.\n</system>"}]
    assert folded[4]["content"] == "<system>\nPlan mode is on.\n</system>\n\ngo on\n\n<system>\nBe brief.\n</system>"
    after_tool = fold_late_system([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                   {"role": "system", "content": "z"}])
    assert after_tool[-1] == {"role": "user", "content": "<system>\nz\n</system>"}  # no user turn to join


def test_tool_call_turns_say_an_empty_string():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "assistant", "tool_calls": calls}, {"role": "assistant", "content": "said"}]
    assert [m.get("content") for m in with_tool_call_content(messages)] == ["x", "", "", "said"]
    untouched = messages[:1]
    assert with_tool_call_content(untouched) is untouched  # nothing to change: no copy
