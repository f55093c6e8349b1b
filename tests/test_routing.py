"""The routing policies, each on its own: rendezvous ranking, conversation keys, the prefix-cache estimate and
the picker that puts them together with health, models and load."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from inference.operations import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES
from inference.routing.conversation import conversation_key
from inference.routing.demand import Demand
from inference.routing.memory import PrefixMemory
from inference.routing.picker import HostView, ModelOnHost, pick
from inference.routing.rendezvous import rank

KEYS = [f"conversation {i}".encode() for i in range(3000)]


def hosts(*names: str, slots: int = 4, **models: str | None) -> list[HostView]:
    return [HostView(name, slots, models={"qwen": ModelOnHost(state=models.get(name, "loaded"))}) for name in names]


def memory_of(views: list[HostView]) -> PrefixMemory:
    slots = {view.name: view.max_concurrent for view in views}
    return PrefixMemory(lambda name: slots[name])


# -- rendezvous ----------------------------------------------------------------------------------------------------

def test_removing_a_host_moves_only_the_conversations_it_ranked_first():
    three, two = hosts("a", "b", "c"), hosts("a", "b")
    moved = [key for key in KEYS if rank(key, three)[0].name != "c" and rank(key, two)[0].name !=
             rank(key, three)[0].name]
    assert moved == []
    shares = {name: sum(rank(key, three)[0].name == name for key in KEYS) / len(KEYS) for name in "abc"}
    assert all(0.30 < share < 0.37 for share in shares.values()), shares


def test_weights_share_new_conversations():
    heavy, light = HostView("mac", 4, weight=2.0), HostView("pc", 4, weight=1.0)
    share = sum(rank(key, [heavy, light])[0] is heavy for key in KEYS) / len(KEYS)
    assert 0.63 < share < 0.70  # two thirds


# -- conversation keys ---------------------------------------------------------------------------------------------

def test_every_turn_of_a_conversation_has_the_same_key_and_other_conversations_another():
    system = {"role": "system", "content": "You are terse."}
    first = [system, {"role": "user", "content": "Plan a trip to Rome"}]
    later = [*first, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And Naples?"}]
    other = [system, {"role": "user", "content": "Plan a trip to Oslo"}]
    key = conversation_key(CHAT.prefix, "qwen", {"messages": first})
    assert key == conversation_key(CHAT.prefix, "qwen", {"messages": later})
    assert key != conversation_key(CHAT.prefix, "qwen", {"messages": other})  # the same system prompt is not enough
    assert key != conversation_key(CHAT.prefix, "llama", {"messages": first})  # another model has another cache
    assert conversation_key(MESSAGES.prefix, "qwen", {"system": "x", "messages": later[1:]}) == conversation_key(
        MESSAGES.prefix, "qwen", {"system": "x", "messages": later[1:2]})
    assert conversation_key(RESPONSES.prefix, "qwen", {"instructions": "x", "input": later}) == conversation_key(
        RESPONSES.prefix, "qwen", {"instructions": "x", "input": first})
    head = "x" * 5000
    assert conversation_key(COMPLETIONS.prefix, "qwen", {"prompt": head + "a"}) == conversation_key(
        COMPLETIONS.prefix, "qwen", {"prompt": head + "b"})
    assert conversation_key(EMBEDDINGS.prefix, "qwen", {"input": "x"}) is None


# -- the prefix-cache estimate -------------------------------------------------------------------------------------

def test_a_host_holds_its_last_conversations_one_per_slot():
    memory = PrefixMemory(lambda name: 2)
    for key in (b"a", b"b", b"c"):
        memory.remember("mac", key)
    assert [memory.holder(k) for k in (b"a", b"b", b"c")] == [None, "mac", "mac"]  # a was evicted
    memory.remember("mac", b"b")  # b used again: c is now the least recent
    memory.remember("mac", b"d")
    assert (memory.holder(b"c"), memory.holder(b"b")) == (None, "mac")
    memory.remember("pc", b"b")  # b moved
    assert memory.holder(b"b") == "pc" and memory.has_room("mac")
    memory.forget("pc")
    assert memory.holder(b"b") is None


# -- the picker ----------------------------------------------------------------------------------------------------

def test_only_hosts_that_are_up_and_serve_the_model_are_candidates():
    views = hosts("a", "b", "c")
    views[0].routed = False  # down, ejected or being checked
    views[1].models = {"llama": "loaded"}
    chosen = pick(views, "qwen", None, memory_of(views), 2, random.Random(1))
    assert chosen is not None and [h.name for h in chosen.hosts] == ["c"] and chosen.reason == "only_choice"
    with pytest.raises(LookupError):
        pick(views, "mistral", None, memory_of(views), 2, random.Random(1))


def test_a_call_waits_when_every_host_is_at_max_concurrent():
    views = hosts("a", "b", slots=1)
    for view in views:
        view.outstanding = 1
    assert pick(views, "qwen", b"k", memory_of(views), 2, random.Random(1)) is None


def test_the_pick_names_the_step_that_decided():
    def step(views: list[HostView], key: bytes | None = None, demand: Callable[[], Demand] | None = None) -> str:
        chosen = pick(views, "qwen", key, memory_of(views), 2, random.Random(1), demand)
        assert chosen is not None
        return chosen.step

    assert step(hosts("a")) == "serving"
    assert step(hosts("a", "b", b="not-loaded")) == "loaded"
    busy = hosts("a", "b")
    busy[0].started("qwen")
    busy[0].max_concurrent = 1
    assert step(busy) == "free_slot"
    far = hosts("a", "b")
    far[0].outstanding = 3
    assert step(far) == "load_bound"
    small, large = (HostView(n, 4, models={"qwen": ModelOnHost("loaded", context=c)}) for n, c in (("s", 4096),
                                                                                                   ("l", 32768)))
    assert step([small, large], demand=demand_of("x" * 30_000)) == "fits"
    assert step(hosts("a", "b"), key=b"conversation") == "affinity"
    assert step(hosts("a", "b")) == "least_loaded"


def test_a_models_own_slots_bound_its_calls_on_a_host_with_slots_to_spare():
    view = HostView("a", 8, models={"qwen": ModelOnHost("loaded", instances=1, slots=1),
                                    "llama": ModelOnHost("loaded", instances=1, slots=4)})
    view.started("qwen")
    assert pick([view], "qwen", None, memory_of([view]), 2, random.Random(1)) is None  # its one slot is taken
    assert pick([view], "llama", None, memory_of([view]), 2, random.Random(1)) is not None
    view.ended("qwen")
    assert view.outstanding == 0 and view.by_model == {}
    assert pick([view], "qwen", None, memory_of([view]), 2, random.Random(1)) is not None


def demand_of(text: str, **extra: object) -> Callable[[], Demand]:
    return lambda: Demand.of({"model": "qwen", "messages": [{"role": "user", "content": text}], **extra},
                             CHAT.output_limits)


def test_the_hosts_whose_context_holds_the_call_are_picked_and_the_largest_when_only_the_prompt_fits():
    small, large = (HostView(name, 4, models={"qwen": ModelOnHost("loaded", context=context)})
                    for name, context in (("small", 4096), ("large", 32768)))
    views = [small, large]
    for seed in range(10):
        both = pick(views, "qwen", None, memory_of(views), 2, random.Random(seed), demand_of("hi", max_tokens=100))
        assert both is not None and len(both.hosts) == 2
    for text, limit in (("x" * 30_000, None), ("x" * 6_000, 30_000)):  # the prompt, then prompt and output
        chosen = pick(views, "qwen", None, memory_of(views), 2, random.Random(1), demand_of(text, max_tokens=limit))
        assert chosen is not None and [h.name for h in chosen.hosts] == ["large"]  # (not even for failover)
    large.started("qwen")
    large.max_concurrent = 1
    assert pick(views, "qwen", None, memory_of(views), 2, random.Random(1), demand_of("x" * 30_000)) is None  # waits


def test_a_prompts_estimate_counts_text_and_tools_not_image_data():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 90_000}}
    demand = Demand.of({"model": "qwen", "max_completion_tokens": 50, "tools": [{"type": "function"}],
                        "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 300}, image]}]},
                       CHAT.output_limits)
    assert 100 <= demand.prompt_tokens < 130 and demand.output_tokens == 50 and demand.tools and demand.images
    anthropic = Demand.of({"model": "qwen", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "data": "B" * 90_000}}]}], "tool_choice": "none"},
        MESSAGES.output_limits)
    assert anthropic.prompt_tokens < 20 and anthropic.images and not anthropic.tools
    # A tool whose schema has a property named "type" (Claude Code's tools do): an object where a type name stands.
    schema = {"type": "object", "properties": {"type": {"type": "string", "enum": ["file", "dir"]}}}
    tooled = Demand.of({"model": "qwen", "max_tokens": 10, "messages": [{"role": "user", "content": "ls"}],
                        "tools": [{"name": "list", "input_schema": schema}]}, MESSAGES.output_limits)
    assert tooled.tools and not tooled.images and tooled.prompt_tokens > 5


def test_a_host_with_the_model_loaded_beats_one_that_would_load_it():
    views = hosts("a", "b", a="not-loaded")
    for seed in range(20):
        chosen = pick(views, "qwen", None, memory_of(views), 2, random.Random(seed))
        assert chosen is not None and [h.name for h in chosen.hosts] == ["b", "a"]  # a stays for failover


def test_a_conversation_stays_on_its_host_until_that_host_is_too_busy():
    views = hosts("a", "b")
    memory = memory_of(views)
    first = pick(views, "qwen", b"trip", memory, 2, random.Random(1))
    assert first is not None
    memory.remember(first.hosts[0].name, b"trip")
    home, away = (views[0], views[1]) if first.hosts[0] is views[0] else (views[1], views[0])
    home.outstanding = 2
    again = pick(views, "qwen", b"trip", memory, 2, random.Random(1))
    assert again is not None and again.hosts[0] is home and again.reason == "affinity"
    home.outstanding = 3  # three more than the idle host: beyond the bound of 2
    moved = pick(views, "qwen", b"trip", memory, 2, random.Random(1))
    assert moved is not None and moved.hosts[0] is away and moved.reason == "least_loaded"


def test_without_a_conversation_the_least_busy_host_answers():
    views = hosts("a", "b", "c")
    views[0].outstanding, views[1].outstanding, views[2].outstanding = 2, 0, 1
    chosen = pick(views, "qwen", None, memory_of(views), 5, random.Random(1))
    assert chosen is not None and [h.name for h in chosen.hosts] == ["b", "c", "a"]


def test_cache_awareness_keeps_two_conversations_from_evicting_each_other():
    """With one cache slot per host, two conversations hashed over two hosts land on the same one about half the
    time, and then evict each other on every turn; placing a new conversation where a slot is free does not."""
    hashed_together = aware_together = 0
    pairs = list(zip(KEYS[::2], KEYS[1::2], strict=True))[:500]
    for one, two in pairs:
        views = hosts("a", "b", slots=1)
        hashed_together += rank(one, views)[0] is rank(two, views)[0]
        memory = memory_of(views)
        placed = []
        for key in (one, two):
            chosen = pick(views, "qwen", key, memory, 2, random.Random(1))
            assert chosen is not None
            memory.remember(chosen.hosts[0].name, key)
            placed.append(chosen.hosts[0].name)
        aware_together += placed[0] == placed[1]
    assert 0.4 < hashed_together / len(pairs) < 0.6
    assert aware_together == 0


def test_interleaved_conversations_keep_their_hosts_turn_after_turn():
    """Eight conversations over two hosts of four slots, their turns interleaved: after its first turn, every turn
    of every conversation lands where its prefix is, and no host is sent more than its slots hold."""
    views = hosts("a", "b", slots=4)
    memory = memory_of(views)
    home: dict[bytes, str] = {}
    for turn in range(5):
        for conversation in KEYS[:8]:
            chosen = pick(views, "qwen", conversation, memory, 2, random.Random(turn))
            assert chosen is not None
            name = chosen.hosts[0].name
            if turn:
                assert name == home[conversation] and chosen.reason == "affinity"
            home[conversation] = name
            memory.remember(name, conversation)
    assert sorted(list(home.values()).count(name) for name in "ab") == [4, 4]
