"""Chatterbox conditioning encoders: VoiceEncoder, CAMPPlus, S3 tokenizer v2.

Checks that full-size modules carry exactly the official parameter names and
shapes, that released-style state dicts load strictly (the tokenizer's
computed buffers included), and that tiny seeded models export to ONNX graphs
matching the contract and verifying against torch (batch 1 and padded batch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.chatterbox import campplus, s3tokenizer, voice_encoder
from export.chatterbox.config import build_config, load_preset
from export.chatterbox.graph_io import export_graph, run_torch, verify_graph
from export.chatterbox.official_layout import section

COMPONENTS = {
    # name: (module, model class, config class, preset section, checkpoint file, key prefix)
    "voice_encoder": (voice_encoder, voice_encoder.VoiceEncoder, voice_encoder.VoiceEncoderConfig,
                      "voice_encoder", "ve.safetensors", ""),
    "campplus": (campplus, campplus.CAMPPlus, campplus.CAMPPlusConfig,
                 "campplus", "s3gen.safetensors", "speaker_encoder."),
    "s3tokenizer": (s3tokenizer, s3tokenizer.S3Tokenizer, s3tokenizer.S3TokenizerConfig,
                    "s3tokenizer", "s3gen.safetensors", "tokenizer."),
}
COMPUTED = ("_mel_filters", "window")


def _random_state_dict(shapes: dict[str, list[int]], device: str = "cpu", seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7, dtype=torch.int64, device=device)
        elif device == "meta":
            sd[k] = torch.empty(shape, device="meta")
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    return sd


# ---------------------------------------------------------------------------
# (a) full-size names and shapes


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_full_size_state_dict_matches_official(name):
    _, cls, _, _, ckpt, prefix = COMPONENTS[name]
    want = section(ckpt, prefix)
    assert want, f"no {prefix!r} keys in {ckpt}"
    with torch.device("meta"):
        model = cls()
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}


# ---------------------------------------------------------------------------
# (b) strict loads


@pytest.mark.parametrize("name", ["voice_encoder", "campplus"])
def test_full_size_strict_load_of_official_names(name):
    _, cls, _, _, ckpt, prefix = COMPONENTS[name]
    sd = _random_state_dict(section(ckpt, prefix))
    model = cls()
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].to(v.dtype)), k
    # A released file missing one key must not load strictly.
    missing = dict(sd)
    missing.pop(next(iter(missing)))
    with pytest.raises(RuntimeError):
        cls().load_state_dict(missing, strict=True)


def test_tokenizer_released_keys_plus_computed_buffers_load_strict():
    tokenizer = section("s3gen.safetensors", "tokenizer.")
    released = {k: v for k, v in tokenizer.items() if k not in COMPUTED}
    assert len(released) == len(tokenizer) - 2
    with torch.device("meta"):
        model = s3tokenizer.S3Tokenizer()
    with pytest.raises(RuntimeError, match="_mel_filters"):
        model.load_state_dict(_random_state_dict(released, device="meta"), strict=True, assign=True)
    sd = _random_state_dict(released, device="meta")
    sd.update(model.computed_buffers())
    model.load_state_dict(sd, strict=True, assign=True)
    assert torch.equal(model._mel_filters, s3tokenizer.computed_buffers()["_mel_filters"])

    # Tiny model with real values: released-style dict (no computed buffers) + computed buffers.
    cfg = build_config(s3tokenizer.S3TokenizerConfig, load_preset("tiny")["s3tokenizer"])
    src = s3tokenizer.S3Tokenizer(cfg)
    shapes = {k: list(v.shape) for k, v in src.state_dict().items() if k not in COMPUTED}
    sd = _random_state_dict(shapes, seed=3)
    sd.update(src.computed_buffers())
    dst = s3tokenizer.S3Tokenizer(cfg)
    dst.load_state_dict(sd, strict=True)
    assert torch.equal(dst.encoder.conv1.weight, sd["encoder.conv1.weight"])


def test_tokenizer_computed_buffers_match_librosa_slaney():
    bufs = s3tokenizer.computed_buffers()
    mel = bufs["_mel_filters"].double().numpy()
    assert mel.shape == (128, 201) and bufs["window"].shape == (400,)
    # Reference values of librosa.filters.mel(sr=16000, n_fft=400, n_mels=128) (as shipped by Whisper).
    assert mel.sum() == pytest.approx(3.1909855409403463, abs=1e-6)
    assert mel[0, 1] == pytest.approx(0.012373986653983593, abs=1e-9)
    assert mel[64].max() == pytest.approx(0.018091518431901932, abs=1e-9)
    assert mel.argmax(axis=1)[[0, 40, 80, 127]].tolist() == [1, 24, 63, 195]
    assert (mel >= 0).all()
    n = np.arange(400)
    np.testing.assert_allclose(bufs["window"].numpy(), 0.5 - 0.5 * np.cos(2 * np.pi * n / 400), atol=1e-6)
    # A freshly built module carries the same buffers.
    model = s3tokenizer.S3Tokenizer(s3tokenizer.S3TokenizerConfig(n_state=8, n_head=2, n_layer=1))
    assert torch.equal(model._mel_filters, bufs["_mel_filters"]) and torch.equal(model.window, bufs["window"])


# ---------------------------------------------------------------------------
# (c) tiny export + verification


def _tiny(name: str, seed: int = 0):
    mod, cls, cfg_cls, section, _, _ = COMPONENTS[name]
    cfg = build_config(cfg_cls, load_preset("tiny")[section])
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():  # non-trivial batch-norm statistics
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return mod, model, cfg


def _export_and_verify(name: str, tmp_path: Path, io: tuple[list[str], list[str]]):
    mod, model, cfg = _tiny(name)
    (spec,) = mod.graph_specs(model, cfg)
    assert (spec.input_names, spec.output_names) == io
    path = export_graph(spec, tmp_path)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == io[0] and [o.name for o in graph.output] == io[1]
    report = verify_graph(spec, path)
    assert report["batch_sizes"] == [1, len(spec.verify_lengths)]
    return spec, model, cfg, report


def test_ve_graph(tmp_path):
    spec, model, cfg, _ = _export_and_verify("voice_encoder", tmp_path, (["mels"], ["embeds"]))
    batch = spec.make_batch([160] * 3, np.random.default_rng(5))
    assert batch["mels"].shape == (3, 160, 40)
    emb = run_torch(spec, batch)["embeds"]
    assert emb.shape == (3, 256)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_campplus_graph(tmp_path):
    spec, model, cfg, _ = _export_and_verify("campplus", tmp_path, (["fbank"], ["xvector"]))
    # No lengths input: rows of a batch share one length (see graph_specs); the verified
    # length differs from the traced one.
    assert len(set(spec.verify_lengths)) == 1 and spec.verify_lengths[0] not in spec.trace_lengths
    out = run_torch(spec, spec.make_batch(spec.verify_lengths, np.random.default_rng(5)))["xvector"]
    assert out.shape == (3, 192) and not np.allclose(out[0], out[1])


def test_s3tokenizer_graph(tmp_path):
    spec, model, cfg, _ = _export_and_verify(
        "s3tokenizer", tmp_path, (["mels", "mel_lengths"], ["tokens", "token_lengths"]))
    lengths = spec.verify_lengths
    assert len(set(lengths)) == len(lengths)
    batch = spec.make_batch(lengths, np.random.default_rng(5))
    out = run_torch(spec, batch)
    want_len = [-(-(-(-n // 2)) // 2) for n in lengths]  # ceil(ceil(n/2)/2)
    assert out["token_lengths"].tolist() == want_len and out["token_lengths"].dtype == np.int64
    assert out["tokens"].dtype == np.int64 and out["tokens"].shape == (len(lengths), max(want_len))
    assert out["tokens"].min() >= 0 and out["tokens"].max() < 3 ** 8
    assert len(np.unique(out["tokens"])) > 5  # the random model does not collapse to one id

    # Masking, not zero padding, isolates rows: garbage in the padded frames changes nothing.
    noisy = {k: v.copy() for k, v in batch.items()}
    for i, n in enumerate(lengths):
        noisy["mels"][i, :, n:] = 50.0 * np.random.default_rng(i).standard_normal(noisy["mels"][i, :, n:].shape)
    noisy_out = run_torch(spec, noisy)
    for i, n in enumerate(want_len):
        assert np.array_equal(noisy_out["tokens"][i, :n], out["tokens"][i, :n]), i
