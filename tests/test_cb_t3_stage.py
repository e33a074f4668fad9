"""The T3 stage on the tiny bundle: text front end, sampling order, continuous batching, per-row seeds."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from actors.bundle import load_bundle
from actors.chatterbox.columns import rng_for
from actors.chatterbox.sampling import Sampler, SamplingParams
from actors.chatterbox.t3 import T3
from actors.chatterbox.text import chunk_text, punc_norm
from actors.errors import ConfigError

TEXTS = ["Hello there.", "A much longer sentence, with several words in it, to decode for a while.", "Hi!",
         "Another one here to decode now; it has a clause.", "five", "six is here"]


@pytest.fixture(scope="module")
def bundle(cb_tiny_bundle):
    return load_bundle(str(cb_tiny_bundle))


@pytest.fixture(scope="module")
def stage(bundle):
    return T3(bundle, options={"max_rows": 6, "prefill_rows": 4})


def rows(bundle, texts, **params) -> dict[str, np.ndarray]:
    voice = np.load(bundle.asset("default_voice"))
    n = len(texts)
    spk, prompt = np.empty(n, object), np.empty(n, object)
    for i in range(n):  # a second "speaker": the default voice with fewer prompt tokens
        spk[i] = voice["t3_speaker_emb"][0] * (1 if i % 2 else -1)
        prompt[i] = voice["t3_cond_prompt_speech_tokens"][0][: 150 if i % 2 else 90]
    out = {"id": np.array([f"r{i}" for i in range(n)], object), "text": np.array(texts, object),
           "t3_speaker_emb": spk, "t3_prompt_tokens": prompt}
    out.update({k: np.array(v) for k, v in params.items()})
    return out


def test_punc_norm_follows_the_official_clean_up():
    assert punc_norm("hello   world") == "Hello world."
    # replacements run after spaces are collapsed, so the official output keeps double spaces
    assert punc_norm("Wait… what: this — that; “quoted”") == 'Wait,  what, this - that,  "quoted".'
    assert punc_norm("Fine?") == "Fine?"
    assert punc_norm("It's ok ,right") == "It's ok,right."
    assert punc_norm("x...y") == "X, y." and punc_norm("trailing   ") == "Trailing."


def test_long_text_is_chunked_in_order_and_short_text_kept_whole():
    assert chunk_text("  Short text  ", 300) == ["  Short text  "]
    text = " ".join(f"Sentence number {i} is here." for i in range(30))
    chunks = chunk_text(text, 100)
    assert len(chunks) > 1 and all(len(c) <= 100 for c in chunks)
    assert " ".join(chunks) == text


def test_sampling_order_and_filters():
    vocab = 10
    cond = np.linspace(-2, 2, vocab).astype(np.float32)
    uncond = np.zeros(vocab, np.float32)
    # guidance then penalty: token 9 (the start token, so already "generated") 3.0 / 2 < token 8 at 2.33
    greedy = Sampler(SamplingParams(temperature=0, cfg_weight=0.5, repetition_penalty=2.0), rng_for(0, 0, 0),
                     start_token=9, stop_token=7)
    assert greedy.step(cond, uncond) == 8
    assert greedy.step(cond, uncond) == 7  # 8 is penalized now too; 7 is the stop token: done, not output
    assert greedy.done and greedy.tokens == [8]

    # min_p keeps only tokens within min_p of the best one: with a sharp peak, always the peak
    peaked = np.full(vocab, -10.0, np.float32)
    peaked[3] = 10.0
    s = Sampler(SamplingParams(min_p=0.05, repetition_penalty=1.0), rng_for(1, 0, 0), 9, 8)
    assert {s.step(peaked, peaked) for _ in range(20)} == {3}
    # top_p keeps the smallest head of the distribution holding top_p of the mass
    two = np.array([5.0, 5.0] + [0.0] * 8, np.float32)
    s = Sampler(SamplingParams(min_p=0, top_p=0.9, repetition_penalty=1.0, temperature=1.0), rng_for(2, 0, 0), 9, 8)
    assert {s.step(two, two) for _ in range(40)} == {0, 1}
    # the stop token ends a request; max_new_tokens too
    s = Sampler(SamplingParams(max_new_tokens=3, temperature=0, repetition_penalty=1.0), rng_for(3, 0, 0), 9, 8)
    stop = np.zeros(vocab, np.float32)
    stop[8] = 5
    s.step(stop, stop)
    assert s.done and s.tokens == []
    s = Sampler(SamplingParams(max_new_tokens=3, temperature=0, repetition_penalty=1.0), rng_for(3, 0, 0), 9, 8)
    for _ in range(3):
        s.step(cond, cond)
    assert s.done and len(s.tokens) == 3


def test_a_rows_tokens_do_not_depend_on_its_batch(bundle, stage):
    for params in ({"temperature": [0.0] * 6}, {"seed": [11, 12, 13, 14, 15, 16]}):
        batch = rows(bundle, TEXTS, max_new_tokens=[25] * 6, **params)
        together = stage(batch)
        assert list(together["status"]) == ["ok"] * 6, together["error"]
        for i in range(6):
            alone = stage({k: v[i:i + 1] for k, v in batch.items()})
            assert np.array_equal(alone["speech_tokens"][0], together["speech_tokens"][i]), (params, i)
    # the same seed draws the same tokens, another seed others
    a = stage(rows(bundle, TEXTS[:1], seed=[5]))["speech_tokens"][0]
    b = stage(rows(bundle, TEXTS[:1], seed=[5]))["speech_tokens"][0]
    c = stage(rows(bundle, TEXTS[:1], seed=[6]))["speech_tokens"][0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_concurrent_calls_share_one_decode_loop(bundle):
    stage = T3(bundle, options={"max_rows": 8, "prefill_rows": 2})
    batches = [rows(bundle, TEXTS[k:k + 2], seed=[k, k + 1], max_new_tokens=[10 + 10 * k, 30]) for k in (0, 2, 4)]
    expected = [stage(b)["speech_tokens"] for b in batches]
    stage.loop.rows_per_step.clear()
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda k=k: got.update({k: stage(batches[k])["speech_tokens"]}))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(got[k], expected[k]))
    # rows of different calls shared steps, and the batch shrank as requests finished
    assert max(stage.loop.rows_per_step) > 4 and min(stage.loop.rows_per_step) < max(stage.loop.rows_per_step)


def test_chunks_parameters_and_bad_rows(bundle, stage):
    long = " ".join(f"This is sentence {i} of a long text." for i in range(8))
    batch = rows(bundle, [long, "   ", "Fine.", "Too many."], seed=[1, 2, 3, 4], max_new_tokens=[8, 8, 8, 5000])
    out = T3(bundle, options={"max_chunk_chars": 80})(batch)
    assert list(out["status"]) == ["ok", "error", "ok", "error"]
    assert len(out["chunk_tokens"][0]) == len(chunk_text(long, 80)) > 1
    assert out["chunk_tokens"][0].sum() == len(out["speech_tokens"][0])
    assert "text is empty" in out["error"][1]
    assert "max_new_tokens=5000 is out of range" in out["error"][3]
    assert out["speech_tokens"][0].dtype == np.int32 and (out["speech_tokens"][0] < 6561).all()
    with pytest.raises(ConfigError, match="max_rowz"):
        T3(bundle, options={"max_rowz": 3})


def test_int8_lm_decodes_close_to_fp32_and_needs_its_graph(bundle, stage, tmp_path):
    """lm int8 runs the bundle's verified int8 step graph: greedy tokens mostly those of fp32 (the tiny model's
    margins are wide), never all of them different; a bundle without the graph is a clear config error."""
    int8 = T3(bundle, options={"max_rows": 6, "prefill_rows": 4, "lm": "int8"})
    batch = rows(bundle, TEXTS, max_new_tokens=[25] * 6, temperature=[0.0] * 6)
    got, want = int8(batch), stage(batch)
    assert list(got["status"]) == ["ok"] * 6, got["error"]
    agree = [np.mean(a[:min(len(a), len(b))] == b[:min(len(a), len(b))])
             for a, b in zip(got["speech_tokens"], want["speech_tokens"])]
    assert np.mean(agree) > 0.5, agree
    manifest = json.loads((bundle.path / "bundle.json").read_text())
    del manifest["graphs"]["t3_lm_step_int8"]
    stripped = tmp_path / "no-int8"
    shutil.copytree(bundle.path, stripped)
    (stripped / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="t3_lm_step_int8"):
        T3(load_bundle(str(stripped)), options={"lm": "int8"})
