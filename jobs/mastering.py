"""Audiobook mastering: loudness to a target with a true-peak ceiling, subtitles, the M4B container.

Loudness is measured with pyloudnorm (ITU-R BS.1770-4 integrated loudness); true peak by
oversampling with soxr to at least 176.4 kHz (BS.1770's 4x of 44.1 kHz); peaks above the ceiling
are held down by FFmpeg's look-ahead limiter (`alimiter`, through PyAV) rather than by lowering the
gain, so speech reaches the target. The M4B is AAC in an MP4 ("ipod") container written by
PyAV, with chapter markers and title/author tags.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable

import av
import numpy as np
import pyloudnorm
import soxr

_BLOCK = 1 << 16
"""Samples per frame pushed through PyAV (bounded memory for long chapters)."""


@dataclass(frozen=True)
class Loudness:
    input_lufs: float | None
    """Integrated loudness as synthesized; None for silence (nothing to measure)."""
    output_lufs: float | None
    gain_db: float
    true_peak_dbtp: float | None
    limited: bool
    """Whether the limiter had to hold peaks down."""


def _db(x: float) -> float:
    return 20 * math.log10(x) if x > 0 else -math.inf


def true_peak_dbtp(audio: np.ndarray, rate: int) -> float:
    """The highest inter-sample peak in dBTP, oversampled to >= 176.4 kHz in streaming blocks."""
    if not len(audio):
        return -math.inf
    factor = max(4, math.ceil(176400 / rate))
    stream = soxr.ResampleStream(rate, rate * factor, 1, dtype="float32", quality="HQ")
    peak = 0.0
    for start in range(0, len(audio), _BLOCK):
        chunk = np.ascontiguousarray(audio[start:start + _BLOCK], dtype=np.float32)
        up = stream.resample_chunk(chunk, last=start + _BLOCK >= len(audio))
        if len(up):
            peak = max(peak, float(np.abs(up).max()))
    return _db(max(peak, float(np.abs(audio).max())))


def _limit(audio: np.ndarray, rate: int, ceiling_db: float) -> np.ndarray:
    """FFmpeg's alimiter at `ceiling_db` (sample peak), delay compensated so timing is unchanged."""
    graph = av.filter.Graph()
    source = graph.add_abuffer(format="flt", sample_rate=rate, layout="mono", time_base=Fraction(1, rate))
    limiter = graph.add("alimiter", f"limit={10 ** (ceiling_db / 20):.6f}:level=0:latency=1:attack=5:release=50")
    sink = graph.add("abuffersink")
    source.link_to(limiter)
    limiter.link_to(sink)
    graph.configure()
    out: list[np.ndarray] = []

    def drain() -> None:
        while True:
            try:
                out.append(graph.pull().to_ndarray().reshape(-1).astype(np.float32))
            except (av.error.BlockingIOError, av.error.EOFError):
                return

    for start in range(0, len(audio), _BLOCK):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None, start:start + _BLOCK], np.float32),
                                           format="flt", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        graph.push(frame)
        drain()
    graph.push(None)
    drain()
    return np.concatenate(out)[:len(audio)] if out else audio


def normalize_loudness(audio: np.ndarray, rate: int, target_lufs: float,
                       peak_dbtp: float) -> tuple[np.ndarray, Loudness]:
    """`audio` at `target_lufs` integrated with true peaks at most `peak_dbtp`, and what was measured."""
    meter = pyloudnorm.Meter(rate)

    def measure(x: np.ndarray) -> float:
        return float(meter.integrated_loudness(x.astype(np.float64)))

    before = measure(audio) if len(audio) >= rate // 2 else -math.inf  # a meter block is 400 ms
    if not math.isfinite(before):  # silence (or too short to measure): nothing to normalize
        peak = true_peak_dbtp(audio, rate)
        return audio, Loudness(None, None, 0.0, round(peak, 2) if math.isfinite(peak) else None, False)
    gain, ceiling, limited = target_lufs - before, peak_dbtp - 0.5, False
    for _ in range(4):  # limiting lowers the loudness a little: raise the gain and limit again
        out = audio * np.float32(10 ** (gain / 20))
        peak = true_peak_dbtp(out, rate)
        if peak > peak_dbtp:
            out, limited = _limit(out, rate, ceiling), True
            peak = true_peak_dbtp(out, rate)
            if peak > peak_dbtp:  # inter-sample overs the sample-peak limiter cannot see
                ceiling -= peak - peak_dbtp + 0.1
                continue
        level = measure(out)
        if abs(level - target_lufs) <= 0.1:
            break
        gain += target_lufs - level
    if peak > peak_dbtp:  # the ceiling is a promise: trade loudness for it as a last resort
        out = out * np.float32(10 ** ((peak_dbtp - peak - 0.05) / 20))
        peak = true_peak_dbtp(out, rate)
    return out, Loudness(round(before, 2), round(measure(out), 2), round(gain, 2), round(peak, 2), limited)


# --- subtitles ------------------------------------------------------------------------------------

def _stamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def srt(cues: Iterable[tuple[float, float, str]]) -> str:
    """SubRip: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`."""
    return "".join(f"{i}\n{_stamp(a, ',')} --> {_stamp(b, ',')}\n{text}\n\n"
                   for i, (a, b, text) in enumerate(cues, 1))


def webvtt(cues: Iterable[tuple[float, float, str]]) -> str:
    """WebVTT: a header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues ("-->" in text would end a cue line)."""
    return "WEBVTT\n\n" + "".join(f"{_stamp(a, '.')} --> {_stamp(b, '.')}\n{text.replace('-->', '->')}\n\n"
                                  for a, b, text in cues)


# --- the M4B ----------------------------------------------------------------------------------------

def write_m4b(path: str, rate: int, parts: Iterable[np.ndarray], chapters: list[tuple[str, int, int]],
              title: str, author: str | None, bitrate: int) -> None:
    """An M4B at local `path`: AAC of the concatenated `parts` (mono float samples at `rate`),
    chapter markers (title, first sample, end sample) and the book's tags."""
    with av.open(path, "w", format="ipod", container_options={"brand": "M4B "}) as container:
        tags = {"title": title, "album": title, "genre": "Audiobook"}
        if author:
            tags.update(artist=author, album_artist=author)
        container.metadata.update(tags)
        container.set_chapters([{"id": i, "start": start, "end": end, "time_base": Fraction(1, rate),
                                 "metadata": {"title": name}} for i, (name, start, end) in enumerate(chapters, 1)])
        stream = container.add_stream("aac", rate=rate, layout="mono")
        stream.bit_rate = bitrate
        pts = 0
        for part in parts:
            for start in range(0, len(part), _BLOCK):
                chunk = np.ascontiguousarray(np.clip(part[None, start:start + _BLOCK], -1, 1), np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = rate, pts, Fraction(1, rate)
                pts += chunk.shape[1]
                container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
