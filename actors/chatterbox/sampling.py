"""Next-token choice for T3, shared by the ONNX runtime and the eager torch baseline.

The official loop's order: classifier-free guidance, repetition penalty over the
generated ids (the start token included), temperature, min-p, top-p, then a draw.
`temperature` 0 means greedy. Each request draws from its own generator, so its
tokens do not depend on which other requests share the decode batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    cfg_weight: float = 0.5
    max_new_tokens: int = 1000


class Sampler:
    """One request's sampling state: its parameters, generated ids and random generator."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator, start_token: int, stop_token: int) -> None:
        self.params = params
        self.rng = rng
        self.stop_token = stop_token
        self.ids: list[int] = [start_token]
        self.done = False

    @property
    def tokens(self) -> list[int]:
        """Generated tokens, the start token and a final stop token excluded."""
        return [t for t in self.ids[1:] if t != self.stop_token]

    def step(self, cond: np.ndarray, uncond: np.ndarray) -> int:
        """The next token from one position's conditional and unconditional logits [vocab]."""
        p = self.params
        cond = cond.astype(np.float64)
        logits = cond + p.cfg_weight * (cond - uncond.astype(np.float64))
        seen = np.unique(np.asarray(self.ids, dtype=np.int64))
        picked = logits[seen]
        logits[seen] = np.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.temperature == 0:
            token = int(np.argmax(logits))
        else:
            token = self._draw(logits / p.temperature)
        self.ids.append(token)
        self.done = token == self.stop_token or len(self.ids) - 1 >= p.max_new_tokens
        return token

    def _draw(self, logits: np.ndarray) -> int:
        p = self.params
        probs = _softmax(logits)
        if p.min_p > 0:
            logits = np.where(probs < p.min_p * probs.max(), -np.inf, logits)
        if p.top_p < 1:
            order = np.argsort(logits, kind="stable")  # ascending, as the reference warper works
            tail = np.cumsum(_softmax(logits[order])) <= 1 - p.top_p
            tail[-1] = False  # the most likely token always stays
            logits = logits.copy()
            logits[order[tail]] = -np.inf
        cdf = np.cumsum(_softmax(logits))
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()
