"""S3Gen flow token encoder (`flow.*` minus `flow.decoder.*`) and its `s3gen_encoder` graph."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from export.chatterbox.config import load_preset
from export.chatterbox.flow_encoder import (
    FlowDecoder, FlowEncoder, FlowEncoderConfig, _positions, _rel_index, _rel_pos_table,
    build_flow_encoder, graph_specs,
)
from export.chatterbox.graph_io import export_graph, run_onnx, session, verify_graph
from export.chatterbox.official_layout import section


def official_flow_shapes() -> dict[str, list[int]]:
    """The released `flow.` keys less the decoder (the CFM estimator, tested in test_cb_cfm.py)."""
    return {k: v for k, v in section("s3gen.safetensors", "flow.").items() if not k.startswith("decoder.")}


@pytest.fixture(scope="module")
def tiny() -> FlowEncoder:
    torch.manual_seed(0)
    model = build_flow_encoder(load_preset("tiny")["flow"]).eval()
    with torch.no_grad():  # non-trivial norms and biases, so masking mistakes show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_full_size_names_and_shapes_match_release():
    want = official_flow_shapes()
    with torch.device("meta"):
        model = build_flow_encoder(load_preset("full")["flow"])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not bad


def test_full_size_strict_load_and_run():
    want = official_flow_shapes()
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in want.items()}
    with torch.device("meta"):
        model = FlowEncoder(FlowEncoderConfig())
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    with torch.no_grad():
        mu, mel_lengths, spks = model(torch.tensor([[1, 6560, 3, 4, 0]]), torch.tensor([5]),
                                      torch.randn(1, 192))
    assert mu.shape == (1, 80, 10) and spks.shape == (1, 80)
    assert mel_lengths.tolist() == [10] and torch.isfinite(mu).all()
    assert torch.equal(model.input_embedding.weight, sd["input_embedding.weight"])
    # a wrong shape must be refused
    sd["encoder.up_layer.conv.weight"] = torch.zeros(512, 512, 3)
    with torch.device("meta"):
        other = FlowEncoder()
    with pytest.raises(RuntimeError):
        other.load_state_dict(sd, strict=True, assign=True)


def test_decoder_slot_joins_the_flow_state_dict():
    est = torch.nn.Conv1d(4, 4, 1)
    flow = FlowEncoder(FlowEncoderConfig(**load_preset("tiny")["flow"]), decoder=FlowDecoder(est))
    keys = set(flow.state_dict())
    assert {"decoder.estimator.weight", "decoder.estimator.bias"} <= keys
    assert "encoder.after_norm.weight" in keys


@pytest.mark.parametrize("t", [1, 2, 7, 40])
def test_relative_positions_match_released_table(t):
    """Our dynamic table/index equal the released precomputed table sliced around its centre + rel_shift."""
    d, max_len = 16, 64
    pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    inv = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    positive, negative = torch.zeros(max_len, d), torch.zeros(max_len, d)
    positive[:, 0::2], positive[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
    negative[:, 0::2], negative[:, 1::2] = torch.sin(-1 * pos * inv), torch.cos(-1 * pos * inv)
    table = torch.cat([torch.flip(positive, [0]), negative[1:]])
    centre = table.shape[0] // 2
    want = table[centre - t + 1: centre + t]
    x = torch.zeros(1, t, 1)
    got = _rel_pos_table(_positions(x), d)
    assert torch.equal(got, want)

    scores = torch.randn(2, 3, t, 2 * t - 1)
    # the pad-and-reshape shift of Transformer-XL
    padded = torch.cat([torch.zeros(2, 3, t, 1), scores], dim=-1).view(2, 3, 2 * t, t)
    shifted = padded[:, :, 1:].reshape(2, 3, t, 2 * t - 1)[..., :t]
    gathered = torch.gather(scores, 3, _rel_index(_positions(x)).expand(2, 3, t, t))
    assert torch.equal(gathered, shifted)


def test_padded_rows_equal_rows_alone_in_torch(tiny):
    spec = graph_specs(tiny)[0]
    lengths = [30, 3, 17]   # longer than traced
    batch = spec.make_batch(lengths, np.random.default_rng(3))
    with torch.no_grad():
        mu, mel_len, spks = tiny(*(torch.from_numpy(batch[n]) for n in spec.input_names))
        assert mel_len.tolist() == [2 * n for n in lengths]
        for i, n in enumerate(lengths):
            row = spec.take_row(batch, i, lengths)
            mu1, _, spks1 = tiny(*(torch.from_numpy(row[k]) for k in spec.input_names))
            assert mu1.shape == (1, 80, 2 * n)
            torch.testing.assert_close(mu[i:i + 1, :, :2 * n], mu1, atol=1e-5, rtol=1e-5)
            assert torch.all(mu[i, :, 2 * n:] == 0)
            torch.testing.assert_close(spks[i:i + 1], spks1)
    x = torch.from_numpy(batch["xvector"])
    want = tiny.spk_embed_affine_layer(x / x.norm(dim=1, keepdim=True))
    torch.testing.assert_close(spks, want.detach())


def test_lookahead_sees_zeros_past_the_end(tiny):
    """Tokens past a row's length (padding) must not change its valid frames, whatever their ids."""
    g = torch.Generator().manual_seed(5)
    tok = torch.randint(0, 6561, (1, 12), generator=g)
    other = tok.clone()
    other[:, 8:] = torch.randint(0, 6561, (1, 4), generator=g)
    with torch.no_grad():
        a = tiny.encode(tok, torch.tensor([8]))[0][..., :16]
        b = tiny.encode(other, torch.tensor([8]))[0][..., :16]
        c = tiny.encode(tok[:, :8], torch.tensor([8]))[0]
        # the same tokens as valid tokens do reach frame 15 through the look-ahead
        d = tiny.encode(tok, torch.tensor([12]))[0][..., :16]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert (d - c).abs().max() > 1e-3


def test_export_and_verify_tiny(tiny, tmp_path):
    spec = graph_specs(tiny)[0]
    assert len(spec.verify_lengths) >= 3 and len(set(spec.verify_lengths)) == len(spec.verify_lengths)
    assert max(spec.verify_lengths) > max(spec.trace_lengths)
    path = export_graph(spec, tmp_path)
    report = verify_graph(spec, path)
    assert report["batch_sizes"] == [1, len(spec.verify_lengths)]
    for key, err in report["max_abs_error"].items():
        assert err <= spec.tolerance.atol, (key, err)

    # a batch of 1 much longer than traced, and lengths out of the input's order
    sess = session(path)
    for lengths in ([64], [5, 40]):
        batch = spec.make_batch(lengths, np.random.default_rng(9))
        got = run_onnx(sess, spec, batch)
        with torch.no_grad():
            want = spec.module(*(torch.from_numpy(batch[n]) for n in spec.input_names))
        assert got["mu"].shape == (len(lengths), 80, 2 * max(lengths))
        np.testing.assert_array_equal(got["mel_lengths"], 2 * np.asarray(lengths))
        np.testing.assert_allclose(got["mu"], want[0].numpy(), atol=spec.tolerance.atol, rtol=spec.tolerance.rtol)
        np.testing.assert_allclose(got["spks"], want[2].numpy(), atol=spec.tolerance.atol, rtol=spec.tolerance.rtol)
