"""jobs/audiobook.py on a real local Ray cluster: EPUB and Markdown books to chaptered audiobooks,
resumed after a killed driver, re-rendered after an edit, failed sentences, bad inputs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import jiwer
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyloudnorm
import pytest
import soundfile as sf

from jobs.audiobook import main
from jobs.mastering import true_peak_dbtp
from jobs.store import PARTS_DIR
from tests.test_vits import _transcribe

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "test.yaml")
EPUB_CHAPTERS = {
    "The Garden": ["The garden was green and quiet in the morning.<sup><a epub:type=\"noteref\" href=\"#n1\">1</a>"
                   "</sup> Birds sang in the old apple tree (https://example.com/garden)."],
    "The River": ["The river ran fast after the rain.", "A small boat waited by the bridge."],
    "The Hill": ["We climbed the hill before dinner. From the top we could see the whole town."],
}
SAMPLE_BOOK = REPO / "jobs" / "examples" / "sample_book.md"
SAMPLE_CHAPTERS = ["The Lighthouse Keeper's Cat", "Chapter One: The Storm", "Chapter Two: The Visitor",
                   "Chapter Three: Morning"]


def summary(text: str) -> dict:
    """The JSON summary main() prints (Ray may print other lines around it)."""
    return json.JSONDecoder().raw_decode(text, text.index('{\n  "books"'))[0]


def make_epub(path: Path) -> None:
    from ebooklib import epub

    book = epub.EpubBook()
    book.set_identifier("voxray-test-book")
    book.set_title("The Test Book")
    book.set_language("en")
    book.add_author("Ada Tester")

    def page(name: str, title: str, body: str) -> epub.EpubHtml:
        item = epub.EpubHtml(title=title, file_name=name, lang="en")
        item.content = f"<html><body>{body}</body></html>"
        book.add_item(item)
        return item

    cover = page("title.xhtml", "The Test Book", "<h1>The Test Book</h1><p>By Ada Tester.</p>")
    rights = page("copyright.xhtml", "Copyright", "<p>Copyright is not read aloud.</p>")
    chapters = [page(f"c{i}.xhtml", title, f"<h1>{title}</h1>" + "".join(f"<p>{p}</p>" for p in paragraphs)
                     + ('<aside epub:type="footnote" id="n1"><p>This footnote must never be read.</p></aside>'
                        if i == 1 else ""))
                for i, (title, paragraphs) in enumerate(EPUB_CHAPTERS.items(), 1)]
    book.toc = [epub.Link("copyright.xhtml", "Copyright", "rights"),
                *(epub.Link(c.file_name, c.title, f"c{i}") for i, c in enumerate(chapters, 1))]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = [cover, "nav", rights, *chapters]
    epub.write_epub(str(path), book)


def cue_times(text: str, sep: str) -> list[tuple[float, float]]:
    def seconds(stamp: str) -> float:
        h, m, s = stamp.replace(sep, ".").split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    stamp = rf"\d\d:\d\d:\d\d{sep}\d{{3}}"
    return [(seconds(a), seconds(b)) for a, b in re.findall(rf"({stamp}) --> ({stamp})", text)]


def check_book(folder: Path, titles: list[str], title: str, author: str) -> dict:
    """The M4B's chapters and tags, the chapter files, subtitles and loudness of a rendered book."""
    index = json.loads((folder / "chapters.json").read_text())
    with av.open(str(folder / index["m4b"])) as m4b:
        marks = m4b.chapters()
        assert [c["metadata"]["title"] for c in marks] == titles
        assert m4b.metadata["title"] == title and m4b.metadata["artist"] == author
        assert m4b.streams.audio[0].codec_context.name == "aac"
        starts = [float(c["start"] * c["time_base"]) for c in marks]
        assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:]))
        assert abs(m4b.duration / 1e6 - index["duration_s"]) < 0.2
    assert [c["title"] for c in index["chapters"]] == titles
    for chapter, start in zip(index["chapters"], starts):
        assert abs(chapter["start_s"] - start) < 0.01
        audio, rate = sf.read(folder / chapter["audio"], dtype="float32")
        duration = len(audio) / rate
        assert abs(duration - chapter["duration_s"]) < 0.01
        srt = cue_times((folder / chapter["srt"]).read_text(), ",")
        vtt = cue_times((folder / chapter["vtt"]).read_text(), ".")
        assert (folder / chapter["vtt"]).read_text().startswith("WEBVTT")
        assert len(srt) == len(vtt) == chapter["sentences"] and srt == vtt
        flat = [t for cue in srt for t in cue]
        assert all(a <= b for a, b in zip(flat, flat[1:])) and srt[0][0] == 0 and all(a < b for a, b in srt)
        assert flat[-1] <= duration + 0.001
        if len(chapter["gaps"]) == chapter["sentences"]:  # nothing but gaps: silence, nothing to measure
            assert not audio.any() and chapter["loudness"]["output_lufs"] is None
            continue
        loudness = pyloudnorm.Meter(rate).integrated_loudness(audio.astype(np.float64))
        assert abs(loudness - index["target_lufs"]) <= 1.0, (chapter["title"], loudness)
        assert abs(loudness - chapter["loudness"]["output_lufs"]) < 0.1
        assert true_peak_dbtp(audio, rate) <= index["true_peak_limit_dbtp"] + 0.1
    return index


def test_epub_to_a_chaptered_audiobook(ray_cluster, tmp_path, capsys):
    make_epub(tmp_path / "test-book.epub")
    out = tmp_path / "out"
    assert main([str(tmp_path / "test-book.epub"), "--output", str(out), "--config", CONFIG]) == 0
    report = summary(capsys.readouterr().out)["books"][0]
    assert (report["title"], report["author"], report["chapters"]) == ("The Test Book", "Ada Tester", 3)
    assert report["reused"] == 0 and report["synthesized"] == report["sentences"] and not report["missing"]
    folder = out / "test-book"
    index = check_book(folder, list(EPUB_CHAPTERS), "The Test Book", "Ada Tester")
    spoken = pq.read_table(folder / "sentences.parquet").column("text").to_pylist()
    assert spoken[:3] == ["The Garden", "The garden was green and quiet in the morning.",
                          "Birds sang in the old apple tree."]
    assert not [s for s in spoken if re.search(r"http|example|footnote|copyright|\[|\d", s, re.I)]
    # what was said is what the book says
    audio, rate = sf.read(folder / index["chapters"][0]["audio"], dtype="float32")
    words = "the garden the garden was green and quiet in the morning birds sang in the old apple tree"
    assert jiwer.wer(words, _transcribe(audio, rate)) <= 0.5


def test_markdown_resumes_after_a_killed_driver_and_redoes_only_edited_text(ray_cluster, tmp_path, capsys, caplog):
    """The sample book of the README, as a copy that is then edited."""
    book = tmp_path / "cat.md"
    text = SAMPLE_BOOK.read_text()
    book.write_text(text)
    out = tmp_path / "out"
    store = out / "cat" / "sentences"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, str(REPO / "jobs" / "audiobook.py"), str(book), "--output",
                                   str(out), "--config", CONFIG], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list((store / PARTS_DIR).glob("part-*.parquet")):  # some sentences are written: kill it now
        assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not (store / "results.parquet").exists(), "the book finished before its driver could be killed"
    done = {r["id"]: r["audio_uri"] for part in (store / PARTS_DIR).glob("part-*.parquet")
            for r in pq.read_table(part).to_pylist() if r["status"] == "ok"}
    stamps = {uri: os.stat(uri).st_mtime_ns for uri in done.values()}
    rows = pq.read_table(out / "cat" / "sentences.parquet").num_rows
    assert 0 < len(done) < rows

    assert main([str(book), "--output", str(out), "--config", CONFIG]) == 0
    report = summary(capsys.readouterr().out)["books"][0]
    assert (report["reused"], report["synthesized"]) == (len(done), rows - len(done))
    assert {uri: os.stat(uri).st_mtime_ns for uri in done.values()} == stamps
    check_book(out / "cat", SAMPLE_CHAPTERS, "The Lighthouse Keeper's Cat", "The voxray authors")

    # one paragraph edited: only its changed sentences are synthesized
    book.write_text(text.replace("His cat, a grey and patient animal, watched the door.",
                                 "His cat was grey and patient. It watched the door."))
    assert main([str(book), "--output", str(out), "--config", CONFIG]) == 0
    report = summary(capsys.readouterr().out)["books"][0]
    assert (report["reused"], report["synthesized"]) == (rows - 1, 2)

    # a chapter whose voice cannot speak: retried, named, and assembled only with --allow-gaps
    manifest = tmp_path / "books.parquet"
    pq.write_table(pa.table({"path": ["cat.md"], "title": ["The Cat, Revised"],
                             "chapter_voices": pa.array([[None, None, "nobody"]], pa.list_(pa.string()))}), manifest)
    (out / "cat" / "cat.m4b").unlink()
    assert main([str(manifest), "--output", str(out), "--config", CONFIG]) == 1
    err = capsys.readouterr().err
    assert "5 sentences could not be synthesized" in err and "--allow-gaps" in err
    assert "chapter 3 'Chapter Two: The Visitor', sentence 2 (paragraph 1): 'Near midnight there was a knock.'" in err
    assert "unknown speaker 'nobody'" in err and not (out / "cat" / "cat.m4b").exists()
    assert "5 sentences failed; retrying them once" in caplog.text
    assert main([str(manifest), "--output", str(out), "--config", CONFIG, "--allow-gaps"]) == 0
    index = check_book(out / "cat", SAMPLE_CHAPTERS, "The Cat, Revised", "The voxray authors")
    assert [len(c["gaps"]) for c in index["chapters"]] == [0, 0, 5, 0]
    assert "[missing: Near midnight there was a knock.]" in (out / "cat" / index["chapters"][2]["vtt"]).read_text()


def test_unusable_books_are_named_before_any_work(tmp_path, capsys):
    (tmp_path / "broken.epub").write_bytes(b"PK\x03\x04 this is not a zip archive")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "empty.md").write_text("# Title\n\n## Chapter\n\n```\ncode only\n```\n")
    (tmp_path / "latin1.txt").write_bytes("Chapter 1\n\nCaf\xe9 au lait.".encode("latin-1"))
    pq.write_table(pa.table({"file": ["a.md"]}), tmp_path / "books.parquet")
    out = tmp_path / "out"
    for name, message in [("broken.epub", "broken.epub: not a readable EPUB"),
                          ("missing.md", "missing.md: not found"),
                          ("notes.pdf", "notes.pdf: unknown kind of book"),
                          ("empty.md", "empty.md: no text to read aloud"),
                          ("latin1.txt", "latin1.txt: not UTF-8 text"),
                          ("books.parquet", "books.parquet: missing column 'path'")]:
        assert main([str(tmp_path / name), "--output", str(out), "--config", CONFIG]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: "), err
    (tmp_path / "fine.md").write_text("Nothing wrong with this book.")
    assert main([str(tmp_path / "fine.md"), "--output", str(out), "--config", "chatterbox-cpu", "--bundle",
                 str(tmp_path / "cb"), "--voice", str(tmp_path / "narrator.wav")]) == 2
    assert f"voice reference {tmp_path / 'narrator.wav'}: not found" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "empty.md"), "--output", str(out), "--target-lufs", "3"])
    assert stopped.value.code == 2


def test_books_in_and_audiobooks_out_on_s3(ray_cluster, s3_env, s3_client, tmp_path, capsys):
    bucket = s3_env["bucket"]
    s3_client.put_object(Bucket=bucket, Key="in/tiny.txt",
                         Body=b"Tiny\nby Cy Short\n\nChapter 1\n\nOne small step.\n\nChapter 2\n\nThe end.\n")
    pq.write_table(pa.table({"path": ["tiny.txt"]}), tmp_path / "books.parquet")
    s3_client.upload_file(str(tmp_path / "books.parquet"), bucket, "in/books.parquet")
    args = ["--output", f"s3://{bucket}/out", "--config", CONFIG, "--endpoint-url", s3_env["endpoint"]]
    assert main([f"s3://{bucket}/in/books.parquet", *args]) == 0
    report = summary(capsys.readouterr().out)["books"][0]
    assert (report["title"], report["author"], report["chapters"], report["sentences"]) == \
        ("Tiny", "Cy Short", 2, 4)
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/tiny/")["Contents"]}
    assert {"out/tiny/tiny.m4b", "out/tiny/chapters.json", "out/tiny/chapters/01-chapter-1.flac",
            "out/tiny/chapters/02-chapter-2.vtt", "out/tiny/sentences/results.parquet"} <= keys
    s3_client.download_file(bucket, "out/tiny/tiny.m4b", str(tmp_path / "tiny.m4b"))
    with av.open(str(tmp_path / "tiny.m4b")) as m4b:
        assert [c["metadata"]["title"] for c in m4b.chapters()] == ["Chapter 1", "Chapter 2"]
