"""CFM estimator (S3Gen flow decoder): checkpoint names, ONNX export/verification, Euler/CFG solver."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from export.chatterbox.cfm import (
    CFMConfig, CFMEstimator, graph_specs, make_cfm_batch, solve_cfm_torch, time_schedule,
)
from export.chatterbox.config import build_config, load_preset
from export.chatterbox.graph_io import export_graph, verify_graph
from export.chatterbox.official_layout import section

PREFIX = "flow.decoder.estimator."


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded init that also moves norm weights/biases off 1/0, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(fan_in))
            elif name.endswith("weight"):      # LayerNorm scales
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny tensors: extra intra-op threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_cfg() -> CFMConfig:
    return build_config(CFMConfig, load_preset("tiny")["cfm"])


@pytest.fixture(scope="module")
def tiny(tiny_cfg) -> CFMEstimator:
    return _randomize(CFMEstimator(tiny_cfg), seed=0)


def _batch(cfg: CFMConfig, lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    batch = make_cfm_batch(lengths, np.random.default_rng(seed), cfg.mel_channels)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def test_presets_build():
    full = build_config(CFMConfig, load_preset("full")["cfm"])
    assert full == CFMConfig()
    assert (full.in_channels, full.channels, full.num_mid_blocks, full.n_blocks) == (320, [256], 12, 4)
    tiny = build_config(CFMConfig, load_preset("tiny")["cfm"])
    assert tiny.in_channels == 320 and tiny.mel_channels == 80


def test_full_size_state_dict_equals_checkpoint():
    want = section("s3gen.safetensors", PREFIX)
    assert len(want) == 910
    with torch.device("meta"):
        model = CFMEstimator(CFMConfig())
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) ^ set(want)) == []
    assert got == want


def test_strict_load_of_official_named_state_dict():
    shapes = section("s3gen.safetensors", PREFIX)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    with torch.device("meta"):
        model = CFMEstimator(CFMConfig())
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    b = _batch(model.cfg, [6, 4], seed=0)
    with torch.no_grad():
        v = model(**b)
    assert v.shape == (2, 80, 6) and torch.isfinite(v).all()
    assert torch.equal(model.final_proj.bias, sd["final_proj.bias"])
    # A missing name is an error under strict loading.
    sd.pop("mid_blocks.11.1.3.ff.net.2.bias")
    with torch.device("meta"):
        other = CFMEstimator(CFMConfig())
    with pytest.raises(RuntimeError, match="Missing key"):
        other.load_state_dict(sd, strict=True, assign=True)


@pytest.mark.parametrize("channels", [[32], [24, 32]])
def test_padded_rows_equal_rows_alone_in_torch(tiny_cfg, channels):
    """Also the multi-level U-Net (strided down / transposed up) with odd lengths."""
    cfg = CFMConfig(**{**tiny_cfg.__dict__, "channels": channels})
    model = _randomize(CFMEstimator(cfg), seed=1)
    lengths = [23, 8, 15]
    b = _batch(cfg, lengths, seed=2)
    with torch.no_grad():
        padded = model(**b)
        for i, n in enumerate(lengths):
            row = {k: (v[i:i + 1] if v.ndim < 3 else v[i:i + 1, :, :n]) for k, v in b.items()}
            alone = model(**row)
            torch.testing.assert_close(padded[i:i + 1, :, :n], alone, atol=1e-5, rtol=1e-5)
            assert torch.count_nonzero(padded[i, :, n:]) == 0        # velocity is 0 on padding
            assert alone.abs().mean() > 0.05                         # not trivially zero


def test_export_and_verify(tiny, tiny_cfg, tmp_path):
    spec = graph_specs(tiny, tiny_cfg)[0]
    assert len(spec.verify_lengths) >= 3 and len(set(spec.verify_lengths)) == len(spec.verify_lengths)
    assert max(spec.verify_lengths) > max(spec.trace_lengths) and min(spec.verify_lengths) < min(spec.trace_lengths)
    path = export_graph(spec, tmp_path)

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x", "mask", "mu", "t", "spks", "cond"]
    assert [o.name for o in graph.output] == ["velocity"]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(graph.input) + list(graph.output)}
    assert dims["x"] == ["batch", 80, "time"] and dims["mask"] == ["batch", 1, "time"]
    assert dims["t"] == ["batch"] and dims["spks"] == ["batch", 80]
    assert dims["velocity"] == ["batch", 80, "time"]

    report = verify_graph(spec, path)
    errs = report["max_abs_error"]
    assert set(errs) == {"onnx_vs_torch_batched/velocity", "onnx_vs_torch_batch1/velocity",
                         "padded_row_vs_alone/velocity"}
    assert max(errs.values()) < spec.tolerance.atol


def test_time_schedule():
    ts = time_schedule(10).numpy()
    s = np.linspace(0, 1, 11)
    np.testing.assert_allclose(ts, 1 - np.cos(s * np.pi / 2), atol=1e-6)
    assert ts.dtype == np.float32 and ts[0] == 0.0 and ts[-1] == 1.0
    np.testing.assert_allclose(time_schedule(4, "linear").numpy(), [0, .25, .5, .75, 1])


class _StubEstimator(torch.nn.Module):
    """A velocity with a closed form that depends on every input, to check the solver's bookkeeping."""

    def forward(self, x, mask, mu, t, spks, cond):
        return (mu - 0.5 * x + t[:, None, None] * spks[:, :, None] + 0.3 * cond) * mask


def test_solver_schedule_and_cfg_against_explicit_loop():
    rng = np.random.default_rng(3)
    B, C, T = 2, 80, 7
    mu, cond, noise = (rng.standard_normal((B, C, T)).astype(np.float32) for _ in range(3))
    spks = rng.standard_normal((B, C)).astype(np.float32)
    mask = np.ones((B, 1, T), np.float32)
    mask[1, :, 5:] = 0
    got = solve_cfm_torch(_StubEstimator(), *(torch.from_numpy(a) for a in (mu, mask, spks, cond, noise)),
                          n_steps=10, cfg_rate=0.7).numpy()

    x = noise.astype(np.float64)
    ts = [1 - math.cos(k / 10 * math.pi / 2) for k in range(11)]
    for k in range(10):
        v_c = (mu - 0.5 * x + ts[k] * spks[:, :, None] + 0.3 * cond) * mask
        v_u = (-0.5 * x) * mask
        x = x + (ts[k + 1] - ts[k]) * (1.7 * v_c - 0.7 * v_u)
    np.testing.assert_allclose(got, x, atol=1e-5)
    np.testing.assert_array_equal(got[1, :, 5:], noise[1, :, 5:])   # masked frames keep their noise


def test_solver_padded_batch_equals_rows_alone(tiny, tiny_cfg):
    lengths = [19, 7, 12]
    b = _batch(tiny_cfg, lengths, seed=4)
    noise = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 80, 19)).astype(np.float32))
    args = dict(n_steps=tiny_cfg.n_timesteps, cfg_rate=tiny_cfg.cfg_rate)
    out = solve_cfm_torch(tiny, b["mu"], b["mask"], b["spks"], b["cond"], noise, **args)
    for i, n in enumerate(lengths):
        row = {k: (v[i:i + 1] if v.ndim < 3 else v[i:i + 1, :, :n]) for k, v in b.items()}
        alone = solve_cfm_torch(tiny, row["mu"], row["mask"], row["spks"], row["cond"], noise[i:i + 1, :, :n],
                                **args)
        torch.testing.assert_close(out[i:i + 1, :, :n], alone, atol=1e-4, rtol=1e-4)
        assert (alone - noise[i:i + 1, :, :n]).abs().mean() > 0.1   # the solve moved x
        torch.testing.assert_close(out[i, :, n:], noise[i, :, n:], atol=0, rtol=0)
    # Guidance matters: a different rate gives a different result.
    other = solve_cfm_torch(tiny, b["mu"], b["mask"], b["spks"], b["cond"], noise, n_steps=10, cfg_rate=0.0)
    assert (other - out).abs().max() > 1e-3
