"""One continuous-batching decode loop per T3 actor.

Every caller (a `map_batches` call; several run at once in an actor with
`max_concurrency > 1`) hands its requests to the same loop and waits. Each
iteration runs one KV-cached step over every request in flight; finished
requests leave at once and waiting ones join after a batched, left-padded
prefill, so the batch stays full however unequal the utterances are.

A request is one CFG pair: two rows (conditional, unconditional) with the same
prefix length. Rows are left-padded: a shorter cache is padded on the left with
masked zeros when requests join, and columns masked in every row are trimmed
when requests leave, so a row's numbers never depend on its neighbours.
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
    """The LM graph's cache inputs and outputs, in the order it lists them."""
    pairs = [(i, kv) for i in range(layers) for kv in ("key", "value")]
    return [f"past_key_values.{i}.{kv}" for i, kv in pairs], [f"present.{i}.{kv}" for i, kv in pairs]


class T3Graphs:
    """The LM and speech-embedding graphs as the loop calls them."""

    def __init__(self, lm: Session, speech_embed: Session, layers: int, heads: int, head_dim: int) -> None:
        self.lm, self.speech_embed = lm, speech_embed
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.past, self.present = cache_names(layers)

    def empty_past(self, rows: int) -> list[np.ndarray]:
        return [np.zeros((rows, self.heads, 0, self.head_dim), np.float32) for _ in self.past]

    def run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Last-position logits [rows, vocab] and the extended cache."""
        feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions,
                 **dict(zip(self.past, past))}
        logits, *present = self.lm.run(feeds, ["logits", *self.present])
        return logits[:, -1], present

    def embed_tokens(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.speech_embed.run({"speech_tokens": tokens, "positions": positions}, ["speech_embeds"])[0]


class DecodeLoop:
    """Runs requests to completion on a background thread; `submit` is safe from any thread."""

    def __init__(self, graphs: T3Graphs, max_rows: int, prefill_rows: int) -> None:
        self.graphs = graphs
        self.max_requests = max(1, max_rows // 2)
        self.prefill_requests = max(1, prefill_rows // 2)
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
        self.past: list[np.ndarray] = []
        self.mask = np.zeros((0, 0), np.int64)

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
        positions = self.mask.sum(axis=1, keepdims=True)
        self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), np.int64)], axis=1)
        logits, self.past = g.run(g.embed_tokens(last, speech_pos), self.mask, positions, self.past)
        self.steps += 1
        self.step_rows += len(self.mask)
        self.rows_per_step.append(len(self.mask))
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
        logits, present = g.run(embeds, mask, positions, g.empty_past(len(mask)))
        self._sample(joining, logits)
        self._merge(joining, present, mask)
        self._retire()

    @staticmethod
    def _sample(requests: list[Request], logits: np.ndarray) -> None:
        for j, r in enumerate(requests):
            r.sampler.step(logits[2 * j], logits[2 * j + 1])

    def _merge(self, joining: list[Request], present: list[np.ndarray], mask: np.ndarray) -> None:
        """Append joining rows to the running cache, left-padding whichever side is shorter."""
        if not self.active:
            self.active, self.past, self.mask = list(joining), present, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])

        def pad(a: np.ndarray, axis: int) -> np.ndarray:
            extra = width - a.shape[axis]
            if not extra:
                return a
            widths = [(0, 0)] * a.ndim
            widths[axis] = (extra, 0)
            return np.pad(a, widths)

        self.past = [np.concatenate([pad(a, 2), pad(b, 2)]) for a, b in zip(self.past, present)]
        self.mask = np.concatenate([pad(self.mask, 1), pad(mask, 1)])
        self.active.extend(joining)

    def _retire(self) -> None:
        """Finished requests leave the batch; cache columns nobody attends to are dropped."""
        done = [r for r in self.active if r.sampler.done]
        if not done:
            return
        keep = [j for j, r in enumerate(self.active) if not r.sampler.done]
        rows = np.array([2 * j + k for j in keep for k in (0, 1)], dtype=np.int64)
        self.active = [self.active[j] for j in keep]
        self.mask = self.mask[rows]
        used = np.flatnonzero(self.mask.any(axis=0))
        first = int(used[0]) if len(used) else self.mask.shape[1]
        self.mask = self.mask[:, first:]
        self.past = [p[rows][:, :, first:] for p in self.past]
        for r in done:
            r.future.set_result(r.sampler.tokens)

