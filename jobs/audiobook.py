"""Audiobooks: books in, chaptered audiobooks out, every sentence synthesized by the bulk job.

    python jobs/audiobook.py jobs/examples/sample_book.md --output books
    ray job submit --working-dir . -- python jobs/audiobook.py s3://b/novel.epub --output s3://b/books

Books are EPUB, Markdown, plain text, or Parquet manifests of books (`jobs/books.py`). Each book's
sentences are written as a text manifest whose ids are content keys (the book, then a hash of the
sentence's text, its voice and the synthesis settings) and synthesized by `run_job` into the book's
sentence store; a second pass retries the sentences that failed. So a re-run synthesizes only what
is missing, and an edit only the sentences whose text changed. Then, under OUTPUT/<book>/:

    <book>.m4b                     AAC with chapter markers and title/author tags
    chapters.json                  chapters in reading order: times, files, loudness, gaps
    chapters/NN-<title>.<fmt>      one audio file per chapter (wav or flac)
    chapters/NN-<title>.srt, .vtt  one cue per sentence
    sentences.parquet              the sentence manifest (id, text, voice, chapter, sentence)
    sentences/                     the sentence store: the bulk job's output (results.parquet, audio/)

Exit status: 0 every book rendered (with --allow-gaps, missing sentences are silent gaps marked
in the subtitles and chapters.json); 1 some sentences could not be synthesized (named on stderr;
without --allow-gaps that book is not assembled); 2 unusable input (a book, the config, the
bundle, the voice, the output, arguments: nothing was synthesized) or results that could not be
written; 130 interrupted (a re-run continues where it stopped).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from actors.audio import decode_audio, encode_audio, silence
from actors.errors import ConfigError, VoxrayError
from actors.rows import OK
from actors.storage import StorageOptions, is_s3, join, write_atomic
from actors.text import split_sentences
from jobs.books import DEFAULT_CHAPTER_REGEX, Book, read_books
from jobs.bulk_synth import JobArgs, JobInterrupted, run_job, setup_cli
from jobs.config import FORMATS, PipelineSpec, load_pipeline
from jobs.mastering import normalize_loudness, srt, webvtt, write_m4b
from jobs.store import OutputStore, latest_per_id, table_bytes

MANIFEST_FILE = "sentences.parquet"
STORE_DIR = "sentences"
CHAPTERS_DIR = "chapters"
CHAPTERS_FILE = "chapters.json"
GAP_S = 1.0
"""Silence standing in for a sentence that could not be synthesized (with --allow-gaps)."""
log = logging.getLogger("voxray.audiobook")


@dataclass
class BookArgs:
    books: list[str]
    output: str
    config: str | None = None
    bundle: str | None = None
    voice: str | None = None
    speakers: str | None = None
    endpoint_url: str | None = None
    chapter_regex: str = DEFAULT_CHAPTER_REGEX
    sentence_pause: float = 0.35
    paragraph_pause: float = 0.8
    chapter_pause: float = 2.0
    target_lufs: float = -18.0
    true_peak: float = -1.0
    max_sentence_chars: int = 300
    chapter_format: str = "flac"
    bitrate: int = 64000
    allow_gaps: bool = False


@dataclass(frozen=True)
class Sentence:
    id: str
    chapter: int
    """1-based, in reading order."""
    paragraph: int
    """Index in `Chapter.spoken()`: the chapter's title (after any part titles), then its paragraphs."""
    index: int
    """1-based within the chapter."""
    text: str
    voice: str | None


@dataclass
class BookReport:
    book: str
    folder: str
    title: str
    author: str | None
    chapters: int
    sentences: int
    reused: int
    """Sentences already in the sentence store (not synthesized again)."""
    synthesized: int
    failed: int
    missing: list[dict]
    """Each sentence without audio: chapter, title, paragraph, sentence, text, error."""
    m4b: str | None = None
    duration_s: float = 0.0


def settings_key(pipeline: PipelineSpec) -> str:
    """What decides how a sentence sounds besides its text and voice: bundle and stage options."""
    settings = [pipeline.family, pipeline.bundle, [(s.class_, s.options) for s in pipeline.stages]]
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def voice_column(pipeline: PipelineSpec, speakers: str | None) -> str:
    """The manifest column a voice goes in: a reference audio URI for voice-cloning pipelines
    (unless a speaker manifest names the voices), else a speaker id of a multi-speaker voice."""
    columns = pipeline.input_columns()
    if "reference_audio" in columns and not speakers:
        return "reference_audio"
    if "speaker_id" in columns:
        return "speaker_id"
    raise ConfigError(f"pipeline {pipeline.source} takes no voice (its stages read {sorted(columns)}); "
                      "drop --voice and the manifest's voices")


def book_folders(books: list[Book]) -> list[str]:
    """A folder name per book from its file name, unique within the run (the same on every run)."""
    names: list[str] = []
    for book in books:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(book.source.rstrip("/")).stem).strip("-.") or "book"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def plan(book: Book, folder: str, settings: str, default_voice: str | None, max_chars: int) -> list[Sentence]:
    """Every sentence of the book in reading order, chapter titles first, with content-keyed ids."""
    out: list[Sentence] = []
    for c, chapter in enumerate(book.chapters, 1):
        voice = chapter.voice or book.voice or default_voice
        index = 0
        for p, paragraph in enumerate(chapter.spoken()):
            for text in split_sentences(paragraph, max_chars):
                if not re.search(r"\w", text):  # "* * *": nothing to say
                    continue
                index += 1
                digest = hashlib.sha256(json.dumps([settings, voice, text]).encode()).hexdigest()[:24]
                out.append(Sentence(f"{folder}/{digest}", c, p, index, text, voice))
    return out


def sentence_manifest(sentences: list[Sentence], column: str | None) -> pa.Table:
    """One row per distinct id (a sentence repeated with the same voice is synthesized once)."""
    first: dict[str, Sentence] = {}
    for s in sentences:
        first.setdefault(s.id, s)
    rows = list(first.values())
    table = {"id": [s.id for s in rows], "text": [s.text for s in rows]}
    if column:
        table[column] = pa.array([s.voice for s in rows], pa.string())
    table["chapter"] = pa.array([s.chapter for s in rows], pa.int32())
    table["sentence"] = pa.array([s.index for s in rows], pa.int32())
    return pa.table(table)


def _local_reference(voice: str | None) -> str | None:
    """A reference audio file that exists, as an absolute path (or an s3:// URI as it is)."""
    if voice is None or is_s3(voice):
        return voice
    path = os.path.abspath(os.path.expanduser(voice))
    if not os.path.isfile(path):
        raise ConfigError(f"voice reference {voice}: not found (a voice-cloning pipeline takes a reference "
                          "audio file as --voice)")
    return path


def synthesize(book_dir: str, manifest: pa.Table, args: BookArgs,
               storage: StorageOptions) -> tuple[dict[str, dict], int, int]:
    """Synthesize the manifest into the book's sentence store, retrying failed rows once.

    Returns the store's result per id of the manifest, and how many rows were reused and synthesized."""
    fs, root = storage.resolve(book_dir)
    write_atomic(fs, join(root, MANIFEST_FILE), table_bytes(manifest))
    job = JobArgs(manifest=join(book_dir, MANIFEST_FILE), output=join(book_dir, STORE_DIR),
                  speakers=args.speakers, bundle=args.bundle, format="flac", config=args.config,
                  endpoint_url=args.endpoint_url)
    summary = run_job(job)
    reused, synthesized = summary.skipped, summary.done_now
    if summary.failed:
        log.warning("%s: %d sentences failed; retrying them once", book_dir, summary.failed)
        synthesized += run_job(job).done_now
    results, _ = OutputStore(job.output, storage).read_results()
    results = latest_per_id(results.select(["id", "status", "error", "audio_uri", "sample_rate"]))
    wanted = set(manifest.column("id").to_pylist())
    return {r["id"]: r for r in results.to_pylist() if r["id"] in wanted}, reused, synthesized


def _read_audio(uri: str, storage: StorageOptions) -> tuple[np.ndarray, int]:
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return decode_audio(f.read(), uri)


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.casefold()).strip("-")[:40].strip("-")


def assemble(book: Book, folder: str, book_dir: str, sentences: list[Sentence], results: dict[str, dict],
             args: BookArgs, storage: StorageOptions) -> tuple[str, float]:
    """Chapter files, subtitles, chapters.json and the M4B of a book whose sentences are synthesized
    (missing ones become marked gaps). Returns the M4B's URI and the book's duration in seconds."""
    fs, root = storage.resolve(book_dir)
    fs.create_dir(join(root, CHAPTERS_DIR), recursive=True)
    rates = {r["sample_rate"] for r in results.values() if r["status"] == OK}
    if len(rates) != 1:
        raise ConfigError(f"{book.source}: sentences have sample rates {sorted(rates)}; one is needed")
    rate = int(rates.pop())
    width = max(2, len(str(len(book.chapters))))
    by_chapter: dict[int, list[Sentence]] = defaultdict(list)
    for s in sentences:
        by_chapter[s.chapter].append(s)
    entries, written = [], set()
    for c, chapter in enumerate(book.chapters, 1):
        pieces: list[np.ndarray] = []
        cues: list[tuple[float, float, str]] = []
        gaps: list[dict] = []
        at, previous = 0, None
        for s in by_chapter[c]:
            if previous is not None:
                pause = args.paragraph_pause if s.paragraph != previous else args.sentence_pause
                pieces.append(silence(pause, rate))
                at += len(pieces[-1])
            previous = s.paragraph
            row = results.get(s.id)
            if row and row["status"] == OK:
                audio, got = _read_audio(row["audio_uri"], storage)
                if got != rate:
                    raise ConfigError(f"{row['audio_uri']}: sample rate {got}, expected {rate}")
                text = s.text
            else:
                audio, text = silence(GAP_S, rate), f"[missing: {s.text}]"
                gaps.append({"paragraph": s.paragraph, "sentence": s.index, "text": s.text,
                             "error": row["error"] if row else "no result"})
            pieces.append(audio)
            cues.append((at / rate, (at + len(audio)) / rate, text))
            at += len(audio)
        mastered, loudness = normalize_loudness(np.concatenate(pieces), rate, args.target_lufs, args.true_peak)
        stem = f"{CHAPTERS_DIR}/{c:0{width}d}" + (f"-{_slug(chapter.title)}" if _slug(chapter.title) else "")
        files = {"audio": f"{stem}.{args.chapter_format}", "srt": f"{stem}.srt", "vtt": f"{stem}.vtt"}
        write_atomic(fs, join(root, files["audio"]), encode_audio(mastered, rate, args.chapter_format))
        write_atomic(fs, join(root, files["srt"]), srt(cues).encode())
        write_atomic(fs, join(root, files["vtt"]), webvtt(cues).encode())
        written |= {Path(f).name for f in files.values()}
        entries.append({"index": c, "title": chapter.title, "samples": len(mastered), **files,
                        "sentences": len(cues), "loudness": asdict(loudness), "gaps": gaps})
        log.info("%s: chapter %d %r: %.1f s, %s LUFS (target %.1f), true peak %s dBTP", folder, c, chapter.title,
                 len(mastered) / rate, loudness.output_lufs, args.target_lufs, loudness.true_peak_dbtp)
    _remove_stale(fs, join(root, CHAPTERS_DIR), written)
    pause = int(round(args.chapter_pause * rate))
    start, markers = 0, []
    for k, e in enumerate(entries):
        end = start + e["samples"] + (pause if k + 1 < len(entries) else 0)
        markers.append((e["title"], start, end))
        e.update(start_s=round(start / rate, 3), end_s=round(end / rate, 3),
                 duration_s=round(e.pop("samples") / rate, 3))
        start = end

    def parts() -> Iterator[np.ndarray]:  # chapter files read back one at a time: bounded memory
        for k, e in enumerate(entries):
            if k:
                yield silence(args.chapter_pause, rate)
            yield _read_audio(join(book_dir, e["audio"]), storage)[0]

    m4b = f"{folder}.m4b"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, m4b)
        write_m4b(local, rate, parts(), markers, book.title, book.author, args.bitrate)
        write_atomic(fs, join(root, m4b), Path(local).read_bytes())
    index = {"title": book.title, "author": book.author, "source": book.source, "m4b": m4b,
             "sample_rate": rate, "duration_s": round(start / rate, 3), "target_lufs": args.target_lufs,
             "true_peak_limit_dbtp": args.true_peak, "chapters": entries}
    write_atomic(fs, join(root, CHAPTERS_FILE), json.dumps(index, indent=2).encode())
    return join(book_dir, m4b), start / rate


def _remove_stale(fs: pafs.FileSystem, folder: str, keep: set[str]) -> None:
    """Chapter files of an earlier render that this one did not write (chapters renamed or removed)."""
    for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name not in keep and not info.base_name.startswith("."):
            fs.delete_file(info.path)


def _describe(missing: dict) -> str:
    return (f"chapter {missing['chapter']} {missing['title']!r}, sentence {missing['sentence']} "
            f"(paragraph {missing['paragraph']}): {missing['text']!r}: {missing['error']}")


def render_book(book: Book, folder: str, column: str | None, args: BookArgs, pipeline: PipelineSpec,
                storage: StorageOptions) -> BookReport:
    """Synthesize what is missing of one book, then assemble it (unless sentences are missing and
    gaps are not allowed). One render of a book at a time: it holds OUTPUT/<book>/_voxray.lock."""
    book_dir = join(args.output, folder)
    sentences = plan(book, folder, settings_key(pipeline), args.voice, args.max_sentence_chars)
    manifest = sentence_manifest(sentences, column)
    with OutputStore(book_dir, storage).lock(f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"):
        results, reused, synthesized = synthesize(book_dir, manifest, args, storage)
        missing = [{"chapter": s.chapter, "title": book.chapters[s.chapter - 1].title, "paragraph": s.paragraph,
                    "sentence": s.index, "text": s.text,
                    "error": (results.get(s.id) or {}).get("error") or "no result was produced"}
                   for s in sentences if (results.get(s.id) or {}).get("status") != OK]
        report = BookReport(book.source, book_dir, book.title, book.author, len(book.chapters), len(sentences),
                            reused, synthesized, manifest.num_rows - reused - synthesized, missing)
        if missing and (not args.allow_gaps or len(missing) == len(sentences)):
            return report
        report.m4b, duration = assemble(book, folder, book_dir, sentences, results, args, storage)
        report.duration_s = round(duration, 2)
    return report


def run_books(args: BookArgs) -> list[BookReport]:
    """Render every book; VoxrayError before any work if a book, the config, a voice or the output
    is unusable; JobInterrupted on Ctrl-C (what finished is kept)."""
    storage = StorageOptions.from_env(args.endpoint_url)
    pipeline = load_pipeline(args.config).with_overrides(args.bundle)
    if args.chapter_format not in FORMATS:
        raise ConfigError(f"chapter format must be one of {list(FORMATS)}, got {args.chapter_format!r}")
    books = read_books(args.books, storage, args.chapter_regex)
    voiced = args.voice or any(b.voice or any(c.voice for c in b.chapters) for b in books)
    column = voice_column(pipeline, args.speakers) if voiced else None
    if column == "reference_audio":  # workers do not share the driver's working directory
        args.voice = _local_reference(args.voice)
        for book in books:
            book.voice = _local_reference(book.voice)
            for chapter in book.chapters:
                chapter.voice = _local_reference(chapter.voice)
    folders = book_folders(books)
    for folder in folders:
        OutputStore(join(args.output, folder), storage).check_writable()
    return [render_book(book, folder, column, args, pipeline, storage) for book, folder in zip(books, folders)]


def _non_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None) -> BookArgs:
    p = argparse.ArgumentParser(prog="audiobook", description=__doc__.splitlines()[0])
    p.add_argument("books", nargs="+", metavar="BOOK",
                   help="EPUB, Markdown (.md), plain text (.txt) or a Parquet manifest of books "
                        "(path, optional title, author, voice, chapter_voices); local or s3://")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix (a folder per book)")
    p.add_argument("--config", help="pipeline YAML: a path or a name under configs/ (default: vits)")
    p.add_argument("--bundle", help="bundle dir, s3:// prefix, or 'default' (default: from the config)")
    p.add_argument("--voice", help="a reference audio file or URI for voice-cloning pipelines (e.g. "
                                   "chatterbox-cpu), or a speaker id of a multi-speaker voice or of --speakers")
    p.add_argument("--speakers", help="speaker manifest Parquet (speaker_id, audio_uri) the voices name")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL_S3 or "
                                          "$AWS_ENDPOINT_URL); credentials from the standard AWS variables")
    p.add_argument("--chapter-regex", default=DEFAULT_CHAPTER_REGEX,
                   help="plain text: a line matching this (multiline, case-insensitive) starts a chapter "
                        "(default: 'Chapter 12', 'CHAPTER IV', 'Chapter One')")
    p.add_argument("--sentence-pause", type=_non_negative, default=BookArgs.sentence_pause,
                   help="seconds between sentences")
    p.add_argument("--paragraph-pause", type=_non_negative, default=BookArgs.paragraph_pause,
                   help="seconds between paragraphs")
    p.add_argument("--chapter-pause", type=_non_negative, default=BookArgs.chapter_pause,
                   help="seconds between chapters (M4B)")
    p.add_argument("--target-lufs", type=float, default=BookArgs.target_lufs, help="integrated loudness per chapter")
    p.add_argument("--true-peak", type=float, default=BookArgs.true_peak, help="true-peak ceiling in dBTP")
    p.add_argument("--max-sentence-chars", type=int, default=BookArgs.max_sentence_chars,
                   help="longer sentences are cut at clauses, then words")
    p.add_argument("--chapter-format", choices=FORMATS, default=BookArgs.chapter_format,
                   help="chapter audio files")
    p.add_argument("--bitrate", type=int, default=BookArgs.bitrate, help="AAC bit rate of the M4B")
    p.add_argument("--allow-gaps", action="store_true",
                   help="assemble books even if some sentences could not be synthesized (silent gaps, marked)")
    args = p.parse_args(argv)
    if not -70 < args.target_lufs < 0 or args.true_peak > 0 or args.max_sentence_chars < 20 or args.bitrate < 8000:
        p.error("need -70 < --target-lufs < 0, --true-peak <= 0, --max-sentence-chars >= 20, --bitrate >= 8000")
    return BookArgs(**vars(args))


def main(argv: list[str] | None = None) -> int:
    setup_cli()
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        reports = run_books(args)
    except VoxrayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (JobInterrupted, KeyboardInterrupt):
        print("interrupted: finished sentences are kept; run again to continue", file=sys.stderr)
        return 130
    print(json.dumps({"books": [asdict(r) for r in reports], "wall_seconds": round(time.perf_counter() - start, 2)},
                     indent=2))
    code = 0
    for r in reports:
        if not r.missing:
            continue
        shown = "\n  ".join(_describe(m) for m in r.missing[:20])
        more = f"\n  ... and {len(r.missing) - 20} more" if len(r.missing) > 20 else ""
        if r.m4b:
            print(f"warning: {r.book}: {len(r.missing)} sentences are silent gaps:\n  {shown}{more}", file=sys.stderr)
        else:
            code = 1
            print(f"error: {r.book}: {len(r.missing)} sentences could not be synthesized, so the book was not "
                  f"assembled (--allow-gaps assembles it with marked gaps):\n  {shown}{more}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
