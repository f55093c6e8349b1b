"""Property tests (hypothesis): request validation never fails in an unexpected way, and the SSE parser reads
the same events however the upstream's bytes are split."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.config import DefaultsConfig
from inference.errors import InvalidRequest
from inference.schema import parse_chat_request

from .test_sse import parse

DEFAULTS = DefaultsConfig()
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)

ROLES = ["system", "developer", "user", "assistant", "tool"]
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=30)}),
                    min_size=1, max_size=5)
# Parameters within the documented ranges: any combination must be accepted and sent on unchanged.
VALID = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "max_tokens": st.integers(1, 10**6),
    "seed": st.integers(-(2 ** 63), 2 ** 63 - 1),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=4), "stream": st.booleans(),
    "top_k": st.integers(-1, 1000), "min_p": st.floats(0, 1), "mirostat_mode": st.sampled_from([0, 1, 2]),
    "model": st.text(min_size=1, max_size=20).filter(str.strip), "user": st.text(max_size=10),
    "n": st.integers(1, 4), "x_unknown_extension": json_values,
}
valid_parameters = st.fixed_dictionaries({}, optional=VALID)


def outcome(raw: bytes) -> Any:
    """The parsed request, or the 400 a client would get; anything else escaping is a bug."""
    try:
        return parse_chat_request(raw, DEFAULTS, max_messages=50)
    except InvalidRequest as error:
        assert error.status == 400 and error.type == "invalid_request_error" and error.message
        return error


@PROPERTY_SETTINGS
@given(st.binary(max_size=200))
def test_any_bytes_are_a_request_or_a_400(raw):
    outcome(raw)


@PROPERTY_SETTINGS
@given(json_values)
def test_any_json_document_is_a_request_or_a_400(value):
    outcome(json.dumps(value).encode())


@PROPERTY_SETTINGS
@given(messages, valid_parameters, st.sampled_from([*VALID, "messages", "extensions"]), json_values)
def test_any_value_for_any_field_is_accepted_or_named_in_the_error(chat, parameters, field, value):
    body = {"messages": chat, **parameters, field: value}
    result = outcome(json.dumps(body).encode())
    if isinstance(result, InvalidRequest) and field != "extensions":  # extensions name the key inside
        assert result.param is not None and result.param.startswith(field), (field, value, result.param)


@PROPERTY_SETTINGS
@given(messages, valid_parameters)
def test_valid_requests_are_accepted_and_passed_on_unchanged(chat, parameters):
    body = {"messages": chat, **parameters}
    request = parse_chat_request(json.dumps(body).encode(), DEFAULTS)
    for key, value in body.items():
        assert request.body[key] == value, key
    assert request.stream is bool(parameters.get("stream"))
    assert request.body["max_tokens"] == parameters.get("max_tokens", DEFAULTS.max_tokens)


# -- SSE -----------------------------------------------------------------------------------------------------------

line_text = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20)
events = st.lists(st.lists(line_text, min_size=1, max_size=3), min_size=1, max_size=8)


@st.composite
def sse_streams(draw: Any) -> tuple[bytes, list[bytes]]:
    """A valid stream (comments, event/id fields, LF or CRLF line ends) and the payloads it carries."""
    out, expected = [], []
    for lines in draw(events):
        newline = draw(st.sampled_from(["\n", "\r\n"]))
        if draw(st.booleans()):
            out.append(": keep-alive" + newline + newline)
        if draw(st.booleans()):
            out.append("event: message" + newline + "id: 1" + newline)
        values = []
        for line in lines:
            space = draw(st.sampled_from(["", " "]))
            out.append("data:" + space + line + newline)
            values.append(line[1:] if not space and line.startswith(" ") else line)  # one space is dropped
        out.append(newline)
        expected.append("\n".join(values).encode())
    return "".join(out).encode(), expected


@PROPERTY_SETTINGS
@given(sse_streams(), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_split_of_a_valid_stream_parses_the_same(stream, cuts):
    data, expected = stream
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert parse([data]) == expected
    assert parse(pieces) == expected
