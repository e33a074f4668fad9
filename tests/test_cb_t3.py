"""T3 (text -> speech tokens): state-dict layout, the four graphs, LM decoding checks, int8."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch

from export.chatterbox.config import build_config, load_preset
from export.chatterbox.graph_io import export_graph, session, verify_graph
from export.chatterbox.lm_verify import (INT8_THRESHOLDS, int8_thresholds, quantize_lm, verify_lm, verify_lm_int8,
                                         verify_lm_step)
from export.chatterbox.official_layout import section
from export.chatterbox.t3 import LM_TOLERANCE, T3, T3Config, graph_specs, lm_spec, seeded_init


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = build_config(T3Config, load_preset("tiny")["t3"])
    return cfg, seeded_init(T3(cfg), seed=0)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    cfg, model = tiny
    out = tmp_path_factory.mktemp("t3")
    specs = {s.name: s for s in graph_specs(model, cfg)}
    paths = {name: export_graph(spec, out) for name, spec in specs.items()}
    return specs, paths


def test_full_size_state_dict_matches_official():
    want = section("t3_cfg.safetensors")
    with torch.device("meta"):
        model = T3(T3Config())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) ^ set(want)) == []
    assert ours == want


def test_full_size_strict_load_of_official_names():
    with torch.device("meta"):
        model = T3(T3Config())
        sd = {k: torch.empty(shape) for k, shape in section("t3_cfg.safetensors").items()}
    model.load_state_dict(sd, strict=True, assign=True)
    missing = dict(sd)
    missing.pop("text_head.weight")
    with pytest.raises(RuntimeError, match="text_head"):
        model.load_state_dict(missing, strict=True, assign=True)
    wrong = dict(sd)
    with torch.device("meta"):
        wrong["speech_head.weight"] = torch.empty(8193, 1024)
    with pytest.raises(RuntimeError, match="speech_head"):
        model.load_state_dict(wrong, strict=True, assign=True)


def test_tiny_strict_load_reproduces_outputs(tiny):
    cfg, model = tiny
    other = T3(cfg).eval()
    other.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True)
    tokens = torch.tensor([[cfg.start_text_token, 5, 9, cfg.stop_text_token]])
    with torch.no_grad():
        assert torch.equal(other.text_embeds(tokens), model.text_embeds(tokens))
        e = model.text_embeds(tokens)
        past = model.tfmr.empty_past(1)
        mask, pos = torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None]
        assert torch.equal(other.lm(e, mask, pos, past)[0], model.lm(e, mask, pos, past)[0])


def test_graph_contract_names(exported, tiny):
    cfg, _ = tiny
    specs, paths = exported
    assert list(specs) == ["t3_cond", "t3_text_embed", "t3_speech_embed", "t3_lm", "t3_lm_step"]
    pairs = [(i, kv) for i in range(cfg.num_layers) for kv in ("key", "value")]
    for graph, cache_out in (("t3_lm", "present"), ("t3_lm_step", "new")):
        lm = onnx.load(str(paths[graph]))
        ins = [i.name for i in lm.graph.input]
        outs = [o.name for o in lm.graph.output]
        assert ins[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
        assert ins[3:] == [f"past_key_values.{i}.{kv}" for i, kv in pairs]
        assert outs == ["logits"] + [f"{cache_out}.{i}.{kv}" for i, kv in pairs]
    lm = onnx.load(str(paths["t3_lm"]))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in lm.graph.input}
    assert dims["past_key_values.0.key"] == ["batch", cfg.num_kv_heads, "past_sequence", cfg.head_dim]
    assert dims["attention_mask"] == ["batch", "total"]
    sess = session(paths["t3_cond"])
    out = sess.run(None, specs["t3_cond"].make_batch([cfg.prompt_len] * 2, np.random.default_rng(0)))[0]
    assert out.shape == (2, cfg.cond_len, cfg.hidden_size) and cfg.cond_len == 34


@pytest.mark.parametrize("name", ["t3_cond", "t3_text_embed", "t3_speech_embed"])
def test_embedding_graphs_verify(exported, name):
    specs, paths = exported
    report = verify_graph(specs[name], paths[name])
    assert report["batch_sizes"] == [1, 3]
    if name == "t3_cond":   # a shorter speaker prompt (reference under 6 s) than the trace
        verify_graph(dataclasses.replace(specs[name], verify_lengths=[37, 37]), paths[name])


def test_verify_graph_fails_on_wrong_weights(exported, tiny):
    cfg, model = tiny
    specs, paths = exported
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.cond_enc.perceiver.attn.to_v.bias.add_(0.01)
    spec = [s for s in graph_specs(bad, cfg) if s.name == "t3_cond"][0]
    with pytest.raises(AssertionError, match="t3_cond"):
        verify_graph(spec, paths["t3_cond"])


def test_uncond_text_row_is_positions_only(exported, tiny):
    cfg, model = tiny
    _, paths = exported
    tokens = np.array([[cfg.start_text_token, 7, 3, cfg.stop_text_token], [-1, -1, -1, -1]], np.int64)
    got = session(paths["t3_text_embed"]).run(None, {"text_tokens": tokens})[0]
    pos = model.text_pos_emb.emb.weight[:4].detach().numpy()
    np.testing.assert_array_equal(got[1], pos)
    want = model.text_emb.weight[torch.from_numpy(tokens[0])].detach().numpy() + pos
    np.testing.assert_allclose(got[0], want, atol=1e-6)


def test_prefill_assembled_from_graphs_matches_reference(exported, tiny):
    """The runtime's prefill: cond_embeds ++ text_embeds ++ speech_embeds([start, start] at [0, 0])."""
    cfg, model = tiny
    specs, paths = exported
    rng = np.random.default_rng(3)
    cond_in = specs["t3_cond"].make_batch([cfg.prompt_len], rng)
    text = np.array([[cfg.start_text_token, 11, 42, 7, cfg.stop_text_token]], np.int64)
    start = np.full((1, 2), cfg.start_speech_token, np.int64)
    parts = [
        session(paths["t3_cond"]).run(None, cond_in)[0],
        session(paths["t3_text_embed"]).run(None, {"text_tokens": text})[0],
        session(paths["t3_speech_embed"]).run(None, {"speech_tokens": start,
                                                     "positions": np.zeros_like(start)})[0],
    ]
    with torch.no_grad():
        ref = model.prefill_embeds(*(torch.from_numpy(cond_in[k]) for k in
                                     ("speaker_emb", "prompt_tokens", "exaggeration")),
                                   torch.from_numpy(text)).numpy()
    np.testing.assert_allclose(np.concatenate(parts, axis=1), ref, atol=1e-5)


@pytest.mark.parametrize("past_len", [0, 5])
def test_lm_right_padded_at_other_past_lengths(exported, tiny, past_len):
    """One graph serves prefill (empty past) and cached steps; traced at past 3."""
    cfg, model = tiny
    _, paths = exported
    report = verify_graph(lm_spec(model, cfg, past_len=past_len), paths["t3_lm"])
    assert report["max_abs_error"]["padded_row_vs_alone/logits"] <= LM_TOLERANCE.atol


def test_verify_lm_left_padded_decode(exported, tiny):
    cfg, model = tiny
    _, paths = exported
    report = verify_lm(model, cfg, paths["t3_lm"], text_lengths=(9, 4, 13), decode_steps=8)
    errs = report["max_abs_error"]
    for key in ("onnx_vs_torch_batched/logits", "onnx_vs_torch_batch1/logits",
                "padded_row_vs_alone/logits", "padded_row_vs_alone/present"):
        assert errs[key] <= LM_TOLERANCE.atol, key
    assert len(set(report["prefill_lengths"])) == 3
    tokens = np.array(report["greedy_tokens"])
    assert tokens.shape == (3, 9)
    # the tiny model's choices depend on context: rows with different text decode differently
    assert len({tuple(r) for r in tokens}) == 3


def test_step_graph_with_runtime_cache_matches_contract(exported, tiny, tmp_path):
    """t3_lm_step decoding through the in-place KVCache (rows leaving and joining, capacity growing and
    shrinking) gives the contract graph's logits and cache; a step graph of other weights does not."""
    cfg, model = tiny
    _, paths = exported
    report = verify_lm_step(model, cfg, paths["t3_lm_step"], paths["t3_lm"], decode_steps=8)
    assert report["max_abs_error"]["step_vs_contract/logits"] <= LM_TOLERANCE.atol
    assert report["max_abs_error"]["step_vs_contract/cache"] <= LM_TOLERANCE.atol
    other = seeded_init(T3(cfg), seed=1)
    other_step = export_graph(lm_spec(other, cfg, step=True), tmp_path)
    with pytest.raises(AssertionError, match="step_vs_contract|t3_lm_step"):
        verify_lm_step(model, cfg, other_step, paths["t3_lm"], decode_steps=2)


def test_verify_lm_fails_on_wrong_model(exported, tiny):
    cfg, model = tiny
    _, paths = exported
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.tfmr.layers[1].self_attn.o_proj.weight.mul_(1.01)
    with pytest.raises(AssertionError, match="t3_lm"):
        verify_lm(bad, cfg, paths["t3_lm"], text_lengths=(5, 3, 8), decode_steps=2)


def test_int8_lm_agrees_with_fp32(exported, tiny, tmp_path):
    """t3_lm_step with int8 weights: per-channel DynamicQuantizeMatMul everywhere but the head and layer 0, next-token
    distributions close to fp32's over 4 rows x 64 teacher-forced steps; other weights and zero bounds fail."""
    cfg, model = tiny
    _, paths = exported
    q = tmp_path / "t3_lm_step.int8.onnx"
    info = quantize_lm(paths["t3_lm_step"], q)
    graph = onnx.load(str(q)).graph
    inits = {i.name: i for i in graph.initializer}
    dq = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
    fp32 = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert info["quantized_matmuls"] == len(dq) == 7 * (cfg.num_layers - 1)
    assert sorted(info["fp32_matmuls"]) == sorted(n.name for n in fp32)
    assert {n.name.split("/")[2] for n in fp32} == {"layers.0", "MatMul"} and fp32[-1].output == ["logits"]
    for n in dq:            # int8 weights, one fp32 scale per output column (symmetric: no zero point)
        w, scale = inits[n.input[1]], inits[n.input[2]]
        assert w.data_type == onnx.TensorProto.INT8 and list(scale.dims) == [w.dims[1]] and len(n.input) == 3
    assert [o.name for o in graph.output] == [o.name for o in onnx.load(str(paths["t3_lm_step"])).graph.output]

    report = verify_lm_int8(model, cfg, paths["t3_lm_step"], q, steps=64)
    t = report["thresholds"]
    assert t == INT8_THRESHOLDS and report["rows"] == 4 and report["predictions"] == 4 * 65
    assert report["kl_mean"] < t["max_kl_mean"] / 5 and report["kl_max"] < t["max_kl_max"] / 5
    assert report["relative_logit_error"] < t["max_relative_logit_error"] / 5
    assert report["confident_predictions"] >= 65 and report["confident_agreement"] == 1.0
    assert report["greedy_agreement"] >= 0.9 and len(report["free_run_first_divergence"]) == 4
    assert report["distinct_fp32_tokens"] > 64       # not a degenerate repeating sequence
    # a quantized graph of other weights is far outside every bound
    other = seeded_init(T3(cfg), seed=1)
    other_q = quantize_lm(export_graph(lm_spec(other, cfg, step=True), tmp_path), tmp_path / "other.int8.onnx")
    with pytest.raises(AssertionError, match="mean KL .* max KL .* relative logit error .* top-1 agreement 0.000"):
        verify_lm_int8(model, cfg, paths["t3_lm_step"], tmp_path / other_q["file"], steps=16)
    # tolerance_scale 0 (the export's failure-path switch) fails the real int8 graph too
    with pytest.raises(AssertionError, match="t3_lm_step int8 vs fp32"):
        verify_lm_int8(model, cfg, paths["t3_lm_step"], q, steps=4, thresholds=int8_thresholds(0))
