"""The VITS family end to end without Ray: Piper import, bundle checks, stage, local runner."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from actors.backends import Backend
from actors.bundle import load_bundle
from actors.errors import BundleError
from actors.runner import run_local
from actors.vits import VitsStage
from actors.vits.piper import ATOL, import_piper_voice
from export.vits import main as export_main


def columns(**cols):
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


@pytest.fixture(scope="module")
def stage(default_bundle):
    return VitsStage(load_bundle(str(default_bundle)), backend=Backend(threads=2),
                     options={"sentence_silence_s": 0.1})


def test_default_bundle_manifest_and_verification(default_bundle):
    manifest = json.loads((default_bundle / "bundle.json").read_text())
    assert manifest["format_version"] == 1 and manifest["family"] == "vits"
    graph = manifest["graphs"]["vits"]
    assert graph["inputs"] == ["input", "input_lengths", "scales"]
    assert graph["outputs"] == ["output", "output_lengths"]
    assert graph["dynamic_axes"]["input"] == {"0": "batch_size", "1": "phonemes"}
    assert len(graph["sha256"]) == 64 and manifest["source"]["files"]
    check = manifest["verification"]
    assert check["batch_sizes"][1] >= 4 and len(set(check["row_lengths"])) >= 4
    assert check["max_abs_error"] <= check["atol"] == ATOL
    assert check["deterministic_at_zero_noise"]


def test_corrupt_and_missing_files_are_named(default_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(default_bundle, copy)
    with open(copy / "voice.json", "a") as f:
        f.write(" ")
    with pytest.raises(BundleError, match="voice.json is corrupt"):
        load_bundle(str(copy))
    (copy / "voice.json").unlink()
    with pytest.raises(BundleError, match="missing file voice.json"):
        load_bundle(str(copy))
    (copy / "bundle.json").unlink()
    with pytest.raises(BundleError, match="missing file bundle.json"):
        load_bundle(str(copy))


def test_export_cli_reports_missing_voice(tmp_path, capsys):
    assert export_main(["--model", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "b")]) == 2
    assert "nope.onnx" in capsys.readouterr().err


def test_import_rejects_a_graph_that_is_not_vits(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    (tmp_path / "m.onnx.json").write_text(json.dumps({"audio": {"sample_rate": 16000}}))
    with pytest.raises(BundleError, match="not a VITS"):
        import_piper_voice(tmp_path / "m.onnx", tmp_path / "m.onnx.json", tmp_path / "out")


def test_zero_noise_is_deterministic_and_batching_does_not_change_rows(stage):
    texts = ["Yes.", "A somewhat longer sentence to speak.", "Short one.", "The longest sentence of them all, by a wide margin indeed."]
    cols = columns(id=["a", "b", "c", "d"], text=texts, noise_scale=[0.0] * 4, noise_w=[0.0] * 4)
    together = run_local([stage], cols, batch_size=4)
    again = run_local([stage], cols, batch_size=4)
    alone = run_local([stage], cols, batch_size=1)
    assert list(together["status"]) == ["ok"] * 4
    for a, b, c in zip(together["audio"], again["audio"], alone["audio"]):
        assert np.array_equal(a, b)
        assert a.shape == c.shape and np.abs(a - c).max() <= ATOL
    durations = [len(a) for a in together["audio"]]
    assert durations[0] < durations[2] < durations[1] < durations[3]


def test_bad_rows_fail_alone_with_clear_messages(stage):
    cols = columns(id=["ok", "empty", "blank", "long", "spk", "scale", "nan"],
                   text=["Fine.", "", "   \n ", "word " * 2000, "Hi.", "Hi.", None],
                   speaker_id=[float("nan"), None, None, None, "bob", None, None],
                   length_scale=[None, None, None, None, None, 50.0, None])
    out = run_local([stage], cols, batch_size=7)
    assert list(out["status"]) == ["ok", "error", "error", "error", "error", "error", "error"]
    errors = list(out["error"])
    assert errors[1] == errors[2] == errors[6] == "empty text"
    assert "over the limit of 5000" in errors[3]
    assert "unknown speaker 'bob'" in errors[4]
    assert "length_scale=50 is out of range (must be <= 10)" in errors[5]
    assert len(out["audio"][0]) > 0.3 * stage.sample_rate and all(len(a) == 0 for a in out["audio"][1:])


def test_long_text_is_split_and_joined_in_order(stage):
    first, second = "The first sentence comes first.", "Then a second, rather different sentence follows it."
    one = run_local([stage], columns(id=["x", "y"], text=[first, second], noise_scale=[0.0] * 2, noise_w=[0.0] * 2), 2)
    both = run_local([stage], columns(id=["z"], text=[f"{first} {second}"], noise_scale=[0.0], noise_w=[0.0]), 1)
    a, b = one["audio"]
    gap = int(0.1 * stage.sample_rate)
    joined = both["audio"][0]
    assert len(joined) == len(a) + gap + len(b)
    assert np.abs(joined[:len(a)] - a).max() <= ATOL
    assert np.abs(joined[len(a) + gap:] - b).max() <= ATOL
    assert not joined[len(a):len(a) + gap].any()


def _transcribe(audio: np.ndarray, sample_rate: int) -> str:
    from pocketsphinx import Decoder

    n = int(len(audio) * 16000 / sample_rate)
    pcm = np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio)
    decoder = Decoder(samprate=16000, loglevel="FATAL")
    decoder.start_utt()
    decoder.process_raw((np.clip(pcm, -1, 1) * 32767).astype(np.int16).tobytes(), full_utt=True)
    decoder.end_utt()
    return decoder.hyp().hypstr if decoder.hyp() else ""


def test_speech_is_intelligible_to_an_offline_recognizer(stage):
    """pocketsphinx (its English model ships in the wheel) must recognize most words; noise must not pass."""
    import jiwer

    refs = ["did you hear every word clearly", "the cat sat on the mat", "please call me tomorrow morning"]
    out = run_local([stage], columns(id=["a", "b", "c"], text=[r.capitalize() + "." for r in refs]), 3)
    wer = np.mean([jiwer.wer(r, _transcribe(a, stage.sample_rate)) for r, a in zip(refs, out["audio"])])
    assert wer <= 0.5, wer
    noise = np.random.default_rng(0).standard_normal(stage.sample_rate * 2).astype(np.float32) * 0.1
    assert jiwer.wer(refs[0], _transcribe(noise, stage.sample_rate)) > 0.8
