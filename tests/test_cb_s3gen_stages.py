"""Chatterbox S3Gen stages (s3gen_encoder → cfm → vocoder) on the tiny bundle, against the torch references."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from actors.backends import relative_error
from actors.bundle import load_bundle
from actors.chatterbox import columns
from actors.chatterbox.batching import length_groups
from actors.chatterbox.cfm import CFM, time_schedule
from actors.chatterbox.s3gen import S3GenEncoder
from actors.chatterbox.vocoder import (
    HiftParams, Vocoder, draw_sine_randomness, fade_in, sine_waves, spectrum_to_audio,
)
from actors.errors import ConfigError
from export.chatterbox import hift as export_hift
from export.chatterbox.cfm import solve_cfm_torch
from export.chatterbox.cfm import time_schedule as time_schedule_torch
from export.chatterbox.checkpoint import ModelConfig, RandomInit
from export.chatterbox.hift import fade_in_torch, istft_torch, sine_generator_torch, vocode_torch

# Chunk token counts per row. The default voice's prompt has 50 tokens, so chunks are 55..70 tokens
# long with the prompt: several padded calls. [9, 9] gives two chunks of equal frame count (one vocoder call).
CHUNKS = [[13, 7], [20], [5, 0], [9, 9]]
SR = 24000


class Counting:
    """A session that records the shapes of every call it passes on."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def run(self, feeds, outputs=None):
        self.calls.append({k: v.shape for k, v in feeds.items()})
        return self.inner.run(feeds, outputs)


def obj(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def take(batch: dict, rows: list[int]) -> dict:
    return {k: v[rows] for k, v in batch.items()}


@pytest.fixture(scope="module")
def bundle(cb_tiny_bundle):
    return load_bundle(str(cb_tiny_bundle))


@pytest.fixture(scope="module")
def voice(bundle):
    return dict(np.load(bundle.asset("default_voice")))


@pytest.fixture(scope="module")
def torch_modules():
    src = RandomInit(ModelConfig.from_preset("tiny"), seed=0)
    return {name: src.load(name).eval() for name in ("flow", "estimator", "mel2wav")}


@pytest.fixture(scope="module")
def stages(bundle):
    return S3GenEncoder(bundle), CFM(bundle), Vocoder(bundle)


def make_batch(voice, chunks: list[list[int]], seed: int = 1, seeds: list | None = None) -> dict:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(0, 6561, sum(c)).astype(np.int32) for c in chunks]
    n = len(chunks)
    batch = {
        "id": obj([f"row-{seed}-{i}" for i in range(n)]),
        "speech_tokens": obj(tokens),
        "chunk_tokens": obj([np.array(c, np.int64) for c in chunks]),
        "gen_prompt_tokens": obj([voice["gen_prompt_token"][0]] * n),
        "gen_xvector": obj([voice["gen_embedding"][0]] * n),
        "gen_prompt_mel": obj([voice["gen_prompt_feat"][0].reshape(-1)] * n),
    }
    if seeds is not None:
        batch["seed"] = obj(seeds)
    return batch


def run_chain(stages, batch: dict) -> list[dict]:
    outs = [batch]
    for stage in stages:
        outs.append(stage(outs[-1]))
    return outs[1:]


@pytest.fixture(scope="module")
def chain(stages, voice):
    batch = make_batch(voice, CHUNKS)
    return batch, run_chain(stages, batch)


def test_bundle_graphs_are_the_torch_modules(stages, torch_modules):
    """The torch modules rebuilt from the bundle's source hold the bundle's weights (probe inputs)."""
    encoder, cfm, vocoder = stages
    hift = torch_modules["mel2wav"]
    references = {
        "s3gen_encoder": (encoder, lambda f: torch_modules["flow"](*f.values())),
        "cfm_estimator": (cfm, lambda f: [torch_modules["estimator"](*f.values())]),
        "hift_f0": (vocoder, lambda f: [hift.f0_predictor(*f.values())]),
        "hift_decoder": (vocoder, lambda f: hift.decode_spectrum(*f.values(), stft="conv")),
    }
    for graph, (stage, reference) in references.items():
        feeds = stage.probe_feeds(graph)
        with torch.no_grad():
            want = [t.numpy() for t in reference({k: torch.from_numpy(v) for k, v in feeds.items()})]
        assert relative_error(want, stage.sessions[graph].run(feeds)) < 1e-5, graph


def test_encoder_equals_flow_per_chunk(chain, voice, torch_modules):
    batch, (enc, _, _) = chain
    assert set(enc) >= {"speech_tokens", "mu", "mu_frames", "spks", "time_s3gen_encoder_s"}
    assert not {"chunk_tokens", "gen_prompt_tokens", "gen_xvector"} & set(enc)
    assert list(enc["status"]) == ["ok"] * len(CHUNKS)
    prompt = voice["gen_prompt_token"][0]
    flow = torch_modules["flow"]
    worst = 0.0
    for i, counts in enumerate(CHUNKS):
        assert list(enc["mu_frames"][i]) == [2 * (len(prompt) + c) if c else 0 for c in counts]
        tokens = np.split(batch["speech_tokens"][i].astype(np.int64), np.cumsum(counts)[:-1])
        for c, mu in enumerate(columns.split_frames(enc["mu"][i], enc["mu_frames"][i])):
            if not counts[c]:
                continue
            ids = torch.from_numpy(np.concatenate([prompt, tokens[c]]))[None]
            with torch.no_grad():
                want, _, spks = flow(ids, torch.tensor([ids.shape[1]]), torch.from_numpy(voice["gen_embedding"]))
            worst = max(worst, np.abs(mu - want[0].numpy().T).max())
            assert np.abs(enc["spks"][i] - spks[0].numpy()).max() < 1e-5
    assert worst < 1e-4  # measured ~1e-6 (ONNX Runtime vs torch), |mu| up to ~3


def test_cfm_equals_torch_solver(chain, voice, torch_modules, bundle):
    batch, (enc, out, _) = chain
    assert not {"mu", "mu_frames", "spks", "gen_prompt_mel"} & set(out)
    assert np.abs(time_schedule(10, "cosine") - time_schedule_torch(10).numpy()).max() < 1e-7
    cfm_defaults = bundle.generation["cfm"]
    prompt_mel = voice["gen_prompt_feat"][0].T
    P = prompt_mel.shape[1]
    worst = 0.0
    for i, counts in enumerate(CHUNKS):
        assert list(out["mel_frames"][i]) == [2 * c for c in counts]
        seed = columns.row_seed(batch, i)
        mels = columns.split_frames(out["mel"][i], out["mel_frames"][i])
        for c, mu in enumerate(columns.split_frames(enc["mu"][i], enc["mu_frames"][i])):
            if not len(mu):
                continue
            F = len(mu)
            cond = np.zeros((1, 80, F), np.float32)
            cond[0, :, :P] = prompt_mel
            noise = columns.rng_for(seed, columns.CFM_STREAM, c).standard_normal((80, F)).astype(np.float32)
            x = solve_cfm_torch(torch_modules["estimator"], torch.from_numpy(mu.T[None].copy()),
                                torch.ones(1, 1, F), torch.from_numpy(enc["spks"][i][None]),
                                torch.from_numpy(cond), torch.from_numpy(noise[None]),
                                n_steps=cfm_defaults["n_timesteps"], cfg_rate=cfm_defaults["cfg_rate"])
            worst = max(worst, np.abs(mels[c] - x[0, :, P:].numpy().T).max())
    assert worst < 1e-4  # measured ~1e-6 after 10 steps, |mel| up to ~5


def test_vocoder_equals_vocode_torch_and_joins_chunks(chain, torch_modules):
    batch, (_, cfm_out, out) = chain
    assert list(out["sample_rate"]) == [SR] * len(CHUNKS) and out["sample_rate"].dtype == np.int32
    assert not {"mel", "mel_frames"} & set(out)
    gap = int(0.2 * SR)
    worst = 0.0
    for i, counts in enumerate(CHUNKS):
        seed = columns.row_seed(batch, i)
        parts = []
        for c, mel in enumerate(columns.split_frames(cfm_out["mel"][i], cfm_out["mel_frames"][i])):
            if not len(mel):
                continue
            phases, noise = draw_sine_randomness(columns.rng_for(seed, columns.HIFT_STREAM, c), 1,
                                                 len(mel) * 480)
            want = vocode_torch(torch_modules["mel2wav"], torch.from_numpy(mel.T[None].copy()), phases=phases,
                                noise=noise, fade_in=True)[0].numpy()
            parts.append(want)
        audio = out["audio"][i]
        assert audio.dtype == np.float32 and len(audio) == sum(map(len, parts)) + gap * (len(parts) - 1)
        start = 0
        for k, want in enumerate(parts):
            if k:
                assert not audio[start:start + gap].any()  # the silence between chunks
                start += gap
            worst = max(worst, np.abs(audio[start:start + len(want)] - want).max())
            assert not audio[start:start + 480].any() and np.abs(audio[start + 960:start + len(want)]).max() > 0
            start += len(want)
    assert worst < 1e-5  # measured ~1.3e-6 on audio of peak ~0.08


def test_rows_equal_rows_alone(stages, voice, bundle):
    """Padded calls (all units in one call) give each row what it gets alone."""
    wide = {"max_padding_ratio": 10, "max_batch_rows": 64}
    sessions = {g: Counting(s.sessions[g]) for s in stages for g in s.graphs}
    batched = [type(s)(bundle, options=wide if not isinstance(s, Vocoder) else None,
                       sessions={g: sessions[g] for g in s.graphs}) for s in stages]
    batch = make_batch(voice, CHUNKS, seed=5)
    outs = run_chain(batched, batch)
    enc_calls, cfm_calls = sessions["s3gen_encoder"].calls, sessions["cfm_estimator"].calls
    assert len(enc_calls) == 1 and enc_calls[0]["tokens"][0] == 6  # every non-empty chunk, padded
    assert len(cfm_calls) == 10 and cfm_calls[0]["x"][0] == 12      # 6 chunks, conditional + unconditional
    assert any(c["mel"][0] == 2 for c in sessions["hift_decoder"].calls)  # the [9, 9] chunks share a call
    for i in range(len(CHUNKS)):
        alone = run_chain(stages, take(batch, [i]))
        for stage_out, alone_out, key in zip(outs, alone, ("mu", "mel", "audio")):
            assert stage_out[key][i].shape == alone_out[key][0].shape
            assert np.abs(stage_out[key][i] - alone_out[key][0]).max() < 1e-5, (i, key)


def test_seeds(stages, voice):
    batch = make_batch(voice, [[6, 4], [6, 4], [6, 4], [6, 4]], seeds=[7, 7, 8, None])
    for k in ("speech_tokens", "chunk_tokens"):
        batch[k] = obj([batch[k][0]] * 4)
    audio = run_chain(stages, batch)[-1]["audio"]
    assert np.array_equal(audio[0], audio[1])
    assert np.abs(audio[0] - audio[2]).max() > 1e-3
    # no seed: derived from the id, so the same id gives the same audio in another batch
    again = run_chain(stages, take(batch, [3, 0]))[-1]["audio"]
    assert np.array_equal(again[0], audio[3]) and np.array_equal(again[1], audio[0])
    derived = dict(take(batch, [3]), seed=obj([columns.row_seed(batch, 3)]))
    assert np.array_equal(run_chain(stages, derived)[-1]["audio"][0], audio[3])


def test_failed_rows_do_not_affect_others(stages, voice, chain):
    encoder, cfm, vocoder = stages
    batch, (enc, cfm_out, voc) = chain
    bad = dict(batch)
    bad["chunk_tokens"] = obj([np.array([13, 6]), *batch["chunk_tokens"][1:]])
    bad["speech_tokens"] = obj([*batch["speech_tokens"][:2], np.array([1, 6561, 2, 3, 4], np.int32),
                                batch["speech_tokens"][3]])
    bad["chunk_tokens"][2] = np.array([5, 0])
    bad["status"] = obj(["ok", "ok", "ok", "error"])
    bad["error"] = obj(["", "", "", "t3: failed earlier"])
    out = encoder(bad)
    assert list(out["status"]) == ["error", "ok", "error", "error"]
    assert "do not add up to the 20 speech tokens" in out["error"][0]
    assert "ids outside [0, 6561): [6561]" in out["error"][2]
    assert out["error"][3] == "t3: failed earlier" and out["mu"][3].size == 0 and out["mu_frames"][3].size == 0
    assert np.array_equal(out["mu"][1], enc["mu"][1])

    bad = dict(enc)
    bad["mu_frames"] = obj([np.array([126, 113]), *enc["mu_frames"][1:]])
    bad["gen_prompt_mel"] = obj([*enc["gen_prompt_mel"][:2], enc["gen_prompt_mel"][2][:-80], enc["gen_prompt_mel"][3]])
    out = cfm(bad)
    assert list(out["status"]) == ["error", "ok", "error", "ok"]
    assert "mu holds 19200 values, its frame counts [126, 113] need 239 × 80" in out["error"][0]
    assert "the prompt mel has 99 frames" in out["error"][2]
    assert np.array_equal(out["mel"][3], cfm_out["mel"][3])

    bad = dict(cfm_out)
    bad["mel"] = obj([np.zeros(0, np.float32), cfm_out["mel"][1], cfm_out["mel"][2][:-1], cfm_out["mel"][3]])
    bad["mel_frames"] = obj([np.array([0, 0]), *cfm_out["mel_frames"][1:]])
    out = vocoder(bad)
    assert list(out["status"]) == ["error", "ok", "error", "ok"]
    assert out["error"][0] == "vocoder: no mel frames in any chunk: nothing to vocode"
    assert "mel holds 799 values" in out["error"][2]
    assert out["audio"][0].size == 0 and np.array_equal(out["audio"][3], voc["audio"][3])


def test_rows_without_tokens(stages, voice):
    out = stages[0](make_batch(voice, [[0, 0], [3]]))
    assert list(out["status"]) == ["error", "ok"]
    assert out["error"][0] == "s3gen_encoder: no speech tokens in any chunk (T3 generated nothing to speak)"


def test_options(bundle, stages):
    encoder, cfm, _ = stages
    for cls, options, text in ((CFM, {"n_timesteps": 0}, "n_timesteps"),
                               (Vocoder, {"chunk_silence": 1}, "chunk_silence"),
                               (S3GenEncoder, {"max_padding_ratio": 0.5}, "max_padding_ratio")):
        with pytest.raises(ConfigError, match=text):
            cls(bundle, options=options)
    assert cfm.cfg_rate == pytest.approx(0.7) and len(cfm.times) == 11  # the bundle's generation.cfm
    counting = Counting(cfm.sessions["cfm_estimator"])
    fast = CFM(bundle, options={"n_timesteps": 2, "cfg_rate": 0.0}, sessions={"cfm_estimator": counting})
    small_voice = {"gen_prompt_token": np.zeros((1, 4), np.int64), "gen_embedding": np.ones((1, 192), np.float32),
                   "gen_prompt_feat": np.zeros((1, 8, 80), np.float32)}
    enc = encoder(make_batch(small_voice, [[3]]))
    assert fast(enc)["status"][0] == "ok" and len(counting.calls) == 2
    out = Vocoder(bundle, options={"chunk_silence_s": 0.5}, sessions=stages[2].sessions)(
        {"id": obj(["a"]), "mel": obj([np.zeros(4 * 80, np.float32)]), "mel_frames": obj([np.array([2, 2])])})
    assert len(out["audio"][0]) == 4 * 480 + SR // 2


def test_length_groups():
    assert length_groups([5, 3, 4, 10, 3], max_rows=2, max_ratio=1.5) == [[1, 4], [2, 0], [3]]
    assert length_groups([2, 2, 3, 2], max_rows=8, max_ratio=1) == [[0, 1, 3], [2]]


def test_sine_generator_istft_and_fade_equal_torch(bundle):
    cfg = export_hift.HiFTConfig()
    params = HiftParams.of(bundle)
    assert export_hift.draw_sine_randomness is draw_sine_randomness
    # Ours sums the cycles in float64; the torch reference stores the running sum in float32,
    # which costs it up to ~6e-4 (of amplitude 0.1) after 10 s at 400 Hz × 9 harmonics.
    for frames, tol in ((50, 1e-4), (500, 1e-3)):
        f0 = np.random.default_rng(3).uniform(0, 400, (2, frames)).astype(np.float32)
        f0[:, ::7] = 0  # unvoiced frames
        phases, noise = draw_sine_randomness(np.random.default_rng(4), 2, frames * 480)
        got = sine_waves(f0, params, phases, noise)
        want = sine_generator_torch(torch.from_numpy(f0), cfg, phases=phases, noise=noise).numpy()
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.abs(got - want).max() < tol
    rng = np.random.default_rng(0)
    magnitude = np.exp(rng.normal(0, 2, (2, 9, 241))).astype(np.float32)  # some above the clip at 100
    phase = np.sin(rng.normal(0, 3, (2, 9, 241))).astype(np.float32)
    want = istft_torch(torch.from_numpy(magnitude), torch.from_numpy(phase), cfg).numpy()
    got = spectrum_to_audio(magnitude, phase, params)
    assert got.shape == want.shape == (2, 960) and np.abs(want).max() == pytest.approx(0.99)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(fade_in(SR) - fade_in_torch(torch.ones(960)).numpy()).max() < 1e-6


def test_actors_never_import_torch_or_export():
    code = ("import sys, actors.chatterbox.s3gen, actors.chatterbox.cfm, actors.chatterbox.vocoder; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'export')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def test_stages_run_on_openvino_at_reduced_precision(bundle):
    """OpenVINO names each output as the ONNX graph does (hift_f0's `f0` tensor has an internal name too);
    bf16 is checked against f32 on the probe inputs at load."""
    from actors.backends import Backend

    for cls in (S3GenEncoder, CFM, Vocoder):
        stage = cls(bundle, backend=Backend(engine="openvino", precision="bf16", tolerance=0.05))
        for graph, session in stage.sessions.items():
            assert session.output_names == tuple(bundle.manifest["graphs"][graph]["outputs"]), graph
        assert all(e < 0.05 for e in stage.precision_errors.values()), stage.precision_errors
