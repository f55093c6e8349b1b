"""The collector's tuning (``inference.service.tune_gc``): calls in flight must not set off young collections."""

from __future__ import annotations

import gc

from inference.service import GC_GEN0_THRESHOLD

MODEL = "qwen2.5-7b-instruct"
CLIENTS = 64


def test_64_calls_in_flight_hold_well_under_the_young_collection_threshold(fake, in_memory):
    """The collector's count rises by what calls in flight hold, and a young collection started by them alone walks
    every live call and frees nothing (28 in 8 s at 64 clients with a threshold of 10,000). The count here takes in
    the test's own client and fake host too, so it is more than the gateway holds; half the threshold leaves room
    for what a call holds while it is being handled rather than waiting."""
    gateway = in_memory()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    assert gateway.post_chat(chat).status == 200  # (what the first call makes once is not counted)
    fake.chat.mode = "hang"
    gc.collect()
    before = len(gc.get_objects())
    waiting = [gateway.send("POST", "/v1/chat/completions", chat) for _ in range(CLIENTS)]
    gateway.settle()
    assert len(fake.pending) == CLIENTS and not any(gateway.answered(call) for call in waiting)
    gc.collect()
    held = len(gc.get_objects()) - before
    assert held < GC_GEN0_THRESHOLD / 2, f"{CLIENTS} calls in flight hold {held} tracked objects"
    fake.release()
    gateway.settle()
    assert [gateway.result(call).status for call in waiting] == [200] * CLIENTS
