"""The SSE parser: events come out the same however the bytes are split."""

from __future__ import annotations

import pytest

from inference.sse import Event, SSEParser, encode

STREAM = (b": keep-alive\r\n\r\n"
          b'data: {"a": 1}\n\n'
          b'event: message\r\nid: 7\r\ndata: {"b": "x\\ny"}\r\n\r\n'
          b"data:first line\ndata: second line\n\n"
          b"data: [DONE]\n\n")
EXPECTED = [b'{"a": 1}', b'{"b": "x\\ny"}', b"first line\nsecond line", b"[DONE]"]


def parse_events(pieces: list[bytes]) -> list[Event]:
    parser = SSEParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.close()


def parse(pieces: list[bytes]) -> list[bytes]:
    return [data for data, _ in parse_events(pieces)]


def test_whole_stream():
    assert parse([STREAM]) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_any_single_split(cut):
    assert parse([STREAM[:cut], STREAM[cut:]]) == EXPECTED


def test_byte_by_byte():
    assert parse([STREAM[i:i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_last_event_without_blank_line_still_counts():
    assert parse([b'data: {"a": 1}\n\ndata: {"b": 2}']) == [b'{"a": 1}', b'{"b": 2}']


def test_an_endless_event_is_refused_not_buffered():
    parser = SSEParser(max_event_bytes=100)
    with pytest.raises(ValueError):
        for _ in range(20):
            parser.feed(b"data: " + b"x" * 10 + b"\n")
    with pytest.raises(ValueError):
        SSEParser(max_event_bytes=100).feed(b"data: " + b"y" * 200)


def test_event_names_are_kept_with_their_event_only():
    stream = (b"event: response.created\ndata: {\"a\": 1}\n\n"
              b"data: {\"b\": 2}\n\n"
              b"event: ping\n\n"  # a named event without data is no event, and its name goes with it
              b"event:message_stop\r\ndata: {}\r\n\r\n")
    assert parse_events([stream]) == [(b'{"a": 1}', b"response.created"), (b'{"b": 2}', None),
                                      (b"{}", b"message_stop")]
    assert [e for cut in range(1, len(stream)) for e in parse_events([stream[:cut], stream[cut:]])] == \
        parse_events([stream]) * (len(stream) - 1)


def test_events_are_written_back_with_their_names():
    assert encode(b'{"a": 1}') == b'data: {"a": 1}\n\n'
    assert encode(b"{}", b"message_stop") == b"event: message_stop\ndata: {}\n\n"
