"""The Chatterbox conditioning stage: reference audio → voice columns, against the torch modules."""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch

from actors.audio import AudioDecodeError, decode_audio
from actors.bundle import load_bundle
from actors.chatterbox import columns
from actors.chatterbox.conditioning import (Conditioning, ReferenceAudioError, ReferenceFeatures,
                                            bundle_fingerprint, reference_features)
from actors.chatterbox.voice import Voice, voice_columns
from actors.dsp import resample, s3gen_mel, trim_silence, ve_mel, ve_partials
from actors.errors import ConfigError
from export.chatterbox import features_ref
from export.chatterbox.checkpoint import ModelConfig, RandomInit, weights_fingerprint
from tests.test_dsp import speech_like

GRAPH_COMPONENT = {"ve": "ve", "campplus": "speaker_encoder", "s3tokenizer": "tokenizer"}


@pytest.fixture(scope="module")
def bundle(cb_tiny_bundle):
    return load_bundle(str(cb_tiny_bundle))


@pytest.fixture(scope="module")
def torch_modules(bundle):
    """The tiny bundle's modules in torch, checked to hold the bundle's weights."""
    source = RandomInit(ModelConfig.from_preset("tiny"), seed=0)
    # One thread: on the shared 2-core test machine, multi-threaded torch LSTMs spin for seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    modules = {graph: source.load(component) for graph, component in GRAPH_COMPONENT.items()}
    recorded = bundle.manifest["source"]["weights_sha256"]
    for graph, component in GRAPH_COMPONENT.items():
        assert weights_fingerprint(modules[graph]) == recorded[component], component
    yield modules
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage(bundle):
    return Conditioning(bundle)


def wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str | None = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def batch_of(refs: list[str | None], speakers: list[str | None] | None = None) -> dict[str, np.ndarray]:
    n = len(refs)
    return {"id": np.array([f"r{i}" for i in range(n)], dtype=object),
            "speaker_id": np.array(speakers or [None] * n, dtype=object),
            "reference_audio": np.array(refs, dtype=object)}


def voice_of(out: dict[str, np.ndarray], i: int) -> Voice:
    return Voice(**{k: out[k][i].reshape(-1, columns.MEL_BINS) if k == "gen_prompt_mel" else out[k][i]
                    for k in columns.VOICE})


# --------------------------------------------------------------------------- against torch


def torch_voice(modules, f, prompt_len: int = 150) -> dict[str, np.ndarray]:
    """The voice the torch modules give on features `f` (the official reductions, written in torch)."""
    with torch.no_grad():
        partials = modules["ve"](torch.from_numpy(f.ve_mels))
        mean = partials.mean(dim=0)
        xvector = modules["campplus"](torch.from_numpy(f.fbank)[None])[0]
        tokens = []
        for mels in (f.t3_mels, f.gen_mels):
            ids, n = modules["s3tokenizer"](torch.from_numpy(mels)[None], torch.tensor([mels.shape[1]]))
            tokens.append(ids[0, :int(n[0])].numpy())
    t = min(len(tokens[1]), len(f.gen_prompt_mel) // 2)
    return {"t3_speaker_emb": (mean / torch.linalg.norm(mean)).numpy(), "t3_prompt_tokens": tokens[0][:prompt_len],
            "gen_prompt_tokens": tokens[1][:t], "gen_prompt_mel": f.gen_prompt_mel[:2 * t],
            "gen_xvector": xvector.numpy()}


def assert_voice_close(voice: Voice, want: dict[str, np.ndarray], token_agreement: float = 1.0) -> None:
    # unit-norm embedding through the LSTM: ORT vs torch measured <= 4e-8
    np.testing.assert_allclose(voice.t3_speaker_emb, want["t3_speaker_emb"], rtol=0, atol=1e-5)
    # x-vector (random tiny CAMPPlus: values up to ~150): ORT vs torch measured <= 2e-4, 1e-6 relative
    np.testing.assert_allclose(voice.gen_xvector, want["gen_xvector"], rtol=1e-4, atol=1e-4)
    for name in ("t3_prompt_tokens", "gen_prompt_tokens"):
        got = getattr(voice, name)
        assert got.shape == want[name].shape, name
        assert np.mean(got == want[name]) >= token_agreement, name
    np.testing.assert_allclose(voice.gen_prompt_mel, want["gen_prompt_mel"], rtol=0, atol=1e-3)


def test_voice_matches_torch_modules_on_the_same_features(stage, torch_modules, tmp_path):
    x24 = speech_like(12.0, seed=1)  # past the 10 s S3Gen prompt and the 6 s T3 prompt
    path = tmp_path / "ref.wav"
    path.write_bytes(wav_bytes(x24, 24000))  # float WAV at 24 kHz: the stage sees exactly x24
    out = stage(batch_of([str(path)], ["alice"]))
    assert list(out["status"]) == ["ok"], out["error"]
    voice = voice_of(out, 0)
    f = reference_features(x24)
    assert_voice_close(voice, torch_voice(torch_modules, f))
    # sizes of the official path: 6 s → 150 T3 tokens; 10 s → 250 S3Gen tokens and 500 mel frames
    assert len(voice.t3_prompt_tokens) == 150 and len(voice.gen_prompt_tokens) == 250
    assert voice.gen_prompt_mel.shape == (500, 80) and f.gen_mels.shape == (128, 1000)
    assert abs(np.linalg.norm(voice.t3_speaker_emb) - 1) < 1e-5
    assert out["voice"][0] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_voice_matches_the_official_feature_path(stage, torch_modules, tmp_path):
    """Features from librosa and the torch references (not actors.dsp), as the official code computes them."""
    x24 = speech_like(7.3, seed=2, lead=0.6)  # a length that is no multiple of 40 ms
    path = tmp_path / "ref.flac"
    path.write_bytes(wav_bytes(x24, 24000, "FLAC", "PCM_24"))
    wav24, _ = librosa.load(path, sr=24000)
    wav16 = librosa.resample(wav24, orig_sr=24000, target_sr=16000)
    trimmed, _ = librosa.effects.trim(wav16, top_db=20)
    spec = librosa.stft(trimmed, n_fft=400, hop_length=160, center=True, pad_mode="reflect")
    ve_mels = ve_partials((librosa.filters.mel(sr=16000, n_fft=400, n_mels=40, fmax=8000) @ np.abs(spec) ** 2).T)
    prompt24 = torch.from_numpy(wav24[:240000])
    prompt16 = features_ref.resample_sinc_ref(prompt24, 24000, 16000)
    fbank = features_ref.kaldi_fbank_ref(prompt16)
    tok = torch_modules["s3tokenizer"]
    f = ReferenceFeatures(
        ve_mels=ve_mels.astype(np.float32),
        fbank=(fbank - fbank.mean(0, keepdim=True)).numpy(),
        t3_mels=features_ref.s3tokenizer_log_mel_ref(tok, torch.from_numpy(wav16[:96000]))[:, :600].numpy(),
        gen_mels=features_ref.s3tokenizer_log_mel_ref(tok, prompt16).numpy(),
        gen_prompt_mel=features_ref.s3gen_mel_ref(prompt24).numpy(), speech_seconds=len(trimmed) / 16000)
    out = stage(batch_of([str(path)]))
    assert list(out["status"]) == ["ok"], out["error"]
    # features differ by float rounding only (tests/test_dsp.py); all tokens agreed on 4 references, but
    # near a rounding boundary of the FSQ a token may flip, so a few are allowed to
    voice = voice_of(out, 0)
    assert_voice_close(voice, torch_voice(torch_modules, f), token_agreement=0.97)
    # 8.3 s: 415 mel frames but 208 tokens (830 tokenizer frames): tokens cut to 207, the mel to 414
    assert len(voice.gen_prompt_tokens) == 207 and voice.gen_prompt_mel.shape == (414, 80)


def test_probe_feeds_run_every_graph(stage):
    for graph in stage.graphs:
        feeds = stage.probe_feeds(graph)
        assert sorted(feeds) == sorted(stage.sessions[graph].input_names)
        outputs = stage.sessions[graph].run(feeds)
        assert all(np.isfinite(o).all() for o in outputs)
    with pytest.raises(ConfigError, match="no probe inputs"):
        stage.probe_feeds("t3_lm")


# --------------------------------------------------------------------------- audio formats


def test_decode_audio_is_librosa_load(tmp_path):
    x = speech_like(2.0, sr=44100, seed=4)
    stereo = np.stack([x, 0.5 * x[::-1]], axis=1)
    cases = {"mono.wav": (x, 44100, "WAV", "PCM_16"), "stereo.wav": (stereo, 44100, "WAV", "FLOAT"),
             "s.flac": (stereo[:, :1], 44100, "FLAC", "PCM_24"), "s.ogg": (x, 44100, "OGG", "VORBIS"),
             "s.mp3": (x, 44100, "MP3", "MPEG_LAYER_III"), "low.wav": (x[::4], 11025, "WAV", "PCM_16")}
    for name, (data, sr, fmt, subtype) in cases.items():
        path = tmp_path / name
        path.write_bytes(wav_bytes(data, sr, fmt, subtype))
        samples, rate = decode_audio(path.read_bytes(), name)
        want, _ = librosa.load(path, sr=None)
        assert rate == sr and samples.dtype == np.float32 and np.array_equal(samples, want), name
        # the official load at 24 kHz = decode + actors.dsp.resample
        assert np.array_equal(resample(samples, rate, 24000), librosa.load(path, sr=24000)[0]), name
    both, _ = decode_audio((tmp_path / "stereo.wav").read_bytes(), "stereo.wav", mono=False)
    assert both.shape == stereo.shape
    capped, rate = decode_audio((tmp_path / "mono.wav").read_bytes(), "mono.wav", max_seconds=0.5)
    assert len(capped) == rate // 2
    for data, reason in [(b"", "empty"), (b"RIFF not really a wav" * 10, "cannot decode audio"),
                         (wav_bytes(np.zeros(0, np.float32), 16000), "no audio samples")]:
        with pytest.raises(AudioDecodeError, match=f"where.wav: .*{reason}"):
            decode_audio(data, "where.wav")


def test_formats_and_rates_give_the_same_voice(stage, tmp_path):
    x24 = speech_like(4.0, seed=5)
    refs = {"mono24.wav": wav_bytes(x24, 24000),
            "stereo24.wav": wav_bytes(np.stack([x24, x24], axis=1), 24000),   # mean of equal channels
            "mono48.flac": wav_bytes(resample(x24, 24000, 48000), 48000, "FLAC", "PCM_24"),
            "mono16.ogg": wav_bytes(resample(x24, 24000, 16000), 16000, "OGG", "VORBIS"),
            "mono22.mp3": wav_bytes(resample(x24, 24000, 22050), 22050, "MP3", "MPEG_LAYER_III")}
    for name, data in refs.items():
        (tmp_path / name).write_bytes(data)
    out = stage(batch_of([str(tmp_path / name) for name in refs]))
    assert list(out["status"]) == ["ok"] * len(refs), out["error"]
    voices = [voice_of(out, i) for i in range(len(refs))]
    assert voices[0].equals(voices[1])  # stereo of two equal channels is the mono file
    for voice in voices[2:]:  # other rates and lossy codecs: the same speaker, close embeddings
        assert float(voice.t3_speaker_emb @ voices[0].t3_speaker_emb) > 0.95
        assert abs(len(voice.gen_prompt_tokens) - len(voices[0].gen_prompt_tokens)) <= 2


# --------------------------------------------------------------------------- cache


def count_computations(stage, monkeypatch) -> list[str]:
    calls: list[str] = []
    original = stage.voice_from_audio

    def counted(data, where):
        calls.append(where)
        return original(data, where)

    monkeypatch.setattr(stage, "voice_from_audio", counted)
    return calls


def test_cache_memory_and_store(bundle, tmp_path, monkeypatch):
    data = wav_bytes(speech_like(3.0, seed=6), 24000)
    a, b = tmp_path / "a.wav", tmp_path / "copy_of_a.wav"
    a.write_bytes(data)
    b.write_bytes(data)
    cache = str(tmp_path / "cache")
    first = Conditioning(bundle, cache=cache)
    calls = count_computations(first, monkeypatch)
    out = first(batch_of([str(a), str(b), str(a)]))
    assert list(out["status"]) == ["ok"] * 3
    assert list(out["voice_source"]) == ["computed", "memory", "memory"] and len(calls) == 1
    assert len(set(out["voice"])) == 1
    stored = tmp_path / "cache" / "voices" / bundle_fingerprint(bundle) / f"{out['voice'][0]}.npz"
    assert stored.is_file() and Voice.from_npz(stored.read_bytes(), "x").equals(voice_of(out, 0))
    again = first(batch_of([str(b)]))
    assert list(again["voice_source"]) == ["memory"] and len(calls) == 1
    # a second instance (another actor, a later run) finds the voice in the cache folder
    second = Conditioning(bundle, cache=cache)
    calls = count_computations(second, monkeypatch)
    out2 = second(batch_of([str(b), str(a)]))
    assert list(out2["voice_source"]) == ["store", "memory"] and calls == []
    assert voice_of(out2, 0).equals(voice_of(out, 0))
    # a corrupt stored voice is recomputed and replaced
    stored.write_bytes(b"not an npz")
    third = Conditioning(bundle, cache=cache, options={"memory_cache_size": 0})
    calls = count_computations(third, monkeypatch)
    assert list(third(batch_of([str(a)]))["voice_source"]) == ["computed"] and len(calls) == 1
    assert Voice.from_npz(stored.read_bytes(), "x").equals(voice_of(out, 0))
    # without memory and store every batch computes again
    bare = Conditioning(bundle, options={"memory_cache_size": 0})
    calls = count_computations(bare, monkeypatch)
    for _ in range(2):
        assert list(bare(batch_of([str(a), str(b)]))["voice_source"]) == ["computed", "memory"]
    assert len(calls) == 2


def test_memory_cache_is_bounded(bundle, tmp_path, monkeypatch):
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"{seed}.wav")
        paths[-1].write_bytes(wav_bytes(speech_like(2.0, seed=10 + seed), 24000))
    stage = Conditioning(bundle, options={"memory_cache_size": 2})
    calls = count_computations(stage, monkeypatch)
    stage(batch_of([str(p) for p in paths]))
    out = stage(batch_of([str(paths[2]), str(paths[0])]))  # 0 was the least recently used: dropped
    assert list(out["voice_source"]) == ["memory", "computed"] and len(calls) == 4


# --------------------------------------------------------------------------- default voice and failures


def test_rows_without_reference_use_the_default_voice(bundle, stage):
    with np.load(bundle.asset("default_voice")) as npz:
        want = dict(npz)
    out = stage(batch_of([None, "", np.nan], ["x", None, None]))
    assert list(out["status"]) == ["ok"] * 3
    assert list(out["voice"]) == ["default"] * 3 and list(out["voice_source"]) == ["default"] * 3
    voice = voice_of(out, 0)
    assert np.array_equal(voice.t3_speaker_emb, want["t3_speaker_emb"][0])
    assert np.array_equal(voice.t3_prompt_tokens, want["t3_cond_prompt_speech_tokens"][0])
    assert np.array_equal(voice.gen_prompt_tokens, want["gen_prompt_token"][0])
    assert np.array_equal(voice.gen_prompt_mel, want["gen_prompt_feat"][0])
    assert np.array_equal(voice.gen_xvector, want["gen_embedding"][0])


def test_bundle_without_default_voice(cb_tiny_bundle, tmp_path):
    copy = tmp_path / "no-default"
    shutil.copytree(cb_tiny_bundle, copy)
    manifest = json.loads((copy / "bundle.json").read_text())
    (copy / manifest["assets"].pop("default_voice")["file"]).unlink()
    (copy / "bundle.json").write_text(json.dumps(manifest))
    bundle = load_bundle(str(copy))
    assert Voice.default(bundle) is None
    ref = tmp_path / "ref.wav"
    ref.write_bytes(wav_bytes(speech_like(2.5, seed=7), 24000))
    out = Conditioning(bundle)(batch_of([None, str(ref)], ["bob", "carol"]))
    assert list(out["status"]) == ["error", "ok"]
    assert "no reference_audio (speaker 'bob')" in out["error"][0] and "no default voice" in out["error"][0]
    assert out["voice_source"][1] == "computed"


def test_bad_references_fail_only_their_rows(bundle, tmp_path, monkeypatch):
    refs = {
        "good.wav": wav_bytes(speech_like(3.0, seed=8), 24000),
        "garbage.wav": b"this is not audio" * 100,
        "silent.wav": wav_bytes(np.zeros(48000, np.float32), 24000),
        "quiet.wav": wav_bytes(speech_like(3.0, seed=8, peak=5e-4), 24000),     # about -63 dBFS peak
        "short.wav": wav_bytes(speech_like(1.0, seed=9, lead=1.0, tail=1.0), 24000),  # 3 s file, 1 s of sound
        "nan.wav": wav_bytes(np.full(48000, np.nan, np.float32), 24000),
    }
    for name, data in refs.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / name) for name in refs] + [str(tmp_path / "missing.wav"), str(tmp_path / "good.wav")]
    stage = Conditioning(bundle)
    calls = count_computations(stage, monkeypatch)
    out = stage(batch_of(uris, [f"s{i}" for i in range(len(uris))]))
    assert list(out["status"]) == ["ok"] + ["error"] * 6 + ["ok"]
    reasons = ["cannot decode audio", r"silent \(peak digital silence, below -60 dBFS\)",
               r"silent \(peak -6\d.\d dBFS, below -60 dBFS\)",
               r"holds 1.\d\d s of sound .* less than the minimum 1.6 s", "NaN or infinite", "cannot read it"]
    for i, reason in enumerate(reasons, start=1):
        error = out["error"][i]
        assert error.startswith(f"conditioning: reference audio '{uris[i]}' (speaker 's{i}'): "), error
        assert re.search(reason, error), error
        assert out["voice"][i] == "" and len(out["t3_speaker_emb"][i]) == 0
    # failures are remembered: a second batch decodes nothing again
    again = stage(batch_of(uris[1:3]))
    assert list(again["status"]) == ["error", "error"] and len(calls) == 6
    # a shorter minimum accepts the short reference
    lenient = Conditioning(bundle, options={"min_seconds": 0.5})
    assert list(lenient(batch_of([str(tmp_path / "short.wav")]))["status"]) == ["ok"]


def test_max_seconds_caps_what_the_voice_encoder_reads(bundle, tmp_path):
    x24 = speech_like(25.0, seed=11)
    path = tmp_path / "long.wav"
    path.write_bytes(wav_bytes(x24, 24000))
    capped = Conditioning(bundle, options={"max_seconds": 12})
    out = capped(batch_of([str(path)]))
    want = capped.voice_from_features(reference_features(x24[:12 * 24000]))
    assert voice_of(out, 0).equals(want)
    full = Conditioning(bundle)(batch_of([str(path)]))
    # the prompts (first 6 s and 10 s) are the same; the embedding averages over more partials
    assert np.array_equal(full["gen_prompt_tokens"][0], out["gen_prompt_tokens"][0])
    assert not np.array_equal(full["t3_speaker_emb"][0], out["t3_speaker_emb"][0])
    with pytest.raises(ConfigError, match="max_seconds"):
        Conditioning(bundle, options={"max_seconds": 5})
    with pytest.raises(ConfigError, match="min_seconds .* must be less than max_seconds"):
        Conditioning(bundle, options={"min_seconds": 20, "max_seconds": 15})


# --------------------------------------------------------------------------- the voice record


def test_voice_round_trip_and_checks():
    rng = np.random.default_rng(0)
    voice = Voice(t3_speaker_emb=rng.standard_normal(256), t3_prompt_tokens=np.arange(150),
                  gen_prompt_tokens=np.arange(7), gen_prompt_mel=rng.standard_normal((14, 80)),
                  gen_xvector=rng.standard_normal(192))
    assert voice.t3_speaker_emb.dtype == np.float32 and voice.gen_prompt_tokens.dtype == np.int64
    assert Voice.from_npz(voice.to_npz(), "v").equals(voice)
    with pytest.raises(ValueError, match="v.npz is not a voice file"):
        Voice.from_npz(b"junk", "v.npz")
    with pytest.raises(ValueError, match="2 × 7 prompt tokens"):
        Voice(**{**voice.__dict__, "gen_prompt_mel": np.zeros((15, 80))})
    cols = voice_columns([voice, None])
    assert set(cols) == set(columns.VOICE)
    assert cols["gen_prompt_mel"][0].shape == (14 * 80,) and cols["gen_prompt_mel"][1].shape == (0,)
    assert cols["t3_prompt_tokens"][1].dtype == np.int64


def test_reference_features_checks():
    x = speech_like(3.0, seed=12)
    f = reference_features(x)
    speech, _ = trim_silence(resample(x, 24000, 16000))
    assert np.array_equal(f.ve_mels, ve_partials(ve_mel(speech)))
    assert np.array_equal(f.gen_prompt_mel, s3gen_mel(x)) and abs(f.speech_seconds - len(speech) / 16000) < 1e-9
    with pytest.raises(ReferenceAudioError, match="less than the minimum 5 s"):
        reference_features(x, min_seconds=5)


def test_a_degenerate_embedding_fails_the_row(bundle, tmp_path):
    class ZeroVE:  # a VoiceEncoder whose rectified projection is all zero: no direction to normalise
        input_names, output_names = ["mels"], ["embeds"]

        def run(self, feeds, outputs=None):
            return [np.zeros((len(feeds["mels"]), 256), np.float32)]

    ref = tmp_path / "ref.wav"
    ref.write_bytes(wav_bytes(speech_like(2.5, seed=13), 24000))
    out = Conditioning(bundle, sessions={"ve": ZeroVE()})(batch_of([str(ref)]))
    assert out["status"][0] == "error" and "its voice is unusable (voice holds NaN" in out["error"][0]
