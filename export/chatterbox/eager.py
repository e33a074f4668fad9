"""The eager PyTorch baseline: the official Chatterbox generation loop over our torch modules, batch 1.

    python -m export.chatterbox.eager --bundle B --manifest rows.parquet --json report.json

One utterance at a time, step by step as the released `ChatterboxTTS.generate` does it
(T3 prefill and KV-cached decode with CFG, S3Gen flow encoder, Euler CFM with CFG,
HiFT vocoder, fade-in), with the same numbers the ONNX runtime stages use wherever
the official loop leaves a choice:

* features of the reference audio: the runtime's numpy front end
  (`actors.chatterbox.conditioning`), then our torch VoiceEncoder, CAMPPlus and
  S3Tokenizer;
* text: `actors.chatterbox.text` (chunking, clean-up, tokenization);
* sampling: `actors.chatterbox.sampling.Sampler`, generators from
  `columns.rng_for(seed, stream, chunk)` for T3, the CFM noise and HiFT's sine source;
* chunks joined with the Vocoder stage's silence.

So with the same weights, seeds and parameters, the runtime's tokens should equal
these and its audio should be within float tolerance (tests/test_cb_parity.py).
It is also the "official loop" baseline of the benchmark (full size, fp32, batch 1):
`synthesize` returns a per-stage time breakdown.

export may import actors, never the reverse.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from actors.audio import decode_audio, encode_audio, silence
from actors.bundle import Bundle, load_bundle
from actors.chatterbox import columns as C
from actors.chatterbox.conditioning import GEN_SAMPLE_RATE, ConditioningOptions, ReferenceFeatures, reference_features
from actors.chatterbox.sampling import Sampler, SamplingParams
from actors.chatterbox.t3 import T3Options
from actors.chatterbox.text import TextTokenizer, chunk_text
from actors.chatterbox.vocoder import VocoderOptions
from actors.chatterbox.voice import Voice, aligned_prompt
from actors.dsp import resample
from export.chatterbox.bundle_writer import GENERATION, source_from_manifest
from export.chatterbox.cfm import solve_cfm_torch
from export.chatterbox.checkpoint import ModelConfig, Source, weights_fingerprint
from export.chatterbox.hift import vocode_torch

UNCOND_TEXT_ID = -1
"""The unconditional CFG row's text ids: `T3.text_embeds` embeds a negative id as zero plus its position."""

# The runtime stages' option defaults, so both sides chunk, pause and accept references alike.
MAX_CHUNK_CHARS = T3Options().max_chunk_chars
CHUNK_SILENCE_S = VocoderOptions().chunk_silence_s
MIN_REF_SECONDS, MAX_REF_SECONDS = ConditioningOptions().min_seconds, ConditioningOptions().max_seconds
# Generation defaults when no bundle says otherwise (the released model's, as bundle.json records them).
T3_DEFAULTS = GENERATION["t3"]
PARAMETERS = tuple(T3_DEFAULTS)
STAGES = ("conditioning", "t3", "s3gen", "cfm", "hift")


@dataclass
class Result:
    """One utterance: tokens per text chunk, audio, and where the time went."""

    chunks: list[str]
    tokens: list[np.ndarray]        # per chunk, ids < 6561, int64
    audio: np.ndarray               # float32 [samples] at `sample_rate`
    sample_rate: int
    voice: Voice
    mels: list[np.ndarray] = field(default_factory=list)   # CFM output per chunk with tokens, [frames, 80]
    seconds: dict[str, float] = field(default_factory=dict)   # per stage (STAGES) and "total"
    t3_steps: int = 0               # LM calls (prefills + decode steps)

    @property
    def speech_tokens(self) -> np.ndarray:
        """All chunks' tokens in order (the T3 stage's `speech_tokens`)."""
        return np.concatenate(self.tokens) if self.tokens else np.zeros(0, np.int64)


class _Clock:
    def __init__(self) -> None:
        self.seconds = {k: 0.0 for k in STAGES}

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] += time.perf_counter() - started


class EagerChatterbox:
    """The official generation loop, eager torch, one utterance and one text chunk at a time.

    `bundle`: a bundle (path or `Bundle`) whose text tokenizer, default voice and generation
    defaults are used; its weights are rebuilt from what bundle.json records (a seeded
    random init, or the checkpoint it was exported from) unless `source` is given, and
    checked against the fingerprints bundle.json records (`check_weights`).
    `source` alone (no bundle) works too: the tokenizer and default voice then come from it.
    `threads`: torch intra-op threads (None: torch's default, the machine's cores).
    The other options mirror the runtime stages' (T3 `max_chunk_chars`, Vocoder
    `chunk_silence_s`, Conditioning `min_seconds` / `max_seconds`).
    """

    def __init__(self, bundle: Bundle | str | Path | None = None, source: Source | None = None, *,
                 threads: int | None = None, max_chunk_chars: int = MAX_CHUNK_CHARS,
                 chunk_silence_s: float = CHUNK_SILENCE_S, min_ref_seconds: float = MIN_REF_SECONDS,
                 max_ref_seconds: float = MAX_REF_SECONDS, check_weights: bool = True) -> None:
        if bundle is None and source is None:
            raise ValueError("EagerChatterbox needs a bundle or a weight source")
        if isinstance(bundle, (str, Path)):
            bundle = load_bundle(str(bundle))
        if threads:
            torch.set_num_threads(int(threads))
        self.bundle = bundle
        self.source = source if source is not None else source_from_manifest(bundle.manifest)
        self.cfg: ModelConfig = self.source.cfg
        self.max_chunk_chars = int(max_chunk_chars)
        self.chunk_silence_s = float(chunk_silence_s)
        self.min_ref_seconds, self.max_ref_seconds = float(min_ref_seconds), float(max_ref_seconds)
        self._tmp = tempfile.TemporaryDirectory(prefix="voxray-eager-")
        self.tokenizer = TextTokenizer(bundle if bundle is not None else self._source_bundle())
        generation = bundle.generation if bundle is not None else {}
        self.t3_defaults = {**T3_DEFAULTS, **generation.get("t3", {})}
        cfm = {"n_timesteps": self.cfg.s3gen.cfm.n_timesteps, "cfg_rate": self.cfg.s3gen.cfm.cfg_rate,
               "t_scheduler": self.cfg.s3gen.cfm.t_scheduler, **generation.get("cfm", {})}
        self.n_timesteps, self.cfm_rate = int(cfm["n_timesteps"]), float(cfm["cfg_rate"])
        self.t_scheduler = str(cfm["t_scheduler"])
        self.sample_rate = int(self.cfg.s3gen.hift.sampling_rate)

        # the bundle's graphs were exported from these weights (fingerprints in bundle.json)
        recorded = ((bundle.manifest.get("source") or {}).get("weights_sha256", {})
                    if bundle is not None and check_weights else {})
        self.models: dict[str, torch.nn.Module] = {}
        for component in ("ve", "t3", "tokenizer", "speaker_encoder", "flow", "estimator", "mel2wav"):
            model = self.source.load(component).eval()
            if component in recorded and weights_fingerprint(model) != recorded[component]:
                raise ValueError(f"the rebuilt {component} weights differ from the ones {bundle.path} was "
                                 "exported from")
            for p in model.parameters():
                p.requires_grad_(False)
            self.models[component] = model
            gc.collect()
        self.t3 = self.models["t3"]
        self.tokens = {"start_speech": self.cfg.t3.start_speech_token, "stop_speech": self.cfg.t3.stop_speech_token,
                       "speech_vocab_size": self.cfg.s3gen.flow.vocab_size}
        self._default_voice: Voice | None = None

    def _source_bundle(self) -> Any:
        """Just enough of a bundle for `TextTokenizer`, from the weight source's tokenizer."""
        path = Path(self._tmp.name) / "tokenizer.json"
        self.source.text_tokenizer(path)
        t3 = self.cfg.t3
        return SimpleNamespace(
            path=Path(self._tmp.name), asset=lambda name: path,
            manifest={"model": {"tokens": {"start_text": t3.start_text_token, "stop_text": t3.stop_text_token},
                                "t3": {"text_positions": t3.text_positions}}})

    def close(self) -> None:
        self.models.clear()
        self._tmp.cleanup()

    # ------------------------------------------------------------------ voices

    def default_voice(self) -> Voice:
        """The bundle's default voice (the source's when there is no bundle)."""
        if self._default_voice is None:
            if self.bundle is not None:
                self._default_voice = Voice.default(self.bundle)
            else:
                v = self.source.default_voice()
                if v is not None:
                    tokens, mel = aligned_prompt(v["gen_prompt_token"].reshape(-1),
                                                 v["gen_prompt_feat"].reshape(-1, v["gen_prompt_feat"].shape[-1]))
                    self._default_voice = Voice(
                        t3_speaker_emb=v["t3_speaker_emb"].reshape(-1),
                        t3_prompt_tokens=v["t3_cond_prompt_speech_tokens"].reshape(-1),
                        gen_prompt_tokens=tokens, gen_prompt_mel=mel, gen_xvector=v["gen_embedding"].reshape(-1))
            if self._default_voice is None:
                raise ValueError("no default voice: the bundle (or weight source) has none")
        return self._default_voice

    def voice_from_audio(self, audio: Any, sample_rate: int | None = None) -> Voice:
        """A voice from reference audio: samples ([samples] or [channels, samples] with
        `sample_rate`), encoded bytes, or a local path; the runtime's numpy features, our torch models."""
        with torch.inference_mode():
            return self._voice_from_audio(audio, sample_rate)

    def _voice_from_audio(self, audio: Any, sample_rate: int | None) -> Voice:
        if isinstance(audio, (str, Path)):
            audio = Path(audio).read_bytes()
        if isinstance(audio, (bytes, bytearray, memoryview)):
            samples, sample_rate = decode_audio(bytes(audio), "reference audio", max_seconds=self.max_ref_seconds)
        else:
            if sample_rate is None:
                raise ValueError("reference samples need their sample_rate")
            samples = np.asarray(audio, dtype=np.float32)
            if samples.ndim == 2:      # [channels, samples]: mixed down as librosa.load does
                samples = samples.mean(axis=0)
            samples = samples[:int(np.ceil(self.max_ref_seconds * sample_rate))]
        features = reference_features(resample(samples, int(sample_rate), GEN_SAMPLE_RATE),
                                      min_seconds=self.min_ref_seconds, prompt_len=self.cfg.t3.prompt_len)
        return self.voice_from_features(features)

    def voice_from_features(self, f: ReferenceFeatures) -> Voice:
        """Our torch VoiceEncoder, CAMPPlus and S3Tokenizer on one reference's numpy features (as
        `prepare_conditionals`: each model alone on this reference)."""
        with torch.inference_mode():
            partials = self.models["ve"](torch.tensor(f.ve_mels)).numpy()
            mean = partials.mean(axis=0)
            xvector = self.models["speaker_encoder"](torch.tensor(f.fbank)[None])[0].numpy()
            prompts = []
            for mels in (f.t3_mels, f.gen_mels):
                tokens, lengths = self.models["tokenizer"](torch.tensor(mels)[None],
                                                           torch.tensor([mels.shape[1]], dtype=torch.int64))
                prompts.append(tokens[0, :int(lengths[0])].numpy())
        gen_tokens, gen_mel = aligned_prompt(prompts[1], f.gen_prompt_mel)
        return Voice(t3_speaker_emb=mean / np.linalg.norm(mean), t3_prompt_tokens=prompts[0][:self.cfg.t3.prompt_len],
                     gen_prompt_tokens=gen_tokens, gen_prompt_mel=gen_mel, gen_xvector=xvector)

    # ------------------------------------------------------------------ generation

    def params(self, overrides: Mapping[str, Any] | None = None) -> tuple[SamplingParams, float]:
        """Sampling parameters and exaggeration: the bundle's defaults with `overrides` (T3 column names)."""
        v = {**self.t3_defaults, **{k: x for k, x in (overrides or {}).items() if x is not None}}
        unknown = sorted(set(v) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"unknown generation parameters {unknown} (known: {list(PARAMETERS)})")
        limit = self.cfg.t3.speech_positions - 4
        if int(v["max_new_tokens"]) > limit:
            raise ValueError(f"max_new_tokens={v['max_new_tokens']} is more than this model's {limit}")
        sp = SamplingParams(temperature=float(v["temperature"]), top_p=float(v["top_p"]), min_p=float(v["min_p"]),
                            repetition_penalty=float(v["repetition_penalty"]), cfg_weight=float(v["cfg_weight"]),
                            max_new_tokens=int(v["max_new_tokens"]))
        return sp, float(v["exaggeration"])

    def synthesize(self, text: str, voice: Voice | bytes | str | Path | None = None, seed: int = 0,
                   params: Mapping[str, Any] | None = None) -> Result:
        """One utterance: per text chunk, T3 then S3Gen (flow encoder, CFM, HiFT); chunks joined by silence.

        `voice`: a `Voice`, reference audio (encoded bytes or a local path: conditioned here, timed as
        "conditioning", as the official `generate(audio_prompt_path=...)` does), or None for the default
        voice. `seed`: the row's seed (`columns.row_seed`). `params`: T3 parameters by column name
        (temperature, top_p, min_p, repetition_penalty, cfg_weight, exaggeration, max_new_tokens);
        the bundle's defaults for the others."""
        if not text.strip():
            raise ValueError("text is empty")
        sampling, exaggeration = self.params(params)
        clock = _Clock()
        started = time.perf_counter()
        if voice is None:
            voice = self.default_voice()
        elif not isinstance(voice, Voice):
            voice = self.voice_from_audio(voice)
            clock.add("conditioning", started)
        chunks = chunk_text(text, self.max_chunk_chars)
        tokens: list[np.ndarray] = []
        pieces: list[np.ndarray] = []
        mels: list[np.ndarray] = []
        steps = 0
        with torch.inference_mode():
            t = time.perf_counter()
            cond = self.t3.cond_embeds(torch.tensor(voice.t3_speaker_emb)[None],
                                       torch.tensor(voice.t3_prompt_tokens)[None],
                                       torch.tensor([exaggeration], dtype=torch.float32))
            clock.add("t3", t)
            for k, chunk in enumerate(chunks):
                t = time.perf_counter()
                sampler = Sampler(sampling, C.rng_for(seed, C.T3_STREAM, k), self.tokens["start_speech"],
                                  self.tokens["stop_speech"])
                steps += self._generate(cond, self.tokenizer.encode(chunk), sampler)
                ids = np.array(sampler.tokens, dtype=np.int64)
                ids = ids[ids < self.tokens["speech_vocab_size"]]
                tokens.append(ids)
                clock.add("t3", t)
                if len(ids):   # a chunk without tokens gives no audio (and no pause), as in the Vocoder stage
                    audio, mel = self._speak(ids, voice, seed, k, clock)
                    pieces.append(audio)
                    mels.append(mel)
        if not pieces:
            raise ValueError("no speech tokens were generated (the first token was the stop token)")
        gap = silence(self.chunk_silence_s, self.sample_rate)
        audio = np.concatenate([x for p in pieces for x in (gap, p)][1:]).astype(np.float32)
        seconds = dict(clock.seconds, total=time.perf_counter() - started)
        return Result(chunks, tokens, audio, self.sample_rate, voice, mels, seconds, steps)

    def _generate(self, cond: torch.Tensor, text_ids: np.ndarray, sampler: Sampler) -> int:
        """T3 on one chunk (the official `T3.inference`): a CFG pair prefilled as
        [cond, text (blanked in the unconditional row), start-speech twice at speech position 0],
        then one KV-cached step per token. Returns the number of LM calls."""
        t3 = self.t3
        ids = torch.from_numpy(np.stack([text_ids, np.full_like(text_ids, UNCOND_TEXT_ID)]))
        start = torch.full((2, 1), self.tokens["start_speech"], dtype=torch.int64)
        start_embed = t3.speech_embeds(start, torch.zeros_like(start))
        embeds = torch.cat([cond.expand(2, -1, -1), t3.text_embeds(ids), start_embed, start_embed], dim=1)
        length = embeds.shape[1]
        mask = torch.ones((2, length), dtype=torch.int64)
        positions = torch.arange(length, dtype=torch.int64).expand(2, -1)
        cfg = self.cfg.t3
        past = [(torch.zeros(2, cfg.num_kv_heads, 0, cfg.head_dim), torch.zeros(2, cfg.num_kv_heads, 0, cfg.head_dim))
                for _ in range(cfg.num_layers)]
        logits, past = t3.lm(embeds, mask, positions, past)
        calls = 1
        sampler.step(logits[0, -1].numpy(), logits[1, -1].numpy())
        while not sampler.done:
            token = torch.full((2, 1), sampler.ids[-1], dtype=torch.int64)
            speech_pos = torch.full((2, 1), len(sampler.ids) - 1, dtype=torch.int64)
            mask = torch.ones((2, mask.shape[1] + 1), dtype=torch.int64)
            positions = torch.full((2, 1), mask.shape[1] - 1, dtype=torch.int64)
            logits, past = t3.lm(t3.speech_embeds(token, speech_pos), mask, positions, past)
            calls += 1
            sampler.step(logits[0, -1].numpy(), logits[1, -1].numpy())
        return calls

    def _speak(self, ids: np.ndarray, voice: Voice, seed: int, chunk: int,
               clock: _Clock) -> tuple[np.ndarray, np.ndarray]:
        """S3Gen on one chunk (the official `S3Token2Wav.inference`): prompt tokens ++ chunk tokens →
        flow encoder → CFM with the prompt mel as condition → mel without the prompt frames → HiFT."""
        flow = self.models["flow"]
        t = time.perf_counter()
        tokens = torch.from_numpy(np.concatenate([voice.gen_prompt_tokens, ids]))[None]
        mu, _ = flow.encode(tokens, torch.tensor([tokens.shape[1]], dtype=torch.int64))
        spks = flow.speaker(torch.tensor(voice.gen_xvector)[None])
        clock.add("s3gen", t)

        t = time.perf_counter()
        frames, prompt = mu.shape[2], len(voice.gen_prompt_mel)
        cond = torch.zeros_like(mu)
        cond[0, :, :prompt] = torch.tensor(voice.gen_prompt_mel).T
        noise = C.rng_for(seed, C.CFM_STREAM, chunk).standard_normal((mu.shape[1], frames)).astype(np.float32)
        mel = solve_cfm_torch(self.models["estimator"], mu, torch.ones(1, 1, frames), spks, cond,
                              torch.from_numpy(noise)[None], n_steps=self.n_timesteps, cfg_rate=self.cfm_rate,
                              scheduler=self.t_scheduler)[:, :, prompt:]
        clock.add("cfm", t)

        t = time.perf_counter()
        audio = vocode_torch(self.models["mel2wav"], mel.contiguous(), C.rng_for(seed, C.HIFT_STREAM, chunk),
                             fade_in=True, stft="torch")
        clock.add("hift", t)
        return audio[0].numpy().astype(np.float32), mel[0].T.numpy().astype(np.float32)


def run_manifest(model: EagerChatterbox, table: pa.Table, fmt: str) -> dict[str, Any]:
    """Every row of a text manifest (id, text, optional reference_audio, seed and T3 parameters), one at a
    time, each encoded as the bulk job would: audio seconds, wall seconds and where the time went."""
    rows = table.to_pylist()
    stage_s = {k: 0.0 for k in STAGES}
    audio_s = 0.0
    started = time.perf_counter()
    for row in rows:
        seed = C.row_seed({"id": np.array([row["id"]], object), "seed": np.array([row.get("seed")], object)}, 0)
        result = model.synthesize(row["text"], row.get("reference_audio") or None, seed,
                                  {k: row.get(k) for k in PARAMETERS})
        encode_audio(result.audio, result.sample_rate, fmt)
        audio_s += len(result.audio) / result.sample_rate
        for k in STAGES:
            stage_s[k] += result.seconds[k]
    return {"rows": len(rows), "audio_s": audio_s, "wall_s": time.perf_counter() - started,
            "stage_s": {k: round(v, 2) for k, v in stage_s.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.chatterbox.eager", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle dir (its weights are rebuilt from bundle.json)")
    p.add_argument("--manifest", required=True, help="Parquet rows: id, text, optional reference_audio, seed, "
                                                     "T3 parameters")
    p.add_argument("--format", default="wav", choices=("wav", "flac"))
    p.add_argument("--threads", type=int, help="torch threads (default: every core)")
    p.add_argument("--json", help="write the report here too")
    args = p.parse_args(argv)
    model = EagerChatterbox(args.bundle, threads=args.threads)
    report = run_manifest(model, pq.read_table(args.manifest), args.format)
    with open("/proc/self/status") as f:  # peak RSS, the model included
        report["peak_rss_mb"] = round(next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024, 1)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
