"""The SSE parser: events come out the same however the bytes are split."""

from __future__ import annotations

import pytest

from inference.sse import SSEParser

STREAM = (b": keep-alive\r\n\r\n"
          b'data: {"a": 1}\n\n'
          b'event: message\r\nid: 7\r\ndata: {"b": "x\\ny"}\r\n\r\n'
          b"data:first line\ndata: second line\n\n"
          b"data: [DONE]\n\n")
EXPECTED = [b'{"a": 1}', b'{"b": "x\\ny"}', b"first line\nsecond line", b"[DONE]"]


def parse(pieces: list[bytes]) -> list[bytes]:
    parser = SSEParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.close()


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
