"""One continuous-batching decode loop per T3 actor.

Every caller (a `map_batches` call; several run at once in an actor with
`max_concurrency > 1`) hands its requests to the same loop and waits. Each
iteration runs one KV-cached step over every request in flight; finished
requests leave at once and waiting ones join after a batched, left-padded
prefill, so the batch stays full however unequal the utterances are.

A request is one CFG pair: two rows (conditional, unconditional) with the same
prefix length. The cache is preallocated and written in place (`KVCache`): each
step sends views of it to the `t3_lm_step` graph, which returns only the new
position's keys and values, so a step costs the same whatever the cache holds
and no step copies it. Each row writes at its own next column; masked columns
(left padding from a batched prefill, unused capacity) take no part, so a row's
numbers never depend on its neighbours.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
import numpy as np

from actors.backends import Session
from actors.chatterbox.sampling import Sampler


@dataclass
class Request:
    prefix: np.ndarray
    """[2, length, hidden] prefill embeddings: the conditional row, then the unconditional one."""
    sampler: Sampler
    future: Future = field(default_factory=Future)


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """The step graph's cache inputs and outputs (the new positions), in the order it lists them."""
    pairs = [(i, kv) for i in range(layers) for kv in ("key", "value")]
    return [f"past_key_values.{i}.{kv}" for i, kv in pairs], [f"new.{i}.{kv}" for i, kv in pairs]


class T3Graphs:
    """The LM step and speech-embedding graphs as the loop calls them."""

    def __init__(self, lm: Session, speech_embed: Session, layers: int, heads: int, head_dim: int) -> None:
        self.lm, self.speech_embed = lm, speech_embed
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.past, self.new = cache_names(layers)

    def empty_past(self, rows: int) -> list[np.ndarray]:
        return [np.zeros((rows, self.heads, 0, self.head_dim), np.float32) for _ in self.past]

    def run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Last-position logits [rows, vocab] and the new positions' keys and values."""
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                 **dict(zip(self.past, past))}
        logits, *new = self.lm.run(feeds, ["logits", *self.new])
        return logits[:, -1], new

    def embed_tokens(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.speech_embed.run({"speech_tokens": tokens, "positions": positions}, ["speech_embeds"])[0]


class KVCache:
    """Keys and values of the rows in flight: one buffer per cache tensor, [max_rows, heads, capacity,
    head_dim], preallocated and written in place.

    Rows are packed at the front, so `views()` (the first `rows` rows) are contiguous and ONNX Runtime
    reads them without a copy. Row r holds its positions in columns 0..length[r]-1 (`mask` marks the
    real ones) and the next step writes at column length[r]. Capacity grows and shrinks in blocks of
    `block` columns; only a resize or a row that moves to fill a gap copies cache memory.
    """

    def __init__(self, tensors: int, max_rows: int, heads: int, head_dim: int, block: int = 16) -> None:
        self.tensors, self.max_rows, self.heads, self.head_dim, self.block = tensors, max_rows, heads, head_dim, block
        self.rows = self.capacity = 0
        self.length = np.zeros(max_rows, np.int64)
        self.mask = np.zeros((max_rows, 0), np.int64)
        self.buffers = [np.zeros((max_rows, heads, 0, head_dim), np.float32) for _ in range(tensors)]

    def _resize(self, capacity: int) -> None:
        # np.zeros maps untouched pages lazily: slots no row has used cost no memory
        buffers = [np.zeros((self.max_rows, self.heads, capacity, self.head_dim), np.float32)
                   for _ in range(self.tensors)]
        mask = np.zeros((self.max_rows, capacity), np.int64)
        used = min(capacity, int(self.length[:self.rows].max(initial=0)))
        for new, old in zip(buffers, self.buffers):
            new[:self.rows, :, :used] = old[:self.rows, :, :used]
        mask[:self.rows, :used] = self.mask[:self.rows, :used]
        self.buffers, self.mask, self.capacity = buffers, mask, capacity

    def _fit(self, columns: int) -> None:
        """Room for `columns` columns per row; capacity in whole blocks, shrunk when under half used."""
        want = -(-columns // self.block) * self.block
        if want > self.capacity or (self.capacity > 2 * want):
            self._resize(want)

    def views(self) -> list[np.ndarray]:
        return [b[:self.rows] for b in self.buffers]

    def step_mask(self) -> np.ndarray:
        """[rows, capacity + 1]: the real cached positions, then the position being decoded."""
        return np.concatenate([self.mask[:self.rows], np.ones((self.rows, 1), np.int64)], axis=1)

    def positions(self) -> np.ndarray:
        """[rows, 1]: the position of each row's next token (its count of real positions)."""
        return self.mask[:self.rows].sum(axis=1, keepdims=True)

    def append(self, new: list[np.ndarray]) -> None:
        """Write one decoded position per row ([rows, heads, 1, head_dim] per tensor) at its next column."""
        self._fit(int(self.length[:self.rows].max()) + 1)
        rows, cols = np.arange(self.rows), self.length[:self.rows]
        for buf, n in zip(self.buffers, new):
            buf[rows, :, cols] = n[:, :, 0]
        self.mask[rows, cols] = 1
        self.length[:self.rows] += 1

    def add(self, new: list[np.ndarray], mask: np.ndarray) -> None:
        """Append prefilled rows ([k, heads, L, head_dim] per tensor, `mask` [k, L]) after the others."""
        k, length = mask.shape
        if self.rows + k > self.max_rows:
            raise ValueError(f"KV cache: {self.rows} + {k} rows exceed its {self.max_rows}")
        self._fit(max(length, int(self.length[:self.rows].max(initial=0))))
        rows = slice(self.rows, self.rows + k)
        for buf, n in zip(self.buffers, new):
            buf[rows, :, :length] = n
        self.mask[rows] = 0
        self.mask[rows, :length] = mask
        self.length[rows] = length
        self.rows += k

    def keep(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` (ascending); the last rows move into the gaps the others leave.
        Returns, for each new row index, the old index of the row now there."""
        n, kept = len(keep), set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for hole, row in zip(holes, movers):
            used = int(self.length[row])
            for buf in self.buffers:
                buf[hole, :, :used] = buf[row, :, :used]
            self.mask[hole] = self.mask[row]
            self.length[hole] = self.length[row]
            order[hole] = row
        self.rows = n
        self._fit(int(self.length[:n].max(initial=0)))
        return order


class DecodeLoop:
    """Runs requests to completion on a background thread; `submit` is safe from any thread."""

    def __init__(self, graphs: T3Graphs, max_rows: int, prefill_rows: int) -> None:
        self.graphs = graphs
        self.max_requests = max(1, max_rows // 2)
        self.prefill_requests = max(1, prefill_rows // 2)
        self.cache = KVCache(2 * graphs.layers, 2 * self.max_requests, graphs.heads, graphs.head_dim)
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._reset()
        self.steps = self.step_rows = 0
        self.rows_per_step: deque[int] = deque(maxlen=4096)
        """CFG rows of the latest decode steps: the batch sizes continuous batching achieved."""

    def submit(self, requests: list[Request]) -> list[Future]:
        with self._wake:
            self._waiting.extend(requests)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="t3-decode", daemon=True)
                self._thread.start()
            self._wake.notify()
        return [r.future for r in requests]

    def _reset(self) -> None:
        self.active: list[Request] = []
        self.cache.keep([])

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self.active:
                    self._wake.wait()
                room = self.max_requests - len(self.active)
                joining = [self._waiting.popleft() for _ in range(min(room, self.prefill_requests,
                                                                       len(self._waiting)))]
            # A failing call fails the requests it involved (their callers see the error); the loop goes on.
            try:
                self._decode()
            except Exception as e:  # noqa: BLE001
                self._fail(self.active, e)
                self._reset()
            try:
                self._admit(joining)
            except Exception as e:  # noqa: BLE001
                self._fail(joining, e)

    @staticmethod
    def _fail(requests: list[Request], error: Exception) -> None:
        for r in requests:
            if not r.future.done():
                r.future.set_exception(error)

    def _decode(self) -> None:
        if not self.active:
            return
        g = self.graphs
        last = np.repeat([r.sampler.ids[-1] for r in self.active], 2)[:, None].astype(np.int64)
        speech_pos = np.repeat([len(r.sampler.ids) - 1 for r in self.active], 2)[:, None].astype(np.int64)
        cache = self.cache
        logits, new = g.run(g.embed_tokens(last, speech_pos), cache.step_mask(), cache.positions(), cache.views())
        cache.append(new)
        self.steps += 1
        self.step_rows += cache.rows
        self.rows_per_step.append(cache.rows)
        self._sample(self.active, logits)
        self._retire()

    def _admit(self, joining: list[Request]) -> None:
        if not joining:
            return
        g = self.graphs
        length = max(r.prefix.shape[1] for r in joining)
        embeds = np.zeros((2 * len(joining), length, joining[0].prefix.shape[2]), np.float32)
        mask = np.zeros((2 * len(joining), length), np.int64)
        for j, r in enumerate(joining):
            n = r.prefix.shape[1]
            embeds[2 * j:2 * j + 2, length - n:] = r.prefix
            mask[2 * j:2 * j + 2, length - n:] = 1
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
        logits, new = g.run(embeds, mask, positions, g.empty_past(len(mask)))
        self._sample(joining, logits)
        self.cache.add(new, mask)
        self.active.extend(joining)
        self._retire()

    @staticmethod
    def _sample(requests: list[Request], logits: np.ndarray) -> None:
        for j, r in enumerate(requests):
            r.sampler.step(logits[2 * j], logits[2 * j + 1])

    def _retire(self) -> None:
        """Finished requests leave the batch at once; their cache rows are reused."""
        done = [r for r in self.active if r.sampler.done]
        if not done:
            return
        keep = [j for j, r in enumerate(self.active) if not r.sampler.done]
        order = self.cache.keep([2 * j + k for j in keep for k in (0, 1)])
        self.active = [self.active[row // 2] for row in order[::2]]
        for r in done:
            r.future.set_result(r.sampler.tokens)

