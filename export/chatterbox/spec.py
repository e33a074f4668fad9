"""What each Chatterbox graph declares so that one exporter and one verifier serve them all."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

Inputs = dict[str, np.ndarray]


@dataclass
class Tolerance:
    """Largest allowed absolute error, and optionally a relative one (|a-b| <= atol + rtol*|b|)."""

    atol: float
    rtol: float = 0.0


@dataclass
class GraphSpec:
    """One ONNX graph of the bundle contract (see docs/architecture.md, "the graph contract").

    `module` is a torch wrapper whose forward takes the inputs positionally in
    `input_names` order and returns a tuple in `output_names` order.

    `make_batch(lengths, rng)` builds a right-padded batch with one row per entry
    of `lengths` (the row's length along its time axis, in the graph's own unit);
    `take_row(batch, i, lengths)` returns row i alone, unpadded (batch of 1).
    The verifier compares each output of the padded run, row i, cropped to the
    shape of the alone run's output, with the alone run.  Outputs whose padded
    region is meaningless must therefore be right-padded too.

    `trace_lengths` are used to trace the export; verification uses other lengths
    (`verify_lengths`), so a baked-in shape fails verification.
    """

    name: str
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    make_batch: Callable[[list[int], np.random.Generator], Inputs]
    take_row: Callable[[Inputs, int, list[int]], Inputs]
    trace_lengths: list[int]
    verify_lengths: list[int]
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(atol=1e-4, rtol=1e-4))
    # Outputs compared with exact equality (token ids, lengths) instead of the tolerance.
    exact_outputs: tuple[str, ...] = ()
    # For graphs whose contract has no lengths input (pure convolution stacks), the
    # last N elements along an output's last axis of each padded row see the padding
    # through the receptive field; they are left out of the padded-vs-alone check.
    row_tail_margin: dict[str, int] = field(default_factory=dict)
