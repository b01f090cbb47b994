"""Eviction policies and the slot table they drive.

The same SlotTable runs inside the GPU cache and in the offline replay of routing traces, so a
hit rate measured on a trace is the hit rate the engine would get with that policy.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from typing import Protocol

Key = tuple[int, int]  # (layer, expert)


class Policy(Protocol):
    def touch(self, key: Key) -> None: ...  # a resident key was used
    def insert(self, key: Key) -> None: ...  # a key became resident (and is being used)
    def remove(self, key: Key) -> None: ...
    def victim(self, protected: Collection[Key], incoming: Key) -> Key | None: ...


class LRU:
    """Least recently used first (mixtral-offloading's choice)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        self._order.move_to_end(key)

    def insert(self, key: Key) -> None:
        self._order[key] = None

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, protected: Collection[Key], incoming: Key) -> Key | None:
        return next((k for k in self._order if k not in protected), None)

    def __len__(self) -> int:
        return len(self._order)


class LFU:
    """Least frequently used first, counting every use since start (also while evicted), so an
    expert that is popular overall survives a burst of others; ties go to the least recent."""

    def __init__(self) -> None:
        self.count: dict[Key, int] = {}
        self._resident: dict[Key, int] = {}  # key -> tick of its newest heap entry
        self._heap: list[tuple[int, int, Key]] = []
        self._tick = 0

    def _push(self, key: Key) -> None:
        self._tick += 1
        self._resident[key] = self._tick
        heapq.heappush(self._heap, (self.count[key], self._tick, key))
        if len(self._heap) > 4 * len(self._resident) + 64:  # drop stale entries now and then
            self._heap = [(self.count[k], t, k) for k, t in self._resident.items()]
            heapq.heapify(self._heap)

    def touch(self, key: Key) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        self._push(key)

    def insert(self, key: Key) -> None:
        self.touch(key)

    def remove(self, key: Key) -> None:
        self._resident.pop(key, None)

    def victim(self, protected: Collection[Key], incoming: Key) -> Key | None:
        skipped: list[tuple[int, int, Key]] = []
        found = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            _, tick, key = entry
            if self._resident.get(key) != tick:
                continue  # stale: touched again since, or evicted
            if key in protected:
                skipped.append(entry)
                continue
            found = key
            skipped.append(entry)  # stays until SlotTable removes the key
            break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found


class LayerQuota:
    """Each layer owns an equal share of the slots and evicts only its own experts, so a burst
    of misses in one layer cannot flush the others; `inner` orders experts within a layer."""

    def __init__(self, slots: int, layers: Iterable[int], inner: Callable[[], Policy]) -> None:
        layers = sorted(layers)
        base, extra = divmod(slots, len(layers))
        self.quota = {layer: base + (i < extra) for i, layer in enumerate(layers)}
        self.inner = {layer: inner() for layer in layers}
        self.size = dict.fromkeys(layers, 0)

    def touch(self, key: Key) -> None:
        self.inner[key[0]].touch(key)

    def insert(self, key: Key) -> None:
        self.inner[key[0]].insert(key)
        self.size[key[0]] += 1

    def remove(self, key: Key) -> None:
        self.inner[key[0]].remove(key)
        self.size[key[0]] -= 1

    def victim(self, protected: Collection[Key], incoming: Key) -> Key | None:
        layer = incoming[0]
        if self.size[layer] >= self.quota[layer]:
            return self.inner[layer].victim(protected, incoming)
        # under quota but no free slot: take from a layer above its share
        for other, n in self.size.items():
            if n > self.quota[other]:
                got = self.inner[other].victim(protected, incoming)
                if got is not None:
                    return got
        return self.inner[layer].victim(protected, incoming)


POLICIES = ("lru", "lfu", "lru-layer", "lfu-layer")


def make_policy(name: str, slots: int, layers: Iterable[int]) -> Policy:
    base = {"lru": LRU, "lfu": LFU}
    kind, _, scope = name.partition("-")
    if kind not in base or scope not in ("", "layer"):
        raise ValueError(f"unknown eviction policy {name!r}; choose from {', '.join(POLICIES)}")
    return LayerQuota(slots, layers, base[kind]) if scope == "layer" else base[kind]()


STREAM_TOKENS = 32  # a layer call with more tokens than this streams its missing experts


def should_stream(tokens: int, distinct: int, slots: int) -> bool:
    """Prefill-sized calls stream missing experts through double buffers and leave the cache
    as it is; small calls (decode) load misses into cache slots."""
    return tokens > STREAM_TOKENS or distinct > slots // 2


class NoSlot(RuntimeError):
    """Every slot holds an expert that the current step needs."""


class SlotTable:
    """Which (layer, expert) sits in which slot; misses take a free slot or the policy's victim."""

    def __init__(self, slots: int, policy: Policy) -> None:
        self.slots = slots
        self.policy = policy
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * slots
        self.free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first

    def get(self, key: Key) -> int | None:
        """The slot of a resident key (counted as a use), or None."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self.policy.touch(key)
        return slot

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def assign(self, key: Key, protected: Collection[Key]) -> tuple[int, Key | None]:
        """A slot for a missing key: (slot, the key evicted from it or None)."""
        evicted = None
        if self.free:
            slot = self.free.pop()
        else:
            evicted = self.policy.victim(protected, key)
            if evicted is None:
                raise NoSlot(f"all {self.slots} expert slots are needed by the current step")
            slot = self.slot_of.pop(evicted)
            self.policy.remove(evicted)
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.policy.insert(key)
        return slot, evicted

    def discard(self, key: Key) -> None:
        """Forget a key: its slot becomes free (its contents are no longer trusted)."""
        slot = self.slot_of.pop(key, None)
        if slot is None:
            return
        self.key_of[slot] = None
        self.policy.remove(key)
        self.free.append(slot)
