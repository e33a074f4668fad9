"""Verification of the exported T3 LM graph as the runtime uses it, and its int8 variant.

`verify_lm`: left-padded batched prefill (HF convention) + cached greedy decode,
ORT vs torch and every padded row vs the same row run alone, at every step.
`verify_lm_step`: the t3_lm_step graph decoding as the runtime does (a preallocated
in-place cache, rows leaving and joining) against the t3_lm contract graph.
`quantize_lm` / `verify_lm_int8`: dynamic int8 weights for CPU and their greedy
agreement with the fp32 graph.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from actors.chatterbox.decode import KVCache
from export.chatterbox.graph_io import EXTERNAL_DATA_BYTES, session
from export.chatterbox.spec import Tolerance
from export.chatterbox.t3 import LM_TOLERANCE, T3, T3Config, lm_io_names

# Teacher-forced greedy agreement required of the int8 graph against fp32 (tiny seeded model).
INT8_MIN_AGREEMENT = 0.9
# Above this many bytes of weights an output ONNX file keeps its tensors as external data.


class _LM:
    """Runs the LM through ORT or torch with numpy in/out: (logits, presents)."""

    def __init__(self, cfg: T3Config, sess: ort.InferenceSession | None = None, model: T3 | None = None):
        self.cfg, self.sess, self.model = cfg, sess, model
        self.inputs, self.outputs = lm_io_names(cfg)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.cfg.num_kv_heads, 0, self.cfg.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.cfg.num_layers)]

    def __call__(self, embeds: np.ndarray, mask: np.ndarray, pos: np.ndarray,
                 past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        args = [embeds.astype(np.float32), mask.astype(np.int64), pos.astype(np.int64), *past]
        if self.sess is not None:
            outs = self.sess.run(self.outputs, dict(zip(self.inputs, args)))
        else:
            with torch.no_grad():
                t = [torch.from_numpy(np.ascontiguousarray(a)) for a in args]
                logits, presents = self.model.lm(t[0], t[1], t[2], list(zip(t[3::2], t[4::2])))
            outs = [logits.numpy()] + [x.numpy() for kv in presents for x in kv]
        return outs[0], outs[1:]


def _check(report: dict, key: str, got: np.ndarray, want: np.ndarray, tol: Tolerance, where: str) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"t3_lm: {key} at {where}: shape {got.shape} != {want.shape}")
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    err = float(diff.max(initial=0.0))
    if not np.all(diff <= tol.atol + tol.rtol * np.abs(want.astype(np.float64))):
        raise AssertionError(f"t3_lm: {key} at {where}: max abs error {err:.3g} exceeds "
                             f"atol={tol.atol} rtol={tol.rtol}")
    report[key] = max(report.get(key, 0.0), err)


def _random_prefills(model: T3, cfg: T3Config, text_lengths, rng: np.random.Generator) -> list[np.ndarray]:
    """One official-layout prefill (cond, text, 2x start-speech) per row, [n_i, D] each."""
    rows = []
    with torch.no_grad():
        for t in text_lengths:
            spk = rng.standard_normal((1, cfg.speaker_embed_size)).astype(np.float32)
            spk /= np.linalg.norm(spk)
            prompt = rng.integers(0, cfg.start_speech_token, (1, cfg.prompt_len))
            text = rng.integers(1, cfg.text_vocab_size, (1, t))
            text[0, 0], text[0, -1] = cfg.start_text_token, cfg.stop_text_token
            e = model.prefill_embeds(torch.from_numpy(spk), torch.from_numpy(prompt),
                                     torch.tensor([rng.uniform(0.3, 1.0)], dtype=torch.float32),
                                     torch.from_numpy(text))
            rows.append(e[0].numpy())
    return rows


def left_pad(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad [n_i, D] rows -> embeds [B,N,D], attention_mask [B,N], position_ids [B,N]
    (HF convention: cumsum(mask) - 1, padded positions set to 1)."""
    n = max(len(r) for r in rows)
    embeds = np.zeros((len(rows), n, rows[0].shape[1]), np.float32)
    mask = np.zeros((len(rows), n), np.int64)
    for i, r in enumerate(rows):
        embeds[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return embeds, mask, pos


def _speech_embed(model: T3, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.speech_embeds(torch.from_numpy(tokens), torch.from_numpy(positions)).numpy()


def verify_lm(model: T3, cfg: T3Config, onnx_path: Path, text_lengths=(9, 4, 13),
              decode_steps: int = 8, seed: int = 0, tolerance: Tolerance = LM_TOLERANCE,
              threads: int = 1) -> dict:
    """Batched left-padded greedy decoding through the t3_lm graph vs torch and vs each row alone.

    Rows get official-layout prefills of different lengths (34 + text + 2).  At the
    prefill and at each of `decode_steps` cached steps (the greedy token fed back through
    speech_emb + speech position i+1), checks: ORT batched vs torch batched logits (real
    positions), ORT and torch at batch 1 (each row alone: unpadded, its own lengths,
    none equal to the trace shape), each padded row's logits and KV cache vs the row
    alone, and identical greedy tokens everywhere.  Raises AssertionError on the first
    violation; returns the max errors measured.
    """
    model.eval()
    rng = np.random.default_rng(seed)
    rows = _random_prefills(model, cfg, text_lengths, rng)
    lm_ort = _LM(cfg, sess=session(Path(onnx_path), threads))
    lm_pt = _LM(cfg, model=model)
    b = len(rows)
    errs: dict[str, float] = {}

    embeds, mask, pos = left_pad(rows)
    pads = [embeds.shape[1] - len(r) for r in rows]
    lo, past_o = lm_ort(embeds, mask, pos, lm_ort.empty_past(b))
    lt, past_t = lm_pt(embeds, mask, pos, lm_pt.empty_past(b))
    alone = []  # per row: (ort past, torch past, next position)
    alone_logits = []
    for i, r in enumerate(rows):
        args = (r[None], np.ones((1, len(r)), np.int64), np.arange(len(r))[None])
        ao, apo = lm_ort(*args, lm_ort.empty_past(1))
        at, apt = lm_pt(*args, lm_pt.empty_past(1))
        _check(errs, "onnx_vs_torch_batch1/logits", ao, at, tolerance, f"prefill row {i}")
        _check(errs, "onnx_vs_torch_batched/logits", lo[i, pads[i]:], lt[i, pads[i]:], tolerance,
               f"prefill row {i}")
        _check(errs, "padded_row_vs_alone/logits", lo[i:i + 1, pads[i]:], ao, tolerance, f"prefill row {i}")
        alone.append([apo, apt, len(r)])
        alone_logits.append(ao[:, -1])

    tokens: list[list[int]] = [[] for _ in range(b)]

    def pick(step: str, batched_o, batched_t, alone_o) -> np.ndarray:
        nxt = batched_o.argmax(-1)
        for i in range(b):
            want = {"torch batched": int(batched_t[i].argmax()), "ORT alone": int(alone_o[i].argmax())}
            for what, tok in want.items():
                if tok != int(nxt[i]):
                    raise AssertionError(f"t3_lm: greedy token differs at {step} row {i}: "
                                         f"ORT batched {int(nxt[i])} vs {what} {tok}")
            tokens[i].append(int(nxt[i]))
        return nxt

    nxt = pick("prefill", lo[:, -1], lt[:, -1], [x[0] for x in alone_logits])
    for step in range(decode_steps):
        where = f"decode step {step}"
        tok = nxt[:, None].astype(np.int64)
        se = _speech_embed(model, tok, np.full_like(tok, step + 1))
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        lo, past_o = lm_ort(se, mask, pos, past_o)
        lt, past_t = lm_pt(se, mask, pos, past_t)
        _check(errs, "onnx_vs_torch_batched/logits", lo, lt, tolerance, where)
        row_logits = []
        for i in range(b):
            apo, apt, n = alone[i]
            args = (se[i:i + 1], np.ones((1, n + 1), np.int64), np.array([[n]]))
            ao, apo = lm_ort(*args, apo)
            at, apt = lm_pt(*args, apt)
            alone[i] = [apo, apt, n + 1]
            _check(errs, "onnx_vs_torch_batch1/logits", ao, at, tolerance, f"{where} row {i}")
            _check(errs, "padded_row_vs_alone/logits", lo[i:i + 1], ao, tolerance, f"{where} row {i}")
            row_logits.append(ao[0, -1])
        nxt = pick(where, lo[:, -1], lt[:, -1], row_logits)

    # the whole KV cache of each padded row (real positions) vs the row alone, last step
    for i in range(b):
        for j, (got, want) in enumerate(zip(past_o, alone[i][0])):
            _check(errs, "padded_row_vs_alone/present", got[i:i + 1, :, pads[i]:], want, tolerance,
                   f"final cache row {i} tensor {j}")
            _check(errs, "onnx_vs_torch_batched/present", got[i:i + 1, :, pads[i]:],
                   past_t[j][i:i + 1, :, pads[i]:], tolerance, f"final cache row {i} tensor {j}")
    return {"graph": "t3_lm", "padding": "left", "batch_sizes": [1, b],
            "prefill_lengths": [len(r) for r in rows], "decode_steps": decode_steps,
            "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol},
            "max_abs_error": errs, "greedy_tokens": tokens}


def verify_lm_step(model: T3, cfg: T3Config, step_path: Path, contract_path: Path,
                   text_lengths=(9, 4, 13, 6), decode_steps: int = 8, seed: int = 0,
                   tolerance: Tolerance = LM_TOLERANCE, threads: int = 1) -> dict:
    """t3_lm_step through the runtime's `KVCache` vs t3_lm running each row alone.

    Three rows are prefilled together (left-padded) into a cache whose capacity grows and shrinks
    in blocks of 4 columns; the first row leaves after two steps (another row moves into its
    place) and a fourth row joins after four. At every step each row's logits must match the
    contract graph run on that row alone with its whole cache passed in and out, and the greedy
    tokens must agree; at the end each row's real cache columns must match.
    """
    rng = np.random.default_rng(seed)
    rows = _random_prefills(model, cfg, text_lengths, rng)
    step_sess = session(Path(step_path), threads)
    contract = _LM(cfg, sess=session(Path(contract_path), threads))
    inputs, outputs = lm_io_names(cfg, step=True)
    cache = KVCache(2 * cfg.num_layers, len(rows), cfg.num_kv_heads, cfg.head_dim, block=4)
    errs: dict[str, float] = {}
    alone: dict[int, dict] = {}   # row -> its contract-graph state: past, length, speech step, last token
    active: list[int] = []        # rows in cache order

    def run_step(embeds, mask, pos, past) -> tuple[np.ndarray, list[np.ndarray]]:
        outs = step_sess.run(outputs, dict(zip(inputs, [embeds, mask, pos, *past])))
        return outs[0][:, -1], outs[1:]

    def compare(i: int, got: np.ndarray, where: str) -> None:
        want = alone[i]["logits"]
        _check(errs, "step_vs_contract/logits", got[None], want[None], tolerance, f"{where} row {i}")
        if int(got.argmax()) != int(want.argmax()):
            raise AssertionError(f"t3_lm_step: greedy token differs from t3_lm at {where} row {i}")
        alone[i]["token"] = int(want.argmax())

    def join(ids: list[int], where: str) -> None:
        embeds, mask, pos = left_pad([rows[i] for i in ids])
        logits, new = run_step(embeds, mask, pos, [np.zeros((len(ids), cfg.num_kv_heads, 0, cfg.head_dim),
                                                            np.float32)] * len(inputs[3:]))
        cache.add(new, mask)
        for j, i in enumerate(ids):
            n = len(rows[i])
            lo, past = contract(rows[i][None], np.ones((1, n), np.int64), np.arange(n)[None],
                                contract.empty_past(1))
            alone[i] = {"past": past, "n": n, "speech": 0, "logits": lo[0, -1]}
            compare(i, logits[j], where)
        active.extend(ids)

    join([0, 1, 2], "prefill")
    for step in range(decode_steps):
        where = f"decode step {step}"
        if step == 2:
            order = cache.keep([1, 2])
            active[:] = [active[k] for k in order]
        if step == 4:
            join([3], f"join at {where}")
        tokens = np.array([[alone[i]["token"]] for i in active], np.int64)
        speech = np.array([[alone[i]["speech"] + 1] for i in active], np.int64)
        embeds = _speech_embed(model, tokens, speech)
        logits, new = run_step(embeds, cache.step_mask(), cache.positions(), cache.views())
        cache.append(new)
        for j, i in enumerate(active):
            a = alone[i]
            lo, a["past"] = contract(embeds[j:j + 1], np.ones((1, a["n"] + 1), np.int64), np.array([[a["n"]]]),
                                     a["past"])
            a["n"], a["speech"], a["logits"] = a["n"] + 1, a["speech"] + 1, lo[0, -1]
            compare(i, logits[j], where)
    for j, i in enumerate(active):
        real = cache.mask[j].astype(bool)
        for t, (buf, want) in enumerate(zip(cache.views(), alone[i]["past"])):
            _check(errs, "step_vs_contract/cache", buf[j:j + 1][:, :, real], want, tolerance,
                   f"final cache row {i} tensor {t}")
    return {"graph": "t3_lm_step", "reference_graph": "t3_lm", "prefill_lengths": [len(r) for r in rows],
            "decode_steps": decode_steps, "tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol},
            "max_abs_error": errs}


def _lm_weight_bytes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        total += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return total


def quantize_lm(fp32_path: Path, out_path: Path, per_channel: bool = False,
                keep_head_fp32: bool = True) -> Path:
    """Dynamic int8 quantization of the LM's weight MatMuls (activations quantized per call).

    `keep_head_fp32` leaves `speech_head` (the MatMul producing `logits`) in fp32: it
    is 1.6 % of the weights and quantizing it adds noise straight onto the logits.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    exclude = []
    if keep_head_fp32:
        graph = onnx.load(str(fp32_path), load_external_data=False).graph
        exclude = [n.name for n in graph.node if n.op_type == "MatMul" and "logits" in n.output]
    # int8 weights are a quarter of the fp32 bytes (the fp32 head adds ~1.6 %)
    big = _lm_weight_bytes(fp32_path) // 4 > EXTERNAL_DATA_BYTES
    quantize_dynamic(
        str(fp32_path), str(out_path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
        per_channel=per_channel, nodes_to_exclude=exclude,
        extra_options={"MatMulConstBOnly": True}, use_external_data_format=big)
    return out_path


def verify_lm_int8(model: T3, cfg: T3Config, fp32_path: Path, int8_path: Path, steps: int = 64,
                   text_length: int = 12, seed: int = 0, min_agreement: float = INT8_MIN_AGREEMENT,
                   threads: int = 1) -> dict:
    """Greedy agreement of the int8 LM with the fp32 LM over `steps` decode steps (batch 1).

    Teacher-forced: both graphs are fed the fp32 greedy sequence; agreement = fraction
    of the steps+1 predictions (prefill + each step) where the int8 argmax equals the
    fp32 argmax.  Free-running: the int8 graph decodes on its own; reports the first
    step whose token differs from fp32 (None if never).  Raises AssertionError when the
    teacher-forced agreement is below `min_agreement`.
    """
    rng = np.random.default_rng(seed)
    (row,) = _random_prefills(model, cfg, [text_length], rng)
    ref = _LM(cfg, sess=session(Path(fp32_path), threads))
    q = _LM(cfg, sess=session(Path(int8_path), threads))

    def run(lm: _LM, forced: list[int] | None) -> tuple[list[int], list[np.ndarray]]:
        n = len(row)
        logits, past = lm(row[None], np.ones((1, n), np.int64), np.arange(n)[None], lm.empty_past(1))
        toks, outs = [], []
        for step in range(steps + 1):
            last = logits[0, -1]
            outs.append(last)
            toks.append(int(last.argmax()))
            if step == steps:
                break
            feed = np.array([[forced[step] if forced is not None else toks[-1]]], np.int64)
            se = _speech_embed(model, feed, np.array([[step + 1]]))
            logits, past = lm(se, np.ones((1, n + step + 1), np.int64), np.array([[n + step]]), past)
        return toks, outs

    ref_toks, ref_logits = run(ref, None)
    tf_toks, tf_logits = run(q, ref_toks)
    free_toks, _ = run(q, None)
    agree = float(np.mean([a == b for a, b in zip(tf_toks, ref_toks)]))
    first_div = next((i for i, (a, b) in enumerate(zip(free_toks, ref_toks)) if a != b), None)
    err = max(float(np.abs(a - b).max()) for a, b in zip(tf_logits, ref_logits))
    report = {"graph": "t3_lm_int8", "steps": steps, "teacher_forced_agreement": agree,
              "free_run_first_divergence": first_div, "min_agreement": min_agreement,
              "max_abs_logit_error": err, "logit_std": float(np.std(np.stack(ref_logits))),
              "distinct_fp32_tokens": len(set(ref_toks))}
    if agree < min_agreement:
        raise AssertionError(f"t3_lm int8: teacher-forced greedy agreement {agree:.3f} "
                             f"< {min_agreement} over {steps} steps")
    return report
