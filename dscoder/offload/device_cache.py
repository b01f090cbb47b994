"""The GPU pool of expert slots: lookups, copies on a side stream, and the events that order them.

Ordering rules (CUDA; on the CPU every copy is a plain synchronous copy and events are None):
- a copy into a slot waits for the compute that last read the slot (its `last_use` event);
- compute waits only for the slots it reads (their `ready` events), never for the whole stream.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from dscoder.offload.host_store import HostExpertStore
from dscoder.offload.policy import Key, NoSlot, Policy, SlotTable
from dscoder.offload.stats import OffloadStats

MAX_PENDING_TIMINGS = 4096


class CopyEngine:
    """Host-to-device copies on their own stream (CUDA) or inline (CPU), with counters."""

    def __init__(self, device: torch.device, stats: OffloadStats) -> None:
        self.device = device
        self.stats = stats
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def event(self) -> torch.cuda.Event | None:
        return torch.cuda.Event(enable_timing=True) if self.cuda else None

    def copy(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
             after: Sequence[torch.cuda.Event | None] = ()) -> torch.cuda.Event | None:
        """Copy (dst, src) pairs after the given events; the event that marks them done."""
        nbytes = sum(src.nbytes for _, src in pairs)
        self.stats.bytes_copied += nbytes
        if not self.cuda:
            t0 = time.perf_counter()
            for dst, src in pairs:
                dst.copy_(src)
            dt = time.perf_counter() - t0
            self.stats.copy_seconds += dt
            self.stats.exposed_seconds += dt  # nothing overlaps on the CPU
            return None
        assert self.stream is not None
        for ev in after:
            if ev is not None:
                self.stream.wait_event(ev)
        start, done = self.event(), self.event()
        with torch.cuda.stream(self.stream):
            start.record()
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done.record()
        self._time("copy", start, done)
        return done

    def wait(self, events: Sequence[torch.cuda.Event | None]) -> None:
        """Make the compute stream wait for these copies; time the stall as exposed copy time."""
        unique = {id(e): e for e in events if e is not None}
        events = [e for e in unique.values() if not e.query()]
        if not events or not self.cuda:
            return
        start, end = self.event(), self.event()
        start.record()
        for ev in events:
            torch.cuda.current_stream(self.device).wait_event(ev)
        end.record()
        self._time("exposed", start, end)

    def mark(self) -> torch.cuda.Event | None:
        """An event on the compute stream after the work queued so far."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def _time(self, kind: str, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        self.stats._pending.append((kind, start, end))
        if len(self.stats._pending) > MAX_PENDING_TIMINGS:
            self.stats.resolve()


class ExpertCache:
    """`slots` experts on the device, each slot one expert's w13 (2I, H) and w2 (H, I)."""

    def __init__(self, store: HostExpertStore, slots: int, device: torch.device, policy: Policy,
                 stats: OffloadStats, copier: CopyEngine) -> None:
        self.store = store
        self.table = SlotTable(slots, policy)
        self.stats, self.copier = stats, copier
        w13, w2 = store.w13[store.layers[0]], store.w2[store.layers[0]]
        self.w13 = torch.empty((slots, *w13.shape[1:]), dtype=w13.dtype, device=device)
        self.w2 = torch.empty((slots, *w2.shape[1:]), dtype=w2.dtype, device=device)
        # int8 experts: each slot's per-row scales beside its weights (None: not quantized)
        self.s13 = self.s2 = None
        if store.quantized:
            s13, s2 = store.s13[store.layers[0]], store.s2[store.layers[0]]
            self.s13 = torch.empty((slots, *s13.shape[1:]), dtype=s13.dtype, device=device)
            self.s2 = torch.empty((slots, *s2.shape[1:]), dtype=s2.dtype, device=device)
        self.ready: list[torch.cuda.Event | None] = [None] * slots
        self.last_use: list[torch.cuda.Event | None] = [None] * slots
        self.prefetched: set[Key] = set()  # copied ahead and not yet needed

    @property
    def slots(self) -> int:
        return self.table.slots

    def parts(self, slot: int) -> list[torch.Tensor]:
        """The slot's tensors, in the order of HostExpertStore.expert and of ExpertGroups.apply's
        arguments: w13, w2 and, when quantized, their scales."""
        return [t[slot] for t in (self.w13, self.w2, self.s13, self.s2) if t is not None]

    def __contains__(self, key: Key) -> bool:
        return key in self.table

    def acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Slots holding these experts of a layer, copying the missing ones (demand path)."""
        keys = [(layer, e) for e in experts]
        missing = []
        for key in keys:
            if self.table.get(key) is None:  # get() counts a use of a resident key
                self.stats.misses += 1
                missing.append(key)
            elif key in self.prefetched:
                self.stats.prefetch_used += 1  # copied for this step, ahead of time
            else:
                self.stats.hits += 1
        self._load(missing, set(keys))
        self.prefetched.difference_update(keys)
        return [self.table.slot_of[key] for key in keys]

    def prefetch(self, layer: int, experts: Sequence[int], protected: set[Key]) -> None:
        """Start copies for experts a later layer will probably need; never evict `protected`."""
        guard = protected | {(layer, e) for e in experts}
        wanted = [(layer, e) for e in experts if (layer, e) not in self.table]
        loaded = self._load(wanted, guard, partial=True)
        self.prefetched.update(loaded)
        self.stats.prefetched += len(loaded)

    def _load(self, keys: Sequence[Key], protected: set[Key], partial: bool = False) -> list[Key]:
        """Give each key a slot and queue its copy, as one step: if anything interrupts it (a
        Ctrl-C is a normal path in the REPL), every slot assigned here is given back empty, so
        no slot is ever marked as holding an expert whose weights were not queued to it.
        partial: stop at the first key without a slot (prefetch) instead of raising NoSlot."""
        loads: list[tuple[int, Key]] = []
        try:
            for key in keys:
                try:
                    slot, evicted = self.table.assign(key, protected)
                except NoSlot:
                    if partial:
                        break  # every other slot is needed now: the rest will be demand misses
                    raise
                if evicted is not None:
                    self.prefetched.discard(evicted)
                loads.append((slot, key))
            self._copy(loads)
        except BaseException:
            for _, key in loads:
                self.table.discard(key)
                self.prefetched.discard(key)
            raise
        return [key for _, key in loads]

    def _copy(self, loads: Sequence[tuple[int, Key]]) -> None:
        """One batch of copies on the copy stream (one event for all: fewer API calls per step)."""
        if not loads:
            return
        pairs, after = [], {}
        for slot, (layer, e) in loads:
            pairs += list(zip(self.parts(slot), self.store.expert(layer, e), strict=True))
            if self.last_use[slot] is not None:
                after[id(self.last_use[slot])] = self.last_use[slot]
        done = self.copier.copy(pairs, after=list(after.values()))
        for slot, _ in loads:
            self.ready[slot] = done

    def wait(self, slots: Sequence[int]) -> None:
        self.copier.wait([self.ready[s] for s in slots])

    def release(self, slots: Sequence[int]) -> None:
        """Compute that reads these slots has been queued: later copies into them wait for it."""
        ev = self.copier.mark()
        for s in slots:
            self.last_use[s] = ev

    def warm(self) -> None:
        """Fill every slot before the first token, spread evenly over the layers."""
        layers, n = self.store.layers, self.store.experts_per_layer
        for i in range(min(self.slots, len(layers) * n)):
            key = (layers[i % len(layers)], i // len(layers))
            if key not in self.table:
                self._load([key], set())
        self.stats.bytes_copied = 0  # warming is part of loading, not of generation
        self.stats.copy_seconds = self.stats.exposed_seconds = 0.0
        self.stats._pending.clear()
