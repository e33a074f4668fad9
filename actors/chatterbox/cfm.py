"""S3Gen's flow-matching decoder: `mu` + speaker + prompt mel → mel, by Euler steps with classifier-free guidance."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from actors.bundle import Bundle
from actors.chatterbox import columns
from actors.chatterbox.batching import length_groups, model_config, pad_last
from actors.errors import BundleError
from actors.rows import Batch, RowStatus
from actors.stage import Stage, StageOptions


class CFMOptions(StageOptions):
    n_timesteps: int | None = Field(None, ge=1, le=1000)
    """Euler steps; None: the bundle's `generation.cfm.n_timesteps`."""
    cfg_rate: float | None = Field(None, ge=0, le=10)
    """Classifier-free guidance r in (1 + r)·v_cond − r·v_uncond; None: the bundle's `generation.cfm.cfg_rate`."""
    max_batch_rows: int = Field(8, ge=1, le=1024)
    """Chunks per graph call (each call runs twice as many graph rows: conditional and unconditional)."""
    max_padding_ratio: float = Field(1.25, ge=1, le=10)
    """A call's longest chunk (in frames) is at most this many times its shortest."""


def time_schedule(n_steps: int, scheduler: str) -> np.ndarray:
    """The n_steps + 1 float32 time points from 0 to 1: s evenly spaced, or 1 − cos(s·π/2) for "cosine"."""
    s = np.linspace(0, 1, n_steps + 1, dtype=np.float32)
    if scheduler == "cosine":
        return (1 - np.cos(s * np.float32(0.5 * np.pi))).astype(np.float32)
    if scheduler == "linear":
        return s
    raise ValueError(f"unknown CFM time scheduler {scheduler!r} (cosine or linear)")


@dataclass
class _Unit:
    row: int
    chunk: int
    mu: np.ndarray        # [80, F]
    noise: np.ndarray     # [80, F]
    prompt: np.ndarray    # [80, P], P <= F


class CFM(Stage):
    """One CFM solve per chunk: mel [F − P, 80] (the prompt's P frames dropped) from `mu` [F, 80].

    Starting noise comes from the row's seed and the chunk's index only, and padded
    frames are masked, so a chunk's mel does not depend on what shares its batch.
    """

    name = "cfm"
    family = "chatterbox"
    Options = CFMOptions
    graphs = ("cfm_estimator",)
    requires = {
        "mu": columns.MU,
        "mu_frames": columns.MU_FRAMES,
        "spks": columns.SPKS,
        "gen_prompt_mel": columns.VOICE["gen_prompt_mel"],
        "seed": columns.SEED,
    }
    provides = {"mel": columns.MEL, "mel_frames": columns.MEL_FRAMES}
    drops = ("mu", "mu_frames", "spks", "gen_prompt_mel")

    def __init__(self, bundle: Bundle, **kwargs: Any) -> None:
        self.bins = int(model_config(bundle, "cfm")["mel_channels"])
        self.mel_ratio = int(model_config(bundle, "flow")["token_mel_ratio"])
        defaults = bundle.generation.get("cfm", {})
        super().__init__(bundle, **kwargs)
        try:
            steps = self.options.n_timesteps or int(defaults["n_timesteps"])
            self.cfg_rate = float(self.options.cfg_rate if self.options.cfg_rate is not None
                                  else defaults["cfg_rate"])
            self.times = time_schedule(steps, defaults.get("t_scheduler", "cosine"))
        except KeyError as e:
            raise BundleError(f"bundle {bundle.path}: bundle.json generation.cfm has no {e}") from None
        except ValueError as e:
            raise BundleError(f"bundle {bundle.path}: bundle.json generation.cfm: {e}") from None

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        n = len(batch["mu"])
        units: list[_Unit] = []
        spks: dict[int, np.ndarray] = {}
        chunk_counts: dict[int, int] = {}
        for i in range(n):
            try:
                chunks, prompt, spks[i] = self._row_inputs(batch, i)
            except ValueError as e:
                rows.fail(i, f"{self.name}: {e}")
                continue
            chunk_counts[i] = len(chunks)
            seed = columns.row_seed(batch, i)
            for c, mu in enumerate(chunks):
                if len(mu):
                    noise = columns.rng_for(seed, columns.CFM_STREAM, c).standard_normal((self.bins, len(mu)))
                    units.append(_Unit(i, c, mu.T, noise.astype(np.float32), prompt.T))

        mels: dict[tuple[int, int], np.ndarray] = {}
        for group in length_groups([u.mu.shape[1] for u in units], self.options.max_batch_rows,
                                   self.options.max_padding_ratio):
            members = [units[k] for k in group]
            for u, x in zip(members, self.solve(members, np.stack([spks[u.row] for u in members]))):
                mels[u.row, u.chunk] = np.ascontiguousarray(x[:, u.prompt.shape[1]:u.mu.shape[1]].T)

        out_mel, out_frames = self.provides["mel"].fill(n), self.provides["mel_frames"].fill(n)
        empty = np.zeros((0, self.bins), np.float32)
        for i, count in chunk_counts.items():
            out_mel[i], out_frames[i] = columns.join_frames([mels.get((i, c), empty) for c in range(count)])
        return {"mel": out_mel, "mel_frames": out_frames}

    def _row_inputs(self, batch: Batch, i: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(mu [F, 80] per chunk, prompt mel [P, 80], spks [80]) of row i; ValueError saying what is wrong."""
        chunks = columns.split_frames(batch["mu"][i], batch["mu_frames"][i], self.bins, "mu")
        prompt = np.asarray(batch["gen_prompt_mel"][i], dtype=np.float32).reshape(-1)
        if prompt.size % self.bins:
            raise ValueError(f"gen_prompt_mel holds {prompt.size} values, not a whole number of {self.bins}-bin "
                             "frames")
        prompt = prompt.reshape(-1, self.bins)
        spks = np.asarray(batch["spks"][i], dtype=np.float32).reshape(-1)
        if spks.shape != (self.bins,):
            raise ValueError(f"spks must be {self.bins} values, got shape {spks.shape}")
        # mu has 2 × (prompt + chunk tokens) frames and the prompt mel 2 × prompt tokens (ratio 2 as released)
        r = self.mel_ratio
        if len(prompt) % r or any(len(mu) % r or 0 < len(mu) < len(prompt) for mu in chunks):
            raise ValueError(f"the prompt mel has {len(prompt)} frames and mu {[len(mu) for mu in chunks]} per "
                             f"chunk: expected {r} × prompt tokens and {r} × (prompt + chunk tokens)")
        return chunks, prompt, spks

    def solve(self, units: list[_Unit], spks: np.ndarray) -> np.ndarray:
        """The Euler solve of one padded batch of chunks → x [B, 80, T] (valid on each unit's first F frames)."""
        frames = np.array([u.mu.shape[1] for u in units])
        x = pad_last([u.noise for u in units])
        mask = (np.arange(x.shape[-1]) < frames[:, None])[:, None, :].astype(np.float32)
        cond = np.zeros_like(x)
        for b, u in enumerate(units):
            cond[b, :, :u.prompt.shape[1]] = u.prompt
        # rows B..2B-1 are the unconditional ones: mu, spks and cond zeroed; x, mask and t shared
        mu2 = np.concatenate([pad_last([u.mu for u in units]), np.zeros_like(x)])
        cond2 = np.concatenate([cond, np.zeros_like(cond)])
        spks2 = np.concatenate([spks, np.zeros_like(spks)])
        mask2 = np.concatenate([mask, mask])
        rate, b = np.float32(self.cfg_rate), len(units)
        for t, t_next in zip(self.times[:-1], self.times[1:]):
            (v,) = self.sessions["cfm_estimator"].run(
                {"x": np.concatenate([x, x]), "mask": mask2, "mu": mu2, "t": np.full(2 * b, t, np.float32),
                 "spks": spks2, "cond": cond2}, ["velocity"])
            x = x + (t_next - t) * ((np.float32(1) + rate) * v[:b] - rate * v[b:])
        return x

    def probe_feeds(self, graph: str) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        lengths = np.array([24, 17])
        mask = (np.arange(24) < lengths[:, None])[:, None, :].astype(np.float32)
        cond = rng.standard_normal((2, self.bins, 24)).astype(np.float32) * (np.arange(24) < 8)
        return {"x": rng.standard_normal((2, self.bins, 24)).astype(np.float32), "mask": mask,
                "mu": rng.standard_normal((2, self.bins, 24)).astype(np.float32) * mask,
                "t": np.array([0.3, 0.7], np.float32), "spks": rng.standard_normal((2, self.bins)).astype(np.float32),
                "cond": (cond * mask).astype(np.float32)}
