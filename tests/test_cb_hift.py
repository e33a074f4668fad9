"""HiFT vocoder: official names/shapes, DFT-conv STFT, receptive-field margins, ONNX graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.chatterbox.config import build_config, load_preset
from export.chatterbox.graph_io import export_graph, run_onnx, session, verify_graph
from export.chatterbox.hift import (
    HiFTConfig, HiFTGenerator, build_hift, draw_sine_randomness, fade_in_torch, graph_specs,
    istft_torch, sine_generator_torch, stft_conv, stft_torch, tail_margins, vocode_torch,
)
from export.chatterbox.official_layout import section

PREFIX = "mel2wav."


@pytest.fixture(scope="module")
def tiny_cfg() -> HiFTConfig:
    return build_config(HiFTConfig, load_preset("tiny")["hift"])


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    return build_hift(tiny_cfg, seed=0)


@pytest.fixture(scope="module")
def exported(tiny, tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("hift")
    specs = graph_specs(tiny, tiny_cfg)
    return {s.name: (s, export_graph(s, out)) for s in specs}


def test_presets():
    full = build_config(HiFTConfig, load_preset("full")["hift"])
    assert full == HiFTConfig()
    tiny = build_config(HiFTConfig, load_preset("tiny")["hift"])
    for cfg in (full, tiny):
        assert (cfg.in_channels, cfg.samples_per_frame, cfg.freq_bins, cfg.nb_harmonics) == (80, 480, 9, 8)
    assert tiny.base_channels < full.base_channels and tiny.f0_channels < full.f0_channels
    with pytest.raises(ValueError):
        build_config(HiFTConfig, {"no_such_key": 1})


def test_full_size_names_and_shapes_match_official():
    with torch.device("meta"):
        model = HiFTGenerator(HiFTConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = section("s3gen.safetensors", PREFIX)
    assert sorted(set(ours) ^ set(want)) == []
    assert {k: v for k, v in ours.items() if want[k] != v} == {}


def test_strict_load_of_official_named_state_dict():
    want = section("s3gen.safetensors", PREFIX)
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(v, generator=g) for k, v in want.items()}
    model = HiFTGenerator(HiFTConfig())
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.state_dict()["conv_post.parametrizations.weight.original1"],
                       sd["conv_post.parametrizations.weight.original1"])
    missing = dict(sd)
    missing.pop("m_source.l_linear.weight")
    with pytest.raises(RuntimeError):
        model.load_state_dict(missing, strict=True)


@pytest.mark.parametrize("n", [480 * 3, 1001, 17])
def test_dft_conv_stft_equals_torch_stft(n):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(n))
    got, want = stft_conv(x, 16, 4), stft_torch(x, 16, 4)
    assert got.shape == want.shape == (2, 18, n // 4 + 1)
    assert (got - want).abs().max().item() < 2e-6
    # float64: the only difference is rounding of the basis
    assert torch.allclose(stft_conv(x.double(), 16, 4), stft_torch(x.double(), 16, 4), atol=1e-6)


def test_tail_margins_released_and_tight(tiny_cfg):
    assert tail_margins(HiFTConfig()) == {"f0": 5, "magnitude": 1709, "phase": 1709}
    margins = tail_margins(tiny_cfg)
    assert margins == tail_margins(HiFTConfig())  # same structure, same receptive field
    # Structural check in float64: outputs before the margin do not depend on the padding at
    # all (exactly zero gradient, and bit-identical values when only the padding changes);
    # the first element inside the margin does (the margin is exactly the receptive field).
    model = build_hift(tiny_cfg, seed=1).double()
    n, pad, spf = 15, 2, tiny_cfg.samples_per_frame
    rng = np.random.default_rng(0)
    mel = torch.from_numpy(rng.standard_normal((1, 80, n + pad))).requires_grad_()
    sine = torch.from_numpy(rng.standard_normal((1, (n + pad) * spf, 9)) * 0.1).requires_grad_()
    f0 = model.f0_predictor(mel)
    magnitude, phase = model(mel, sine)

    def pad_grads(out: torch.Tensor) -> list[torch.Tensor]:
        """Gradient of out.sum() w.r.t. the padded part of each input (zeros if unused)."""
        gm, gs = torch.autograd.grad(out.sum(), (mel, sine), retain_graph=True, allow_unused=True)
        return [torch.zeros(1) if g is None else g[part]
                for g, part in ((gm, (..., slice(n, None))), (gs, (slice(None), slice(n * spf, None))))]

    cut = n - margins["f0"]
    assert all(g.eq(0).all() for g in pad_grads(f0[:, :cut]))
    assert any(g.ne(0).any() for g in pad_grads(f0[:, cut]))
    cut = tiny_cfg.stft_frames(n) - margins["magnitude"]
    assert all(g.eq(0).all() for g in pad_grads(magnitude[..., :cut] + phase[..., :cut]))
    assert any(g.ne(0).any() for g in pad_grads(magnitude[..., cut]))
    assert any(g.ne(0).any() for g in pad_grads(phase[..., cut]))

    with torch.no_grad():
        mel2, sine2 = mel.clone(), sine.clone()
        mel2[..., n:] += 1.0
        sine2[:, n * spf:] += 0.5
        (ma, pa), (mb, pb) = model(mel, sine), model(mel2, sine2)
        assert torch.equal(ma[..., :cut], mb[..., :cut]) and torch.equal(pa[..., :cut], pb[..., :cut])
        assert not torch.equal(ma, mb) and not torch.equal(pa, pb)


def test_sine_generator_matches_released_arithmetic():
    cfg = HiFTConfig()
    f0 = torch.tensor([[0.0, 5.0, 120.0, 240.5, 10.0, 11.0]])
    phases, noise = draw_sine_randomness(np.random.default_rng(0), 1, 6 * 480, 8)
    assert phases[0, 0] == 0 and noise.shape == (1, 2880, 9)
    sine = sine_generator_torch(f0, cfg, phases=phases, noise=noise)
    assert sine.shape == (1, 2880, 9) and sine.dtype == torch.float32
    # direct re-derivation, in float64
    f0_up = np.repeat(f0.numpy().astype(np.float64), 480, axis=-1)[0]
    k = np.arange(1, 10)[None, :]
    theta = 2 * np.pi * (np.cumsum(f0_up[:, None] * k / 24000, axis=0) % 1)
    voiced = (f0_up > 10)[:, None]
    want = np.where(voiced, 0.1 * np.sin(theta + phases[0][None, :]) + 0.003 * noise[0], 0.1 / 3 * noise[0])
    assert np.abs(sine[0].numpy() - want).max() < 1e-4
    # same rng -> same draws
    a = sine_generator_torch(f0, cfg, rng=np.random.default_rng(5))
    b = sine_generator_torch(f0, cfg, rng=np.random.default_rng(5))
    assert torch.equal(a, b)


def test_istft_inverts_stft_and_fade():
    cfg = HiFTConfig()
    x = torch.randn(2, 480 * 4, generator=torch.Generator().manual_seed(0)) * 0.2
    spec = stft_torch(x, 16, 4)
    re, im = spec[:, :9], spec[:, 9:]
    mag = torch.sqrt(re ** 2 + im ** 2)
    audio = istft_torch(mag, torch.atan2(im, re), cfg)
    assert audio.shape == x.shape
    assert (audio - x.clamp(-0.99, 0.99)).abs().max().item() < 1e-5
    loud = istft_torch(mag * 1e4, torch.atan2(im, re), cfg)
    assert loud.abs().max().item() == pytest.approx(0.99)
    # magnitudes are clipped at 100 before the inverse transform (as released)
    assert torch.equal(istft_torch(mag.clamp(min=1.0) * 1e4, torch.atan2(im, re), cfg),
                       istft_torch(torch.full_like(mag, 100.0), torch.atan2(im, re), cfg))
    faded = fade_in_torch(torch.ones(1, 2000))
    assert faded[0, :480].abs().max() == 0 and faded[0, 960:].eq(1).all() and 0 < faded[0, 720] < 1


def test_export_and_verify_tiny(exported, tiny_cfg):
    margins = tail_margins(tiny_cfg)
    reports = {}
    for name, (spec, path) in exported.items():
        assert spec.verify_lengths != spec.trace_lengths and len(spec.verify_lengths) >= 3
        assert len(set(spec.verify_lengths)) == len(spec.verify_lengths)
        reports[name] = verify_graph(spec, path)
    assert reports["hift_f0"]["row_tail_margin"] == {"f0": margins["f0"]}
    assert reports["hift_decoder"]["row_tail_margin"] == {"magnitude": margins["magnitude"],
                                                           "phase": margins["phase"]}
    errs = reports["hift_decoder"]["max_abs_error"]
    assert errs["onnx_vs_torch_batched/magnitude"] < 1e-4 and errs["onnx_vs_torch_batch1/phase"] < 1e-4
    # without the margin the padded rows differ (the padded-row check is not vacuous)
    for spec, path in exported.values():
        saved, spec.row_tail_margin = spec.row_tail_margin, {}
        try:
            with pytest.raises(AssertionError, match="padded_row_vs_alone"):
                verify_graph(spec, path)
        finally:
            spec.row_tail_margin = saved


def test_onnx_shapes_are_dynamic(exported, tiny_cfg):
    spec, path = exported["hift_decoder"]
    sess = session(path)
    rng = np.random.default_rng(4)
    for lengths in ([3], [11, 2]):
        out = run_onnx(sess, spec, spec.make_batch(lengths, rng))
        frames = tiny_cfg.stft_frames(max(lengths))
        assert out["magnitude"].shape == out["phase"].shape == (len(lengths), 9, frames)
        assert (out["magnitude"] > 0).all() and (np.abs(out["phase"]) <= 1).all()
    spec, path = exported["hift_f0"]
    out = run_onnx(session(path), spec, spec.make_batch([13, 5], rng))
    assert out["f0"].shape == (2, 13)


def test_end_to_end_onnx_equals_torch_reference(exported, tiny, tiny_cfg):
    f0_spec, f0_path = exported["hift_f0"]
    dec_spec, dec_path = exported["hift_decoder"]
    mel = torch.randn(2, 80, 21, generator=torch.Generator().manual_seed(9)) - 1.0
    phases, noise = draw_sine_randomness(np.random.default_rng(9), 2, 21 * 480, tiny_cfg.nb_harmonics)

    want = vocode_torch(tiny, mel, phases=phases, noise=noise, stft="torch")

    f0 = run_onnx(session(f0_path), f0_spec, {"mel": mel.numpy()})["f0"]
    with torch.no_grad():
        f0_torch = tiny.f0_predictor(mel).numpy()
    assert np.abs(f0 - f0_torch).max() < 1e-3
    assert (f0 > tiny_cfg.nsf_voiced_threshold).mean() > 0.5   # the harmonic path is exercised
    # fixed sine input: the one the torch path used
    sine = sine_generator_torch(torch.from_numpy(f0_torch), tiny_cfg, phases=phases, noise=noise)
    out = run_onnx(session(dec_path), dec_spec, {"mel": mel.numpy(), "sine_waves": sine.numpy()})
    got = istft_torch(torch.from_numpy(out["magnitude"]), torch.from_numpy(out["phase"]), tiny_cfg)
    assert got.shape == want.shape == (2, 21 * 480)
    assert want.abs().max() > 1e-3
    assert (got - want).abs().max().item() < 1e-5
    # and with the sine generated from the ONNX f0 (what the runtime does)
    sine_onnx = sine_generator_torch(torch.from_numpy(f0), tiny_cfg, phases=phases, noise=noise)
    out = run_onnx(session(dec_path), dec_spec, {"mel": mel.numpy(), "sine_waves": sine_onnx.numpy()})
    got = istft_torch(torch.from_numpy(out["magnitude"]), torch.from_numpy(out["phase"]), tiny_cfg)
    assert (got - want).abs().max().item() < 1e-3
