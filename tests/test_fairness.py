"""The order a freed slot picks (inference/fairness.py): priority class, then tenants' fair shares by tokens."""

from __future__ import annotations

from collections import Counter

from inference.fairness import FairQueue
from inference.tenants import Caller, Tenant

ALICE, BOB = Caller(Tenant("alice")), Caller(Tenant("bob"))
HEAVY = Caller(Tenant("heavy", weight=2))
URGENT, SPARE = Caller(Tenant("urgent", priority="critical")), Caller(Tenant("spare", priority="sheddable"))


def drain(queue: FairQueue[str]) -> list[str]:
    order = []
    while (item := queue.pop()) is not None:
        order.append(item)
    return order


def test_priority_classes_come_first_whatever_arrived_before():
    queue: FairQueue[str] = FairQueue()
    for item, caller in (("s1", SPARE), ("a1", ALICE), ("u1", URGENT), ("s2", SPARE), ("u2", URGENT)):
        queue.push(item, caller)
    assert drain(queue) == ["u1", "u2", "a1", "s1", "s2"]


def test_a_long_queue_does_not_starve_a_short_one():
    queue: FairQueue[str] = FairQueue()
    for i in range(6):
        queue.push(f"a{i}", ALICE)
    queue.push("b0", BOB)
    queue.push("b1", BOB)
    assert drain(queue) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_shares_follow_tokens_used_and_weights():
    queue: FairQueue[str] = FairQueue()
    for i in range(60):
        queue.push(f"h{i}", HEAVY, cost=10)
        queue.push(f"b{i}", BOB, cost=10)
    first = [queue.pop() for _ in range(30)]
    served = Counter(str(item)[0] for item in first)
    assert served["h"] == 20 and served["b"] == 10  # weight 2 against 1
    queue.shares.used(HEAVY, 2000)  # heavy's calls then generated a lot: bob is owed the next ones
    assert [str(queue.pop())[0] for _ in range(5)] == ["b"] * 5


def test_a_tenant_back_from_idle_gets_no_saved_credit():
    queue: FairQueue[str] = FairQueue()
    for i in range(20):
        queue.push(f"a{i}", ALICE, cost=10)
    for _ in range(10):
        queue.pop()  # alice alone: 100 tokens served
    queue.push("b0", BOB, cost=10)
    queue.push("b1", BOB, cost=10)
    queue.push("b2", BOB, cost=10)
    assert [queue.pop() for _ in range(4)] == ["b0", "a10", "b1", "a11"]  # taking turns, not bob three in a row


def test_pop_takes_only_what_a_slot_can_serve():
    queue: FairQueue[str] = FairQueue()
    queue.push("a-qwen", ALICE)
    queue.push("b-llama", BOB)
    assert queue.pop(lambda item: item.endswith("llama")) == "b-llama"
    assert queue.pop(lambda item: item.endswith("llama")) is None and len(queue) == 1
    assert queue.remove("a-qwen") and not queue.remove("a-qwen") and len(queue) == 0


def test_shedding_refuses_sheddable_calls_past_the_threshold_and_gives_their_place_to_others():
    queue: FairQueue[str] = FairQueue(shed_above=2)
    queue.push("s1", SPARE)
    assert not queue.refuses(SPARE)
    queue.push("s2", SPARE)
    assert queue.refuses(SPARE) and not queue.refuses(ALICE)
    assert queue.shed(SPARE) is None  # a sheddable call takes no one's place
    assert queue.shed(ALICE) == "s2" and len(queue) == 1  # the sheddable call that came last
    assert queue.shed(URGENT) == "s1" and queue.shed(URGENT) is None
