"""The ONNX Chatterbox stages chained in process against the eager torch baseline (the official loop).

Tiny seeded random-init bundle; both sides use the same weights (the eager side rebuilds them with
`RandomInit(ModelConfig.from_preset("tiny"), seed=0)` and checks their fingerprints against bundle.json).
Rows: 5 of different text lengths, two reference speakers (a mono 22.05 kHz wav and a stereo 44.1 kHz
flac) and one default-voice row; the long row is split into 3 text chunks.

Measured on the tiny bundle (CPU; ORT vs torch fp32):
  tokens: identical (greedy and temperature 0.8), per chunk;
  voice: prompt tokens and prompt mel identical; speaker embedding ~3e-8, x-vector ~2.3e-5 (values O(1));
  mel (CFM output, per chunk): max abs error ~1.5e-6 (values O(1));
  audio: max abs error ~3.4e-6 (peaks ~0.08; f0 ~150 Hz, so the sine source is exercised);
  a row alone (batch 1) vs in a batch of 4: identical tokens, audio difference 0.
The tolerances below leave a margin of about 10x. At full size, long chunks diverge more in the
vocoder: the torch reference rounds the sine phase's running sum to float32 (as released), the
runtime keeps it in float64 (sine source differs by ~3e-4 at 10 s, ~1.2e-3 at 40 s per chunk).
"""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from actors.bundle import load_bundle
from actors.chatterbox.cfm import CFM
from actors.chatterbox.columns import MEL_BINS, split_frames
from actors.chatterbox.conditioning import Conditioning
from actors.chatterbox.s3gen import S3GenEncoder
from actors.chatterbox.t3 import T3
from actors.chatterbox.vocoder import Vocoder
from actors.runner import run_local
from export.chatterbox.checkpoint import ModelConfig, RandomInit
from export.chatterbox.eager import EagerChatterbox

MAX_CHUNK_CHARS = 40
MAX_NEW_TOKENS = 30
AUDIO_ATOL = 5e-5
MEL_ATOL = 2e-5
EMBED_ATOL = {"t3_speaker_emb": 1e-5, "gen_xvector": 2e-4}
TEXTS = ["Hello there.",
         "A much longer sentence, with several words in it. And then a second one follows it here.",
         "Hi!",
         "Another one here to decode now.",
         "The default voice speaks this line."]
SEEDS = [11, 12, 13, 14, 15]
EXAGGERATION = [0.5, 0.7, 0.5, 0.3, 0.5]


def tones(seconds: float, sr: int, f0s: list[float], seed: int, channels: int = 1) -> np.ndarray:
    """Harmonic tones under a syllable-like envelope, amplitude-modulated by noise: [samples] or [samples, ch]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t) ** 2
    out = []
    for c in range(channels):
        x = sum(np.sin(2 * np.pi * f * (1 + 0.05 * c) * t + k) / (k + 1) for k, f in enumerate(f0s))
        out.append(0.2 * x * envelope * (1 + 0.3 * rng.standard_normal(len(t))))
    return (np.stack(out, axis=1) if channels > 1 else out[0]).astype(np.float32)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> list[str]:
    """Reference audio per row ("" = the bundle's default voice)."""
    root = tmp_path_factory.mktemp("cb-parity-refs")
    a, b = root / "a.wav", root / "b.flac"
    sf.write(a, tones(3.0, 22050, [140, 280, 420], 1), 22050)
    sf.write(b, tones(4.0, 44100, [210, 420, 630, 840], 2, channels=2), 44100)
    return [str(a), str(b), str(b), str(a), ""]


@pytest.fixture(scope="module")
def bundle(cb_tiny_bundle):
    return load_bundle(str(cb_tiny_bundle))


@pytest.fixture(scope="module")
def eager(bundle):
    model = EagerChatterbox(bundle, source=RandomInit(ModelConfig.from_preset("tiny"), seed=0), threads=1,
                            max_chunk_chars=MAX_CHUNK_CHARS)
    yield model
    model.close()


@pytest.fixture(scope="module")
def stages(bundle):
    return [Conditioning(bundle), T3(bundle, options={"max_chunk_chars": MAX_CHUNK_CHARS}), S3GenEncoder(bundle),
            CFM(bundle), Vocoder(bundle)]


def manifest_rows(references: list[str], temperature: float) -> dict[str, np.ndarray]:
    n = len(TEXTS)
    return {"id": np.array([f"r{i}" for i in range(n)], dtype=object), "text": np.array(TEXTS, dtype=object),
            "reference_audio": np.array(references, dtype=object), "seed": np.array(SEEDS, dtype=np.int64),
            "temperature": np.full(n, temperature), "max_new_tokens": np.full(n, MAX_NEW_TOKENS),
            "exaggeration": np.array(EXAGGERATION)}


@pytest.fixture(scope="module")
def runs(stages, references):
    """Memoized pipeline outputs per (temperature, batch_size, stages run)."""
    cache: dict[tuple, dict] = {}

    def get(temperature: float, batch_size: int, upto: int = len(stages)) -> dict:
        key = (temperature, batch_size, upto)
        if key not in cache:
            out = run_local(stages[:upto], manifest_rows(references, temperature), batch_size)
            assert list(out["status"]) == ["ok"] * len(TEXTS), list(out["error"])
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="module")
def baseline(eager, references):
    """Eager results per (temperature, row)."""
    cache: dict[tuple, object] = {}

    def get(temperature: float, i: int):
        if (temperature, i) not in cache:
            cache[temperature, i] = eager.synthesize(
                TEXTS[i], references[i] or None, seed=SEEDS[i],
                params={"temperature": temperature, "max_new_tokens": MAX_NEW_TOKENS,
                        "exaggeration": EXAGGERATION[i]})
        return cache[temperature, i]

    return get


def test_voices_match(stages, eager, references):
    """Conditioning stage (ONNX) vs our torch encoders on the same numpy features."""
    out = run_local(stages[:1], manifest_rows(references, 0.0), len(TEXTS))
    errors: dict[str, float] = {}
    for i, ref in enumerate(references):
        voice = eager.voice_from_audio(ref) if ref else eager.default_voice()
        assert out["voice_source"][i] in (("default",) if not ref else ("computed", "memory"))
        for name in ("t3_prompt_tokens", "gen_prompt_tokens"):
            np.testing.assert_array_equal(out[name][i], getattr(voice, name), err_msg=f"row {i} {name}")
        np.testing.assert_allclose(np.asarray(out["gen_prompt_mel"][i]).reshape(-1, MEL_BINS),
                                   voice.gen_prompt_mel, rtol=0, atol=1e-6)
        for name, atol in EMBED_ATOL.items():
            err = float(np.abs(out[name][i] - getattr(voice, name)).max())
            errors[name] = max(errors.get(name, 0.0), err)
            assert err <= atol, f"row {i} {name}: {err}"
    assert len(out["t3_prompt_tokens"][0]) != len(out["t3_prompt_tokens"][1])  # two different references
    print("voice max abs error:", errors)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_pipeline_matches_eager(runs, baseline, temperature):
    out = runs(temperature, 4)
    worst = 0.0
    for i in range(len(TEXTS)):
        ref = baseline(temperature, i)
        np.testing.assert_array_equal(out["speech_tokens"][i], ref.speech_tokens, err_msg=f"row {i}")
        assert out["sample_rate"][i] == ref.sample_rate
        audio = out["audio"][i]
        assert audio.shape == ref.audio.shape, f"row {i}"
        err = float(np.abs(audio - ref.audio).max())
        worst = max(worst, err)
        assert err <= AUDIO_ATOL, f"row {i}: audio max abs error {err}"
        assert np.abs(ref.audio).max() > 100 * AUDIO_ATOL   # the comparison is not vacuous
    assert len(baseline(temperature, 1).chunks) >= 2        # the long row was chunked
    print(f"temperature {temperature}: tokens identical, audio max abs error {worst:.2e}")


def test_mel_per_chunk_matches_eager(runs, baseline):
    """The CFM output (prompt frames dropped), chunk by chunk, before the vocoder."""
    out = runs(0.0, 4, upto=4)
    worst = 0.0
    for i in range(len(TEXTS)):
        ref = baseline(0.0, i)
        frames = np.asarray(out["mel_frames"][i])
        assert frames.tolist() == [2 * len(t) for t in ref.tokens], f"row {i}"
        for c, (mel, want) in enumerate(zip(split_frames(out["mel"][i], frames), ref.mels)):
            err = float(np.abs(mel - want).max())
            worst = max(worst, err)
            assert err <= MEL_ATOL, f"row {i} chunk {c}: mel max abs error {err}"
    print(f"mel max abs error {worst:.2e}")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_row_alone_equals_row_in_batch(runs, temperature):
    alone, batched = runs(temperature, 1), runs(temperature, 4)
    for i in range(len(TEXTS)):
        np.testing.assert_array_equal(alone["speech_tokens"][i], batched["speech_tokens"][i], err_msg=f"row {i}")
        np.testing.assert_allclose(alone["audio"][i], batched["audio"][i], rtol=0, atol=1e-6, err_msg=f"row {i}")


def test_eager_from_source_alone(bundle, baseline):
    """Without a bundle the weight source gives the tokenizer and the default voice: same result."""
    model = EagerChatterbox(source=RandomInit(ModelConfig.from_preset("tiny"), seed=0), threads=1,
                            max_chunk_chars=MAX_CHUNK_CHARS)
    try:
        i = TEXTS.index("The default voice speaks this line.")
        got = model.synthesize(TEXTS[i], seed=SEEDS[i], params={"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS,
                                                               "exaggeration": EXAGGERATION[i]})
        want = baseline(0.0, i)
        np.testing.assert_array_equal(got.speech_tokens, want.speech_tokens)
        np.testing.assert_array_equal(got.audio, want.audio)
        assert set(got.seconds) == {"conditioning", "t3", "s3gen", "cfm", "hift", "total"}
        assert got.t3_steps >= len(got.speech_tokens)     # one LM call per generated id
    finally:
        model.close()
