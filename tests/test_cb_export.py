"""Chatterbox bundle export: CLI round trips, checkpoint reading and its errors, verification.

Tiny seeded models only (configs/chatterbox/tiny.yaml).  The export CLI is run as
a user would (`python -m export.chatterbox`, `python -m export.verify`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from actors.bundle import load_bundle, sha256_file, write_manifest
from actors.errors import BundleError
from actors.storage import StorageOptions
from export.chatterbox.bundle_writer import FP16_TOLERANCE, GRAPHS, INT8_LM
from export.chatterbox.lm_verify import INT8_THRESHOLDS
from export.chatterbox.checkpoint import (COMPONENTS, T3_WRAP_PREFIX, Checkpoint, CheckpointError, ModelConfig,
                                          RandomInit, weights_fingerprint, write_official_layout)

REPO = Path(__file__).resolve().parents[1]

# The graph contract (docs/architecture.md, "the graph contract"); t3_lm's KV names are checked separately.
CONTRACT = {
    "ve": (["mels"], ["embeds"]),
    "campplus": (["fbank"], ["xvector"]),
    "s3tokenizer": (["mels", "mel_lengths"], ["tokens", "token_lengths"]),
    "t3_cond": (["speaker_emb", "prompt_tokens", "exaggeration"], ["cond_embeds"]),
    "t3_text_embed": (["text_tokens"], ["text_embeds"]),
    "t3_speech_embed": (["speech_tokens", "positions"], ["speech_embeds"]),
    "s3gen_encoder": (["tokens", "token_lengths", "xvector"], ["mu", "mel_lengths", "spks"]),
    "cfm_estimator": (["x", "mask", "mu", "t", "spks", "cond"], ["velocity"]),
    "hift_f0": (["mel"], ["f0"]),
    "hift_decoder": (["mel", "sine_waves"], ["magnitude", "phase"]),
}


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli("export.chatterbox", "--threads", "2", "--quiet", *args)


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cb") / "tiny"
    proc = export_cli("--random-init", "--config", "tiny", "--seed", "0", "--out", str(out))  # int8 LM: the default
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["bundle"] == str(out) and summary["source"] == "random-init"
    return out


@pytest.fixture(scope="module")
def manifest(bundle) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_cfg) -> Path:
    """An official-layout checkpoint holding the same weights as the seed-0 random-init bundle."""
    return write_official_layout(RandomInit(tiny_cfg, seed=0, preset="tiny"), tmp_path_factory.mktemp("ckpt"))


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- the bundle


def test_manifest_follows_the_contract(bundle, manifest):
    assert manifest["format_version"] == 1
    assert manifest["family"] == "chatterbox" and manifest["sample_rate"] == 24000
    assert manifest["dtype"] == "fp32"
    assert sorted(manifest["graphs"]) == sorted([*GRAPHS, INT8_LM])
    assert set(GRAPHS) == set(CONTRACT) | {"t3_lm", "t3_lm_step"}
    layers = manifest["model"]["config"]["t3"]["num_layers"]
    for name, entry in manifest["graphs"].items():
        path = bundle / entry["file"]
        assert sha256_file(path) == entry["sha256"], name
        graph = onnx.load(str(path)).graph
        inputs = [i.name for i in graph.input]
        outputs = [o.name for o in graph.output]
        assert entry["inputs"] == inputs and entry["outputs"] == outputs, name
        if name in CONTRACT:
            assert (inputs, outputs) == CONTRACT[name]
        else:       # t3_lm (the whole cache out), t3_lm_step and its int8 variant (the new positions out)
            kv = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
            assert inputs == ["inputs_embeds", "attention_mask", "position_ids", *kv]
            out = "present" if name == "t3_lm" else "new"
            assert outputs == ["logits", *[f"{out}.{i}.{k}" for i in range(layers) for k in ("key", "value")]]
        for value in graph.input:
            assert value.type.tensor_type.shape.dim[0].dim_param == "batch", (name, value.name)
            assert entry["dynamic_axes"][value.name]["0"] == "batch"
    int8 = manifest["graphs"][INT8_LM]
    assert INT8_LM == "t3_lm_step_int8" and int8["file"] == "t3_lm_step.int8.onnx"
    assert (int8["dtype"], int8["reference_graph"], int8["component"]) == ("int8-dynamic", "t3_lm_step", "t3")
    assert int8["quantization"]["op"] == "DynamicQuantizeMatMul"
    assert int8["quantization"]["quantized_matmuls"] == 7 * (layers - 1)   # all but layer 0 and the head
    assert int8["quantization"]["fp32_matmuls"][-1] == "/speech_head/MatMul"
    ops = {n.op_type for n in onnx.load(str(bundle / int8["file"])).graph.node}
    assert "DynamicQuantizeMatMul" in ops
    assert manifest["generation"] == {
        "t3": {"temperature": 0.8, "cfg_weight": 0.5, "min_p": 0.05, "top_p": 1.0, "repetition_penalty": 1.2,
               "exaggeration": 0.5, "max_new_tokens": 1000},
        "cfm": {"n_timesteps": 10, "t_scheduler": "cosine", "cfg_rate": 0.7}}
    assert manifest["model"]["tokens"]["start_speech"] == 6561
    assert manifest["model"]["t3"]["cond_len"] == 34
    src = manifest["source"]
    assert (src["kind"], src["preset"], src["seed"]) == ("random-init", "tiny", 0)
    assert set(src["weights_sha256"]) == set(COMPONENTS)
    # what workers do
    loaded = load_bundle(str(bundle))
    assert loaded.family == "chatterbox" and loaded.graph("t3_lm").is_file()


def test_verification_report_covers_batches_and_padding(manifest):
    ver = manifest["verification"]
    assert ver["passed"] is True
    graphs = ver["graphs"]
    for name in GRAPHS:
        rep = graphs[name]
        assert rep["passed"] is True, name
        checks = {"t3_lm": lambda r: [r["right_padded_step"], r["left_padded_decode"]],
                  "t3_lm_step": lambda r: [r["right_padded_step"]]}.get(name, lambda r: [r])(rep)
        for r in checks:
            bs = r["batch_sizes"]
            assert bs[0] == 1 and bs[1] >= 3, name
            errs = r["max_abs_error"]
            assert any(k.startswith("padded_row_vs_alone/") for k in errs), name
            assert any(k.startswith("onnx_vs_torch_batch1/") for k in errs), name
            assert any(k.startswith("onnx_vs_torch_batched/") for k in errs), name
            tol = r["tolerance"]
            assert all(v <= tol["atol"] + 1e-12 or tol["rtol"] > 0 for v in errs.values()), name
    for name in ("s3gen_encoder", "cfm_estimator", "s3tokenizer", "hift_decoder", "t3_text_embed"):
        assert len(set(graphs[name]["lengths"])) >= 3, f"{name}: rows of different lengths"
    decode = graphs["t3_lm"]["left_padded_decode"]
    assert decode["decode_steps"] >= 8 and len(set(decode["prefill_lengths"])) == 3
    assert np.asarray(decode["greedy_tokens"]).shape == (3, decode["decode_steps"] + 1)
    assert graphs["t3_lm_step"]["runtime_cache_vs_t3_lm"]["decode_steps"] >= 8
    int8 = graphs[INT8_LM]       # next-token distributions vs the fp32 step graph, bounds stated beside them
    assert int8["passed"] is True and int8["reference_graph"] == "t3_lm_step"
    assert int8["steps"] >= 50 and int8["rows"] >= 4 and int8["thresholds"] == INT8_THRESHOLDS
    t = int8["thresholds"]
    assert int8["kl_mean"] <= t["max_kl_mean"] and int8["kl_max"] <= t["max_kl_max"]
    assert int8["relative_logit_error"] <= t["max_relative_logit_error"]
    assert int8["confident_predictions"] >= t["min_confident_predictions"]
    assert int8["confident_agreement"] >= t["min_confident_agreement"]
    assert {"greedy_agreement", "free_run_first_divergence"} <= set(int8)


def test_text_tokenizer_and_default_voice_assets(bundle, manifest, tiny_cfg):
    from tokenizers import Tokenizer

    b = load_bundle(str(bundle))
    tok = Tokenizer.from_file(str(b.asset("text_tokenizer")))
    vocab = tok.get_vocab()
    assert (vocab["[START]"], vocab["[STOP]"], vocab["[SPACE]"]) == (255, 0, 2)
    assert tok.get_vocab_size() == 704
    ids = tok.encode("Hello world, this is voxray.".replace(" ", "[SPACE]")).ids
    assert 2 in ids and all(0 <= i < 704 for i in ids) and vocab["[UNK]"] not in ids
    voice = np.load(b.asset("default_voice"))
    assert set(voice.files) == set(manifest["assets"]["default_voice"]["keys"])
    assert voice["t3_speaker_emb"].shape == (1, 256)
    assert voice["gen_prompt_feat"].shape[1] == 2 * voice["gen_prompt_token"].shape[1]


def test_export_verify_cli(bundle):
    proc = run_cli("export.verify", str(bundle), "--threads", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["passed"] is True
    assert set(report["graphs"]) == {*GRAPHS, INT8_LM}


def test_export_verify_catches_a_wrong_graph(bundle, tmp_path, tiny_cfg):
    """A graph of other weights, with its hash updated so that loading succeeds, fails verification."""
    from export.chatterbox import hift
    from export.chatterbox.graph_io import export_graph

    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    other = RandomInit(tiny_cfg, seed=1).load("mel2wav")
    spec = next(s for s in hift.graph_specs(other) if s.name == "hift_f0")
    export_graph(spec, tmp_path)
    shutil.copyfile(tmp_path / "hift_f0.onnx", copy / "hift_f0.onnx")
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["graphs"]["hift_f0"]["sha256"] = sha256_file(copy / "hift_f0.onnx")
    write_manifest(copy, manifest)
    proc = run_cli("export.verify", str(copy), "--threads", "2", "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "hift_f0" in proc.stderr


def test_export_fails_when_a_tolerance_is_exceeded(tmp_path):
    out = tmp_path / "never"
    proc = export_cli("--random-init", "--config", "tiny", "--tolerance-scale", "0", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("error: verification failed: ve:")
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_fp16_bundle_with_external_data(tmp_path):
    """fp16 graphs (fp32 IO) verified against the fp32 torch modules; a low external-data threshold
    puts the larger graphs' weights in `<graph>.onnx.data`, hashed in bundle.json."""
    out = tmp_path / "fp16"
    proc = export_cli("--random-init", "--config", "tiny", "--dtype", "fp16", "--out", str(out),
                      "--external-data-threshold", "1000000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["dtype"] == "fp16" and INT8_LM not in manifest["graphs"]     # int8 LM: fp32 bundles only
    external = {n: e["external_data"] for n, e in manifest["graphs"].items() if "external_data" in e}
    assert "t3_cond" in external and "ve" not in external
    assert external["t3_cond"] == {"t3_cond.onnx.data": sha256_file(out / "t3_cond.onnx.data")}
    load_bundle(str(out))
    with open(out / "t3_cond.onnx.data", "r+b") as f:
        f.write(b"\xff\xff")
    with pytest.raises(BundleError, match="t3_cond.onnx.data is corrupt"):
        load_bundle(str(out))
    for name in GRAPHS:
        entry = manifest["graphs"][name]
        model = onnx.load(str(out / entry["file"]))
        halves = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
        io = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
        assert onnx.TensorProto.FLOAT16 not in io, f"{name}: IO stays fp32"
        rep = manifest["verification"]["graphs"][name]
        if name in ("s3tokenizer", "campplus"):
            assert entry["dtype"] == "float32" and halves == 0
        else:
            assert entry["dtype"] == "float16" and halves > 0, name
            assert rep["tolerance"] == {"atol": FP16_TOLERANCE[name].atol, "rtol": FP16_TOLERANCE[name].rtol}
    assert manifest["verification"]["graphs"]["t3_lm"]["left_padded_decode"]["decode_steps"] >= 8


def test_large_graph_weights_go_to_one_external_file(tmp_path, tiny_cfg):
    """The fp32 path for graphs over the threshold (the full-size LM): one data file, still verifying."""
    from export.chatterbox import hift
    from export.chatterbox.bundle_writer import _write_graph
    from export.chatterbox.graph_io import verify_graph

    spec = next(s for s in hift.graph_specs(RandomInit(tiny_cfg, seed=0).load("mel2wav"))
                if s.name == "hift_decoder")
    file, external, _ = _write_graph(spec, tmp_path, "float32", lambda m: None, external_bytes=100_000)
    assert (file, external) == ("hift_decoder.onnx", ["hift_decoder.onnx.data"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hift_decoder.onnx", "hift_decoder.onnx.data"]
    assert (tmp_path / file).stat().st_size < (tmp_path / external[0]).stat().st_size
    verify_graph(spec, tmp_path / file)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_export_gives_the_same_graphs(bundle, manifest, tiny_ckpt, tmp_path):
    out = tmp_path / "from_ckpt"
    proc = export_cli("--checkpoint", str(tiny_ckpt), "--config", "tiny", "--quantize-lm", "none", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out / "bundle.json").read_text())
    assert INT8_LM not in got["graphs"] and not (out / "t3_lm_step.int8.onnx").exists()   # opted out
    for name in GRAPHS:
        assert got["graphs"][name]["sha256"] == manifest["graphs"][name]["sha256"], name
    src = got["source"]
    assert src["kind"] == "checkpoint" and src["location"] == str(tiny_ckpt.resolve())
    assert src["weights_sha256"] == manifest["source"]["weights_sha256"]
    for name in ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json", "conds.pt"):
        assert src["files"][name] == sha256_file(tiny_ckpt / name)
    a, b = np.load(out / "default_voice.npz"), np.load(bundle / "default_voice.npz")
    assert set(a.files) == set(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    # re-verification rebuilds the torch modules from the recorded checkpoint location
    proc = run_cli("export.verify", str(out), "--threads", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_export_verify_checkpoint_override(bundle, tiny_ckpt, tiny_cfg, tmp_path):
    """--checkpoint rebuilds the torch side from another copy; weights must be the exported ones."""
    proc = run_cli("export.verify", str(bundle), "--checkpoint", str(tiny_ckpt), "--threads", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    other = write_official_layout(RandomInit(tiny_cfg, seed=1), tmp_path / "seed1")
    proc = run_cli("export.verify", str(bundle), "--checkpoint", str(other), "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].startswith("error: rebuilt ve weights differ from the ones exported")


def test_checkpoint_from_s3_prefix(tiny_ckpt, tiny_cfg, s3_server, s3_client):
    for f in tiny_ckpt.iterdir():
        s3_client.upload_file(str(f), s3_server["bucket"], f"ckpt/{f.name}")
    storage = StorageOptions(endpoint_url=s3_server["endpoint"], access_key=s3_server["access_key"],
                             secret_key=s3_server["secret_key"])
    ckpt = Checkpoint(f"s3://{s3_server['bucket']}/ckpt", tiny_cfg, storage=storage)
    try:
        ckpt.check()
        local = Checkpoint(str(tiny_ckpt), tiny_cfg)
        for comp in ("ve", "t3", "mel2wav"):
            assert weights_fingerprint(ckpt.load(comp)) == weights_fingerprint(local.load(comp))
        files = ckpt.describe()["files"]
        assert files["s3gen.safetensors"] == sha256_file(tiny_ckpt / "s3gen.safetensors")
    finally:
        ckpt.close()
    missing = Checkpoint(f"s3://{s3_server['bucket']}/nothing-here", tiny_cfg, storage=storage)
    with pytest.raises(CheckpointError, match="missing file ve.safetensors"):
        missing.check()


def test_wrapped_t3_variants_load(tiny_ckpt, tiny_cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    want = weights_fingerprint(Checkpoint(str(tiny_ckpt), tiny_cfg).load("t3"))
    sd = load_file(str(tiny_ckpt / "t3_cfg.safetensors"))
    # (a) the ["model"][0] wrapper flattened into key prefixes
    a = _copy_ckpt(tiny_ckpt, tmp_path / "a")
    save_file({T3_WRAP_PREFIX + k: v for k, v in sd.items()}, str(a / "t3_cfg.safetensors"))
    ck = Checkpoint(str(a), tiny_cfg)
    assert weights_fingerprint(ck.load("t3")) == want
    assert "model.0." in ck.describe()["layouts"]["t3_cfg.safetensors"]
    # (b) a torch pickle {"model": [state_dict]} as t3_cfg.pt (no .safetensors), stored in fp16
    b = _copy_ckpt(tiny_ckpt, tmp_path / "b")
    (b / "t3_cfg.safetensors").unlink()
    torch.save({"model": [{k: v.half() if v.is_floating_point() else v for k, v in sd.items()}]}, b / "t3_cfg.pt")
    ck = Checkpoint(str(b), tiny_cfg)
    ck.check()
    model = ck.load("t3")
    assert model.speech_head.weight.dtype == torch.float32
    torch.testing.assert_close(model.speech_head.weight, sd["speech_head.weight"].half().float())
    assert "t3_cfg.pt" in ck.describe()["files"]
    # (c) the same pickle under the .safetensors name
    c = _copy_ckpt(tiny_ckpt, tmp_path / "c")
    torch.save({"model": [sd]}, c / "t3_cfg.safetensors")
    assert weights_fingerprint(Checkpoint(str(c), tiny_cfg).load("t3")) == want


def _edit_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path))


BROKEN = {
    "missing file": (lambda d: (d / "s3gen.safetensors").unlink(),
                     "missing file s3gen.safetensors"),
    "corrupt file": (lambda d: (d / "ve.safetensors").write_bytes(b"\x00garbage" * 100),
                     "ve.safetensors is not a readable safetensors file"),
    "truncated file": (lambda d: (d / "t3_cfg.safetensors").write_bytes(
        (d / "t3_cfg.safetensors").read_bytes()[:5000]), "t3_cfg.safetensors is not a readable"),
    "wrong shape": (lambda d: _edit_safetensors(d / "ve.safetensors",
                                                lambda sd: sd.update({"proj.weight": torch.zeros(7, 32)})),
                    "ve.safetensors: 1 keys with the wrong shape: proj.weight (expected [256, 32], got [7, 32])"),
    "unexpected key": (lambda d: _edit_safetensors(d / "s3gen.safetensors",
                                                   lambda sd: sd.update({"flow.extra.weight": torch.zeros(2)})),
                       "s3gen.safetensors: 1 unexpected keys: flow.extra.weight"),
    "missing key": (lambda d: _edit_safetensors(d / "t3_cfg.safetensors",
                                                lambda sd: sd.pop("speech_head.weight")),
                    "t3_cfg.safetensors: 1 missing keys: speech_head.weight"),
    "misnamed file": (lambda d: shutil.copyfile(d / "ve.safetensors", d / "t3_cfg.safetensors"),
                      "its keys are those of the official ve.safetensors, not t3_cfg.safetensors"),
    "bad tokenizer": (lambda d: (d / "tokenizer.json").write_text("{not json"),
                      "tokenizer.json is not a readable tokenizers JSON file"),
    "corrupt conds": (lambda d: (d / "conds.pt").write_bytes(b"nope"), "conds.pt is not a readable torch file"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_checkpoint_errors_name_the_problem(case, tiny_ckpt, tiny_cfg, tmp_path):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    breaker, message = BROKEN[case]
    breaker(d)
    with pytest.raises(CheckpointError) as err:
        Checkpoint(str(d), tiny_cfg).check()
    assert message in str(err.value)


def test_cli_reports_checkpoint_errors(tiny_ckpt, tmp_path):
    d = _copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    (d / "t3_cfg.safetensors").unlink()
    out = tmp_path / "out"
    proc = export_cli("--checkpoint", str(d), "--config", "tiny", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: checkpoint {d.resolve()}: missing file t3_cfg.safetensors"
    assert not out.exists()
    # a full-size export of a tiny checkpoint names the shape mismatch
    proc = export_cli("--checkpoint", str(tiny_ckpt), "--out", str(out))
    assert proc.returncode == 2 and "ve.safetensors" in proc.stderr and "wrong shape" in proc.stderr
    assert "it holds a model of other sizes" in proc.stderr
