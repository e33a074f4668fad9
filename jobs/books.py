"""Books in: EPUB, Markdown, plain text, or a Parquet manifest of books, read into chapters of paragraphs.

- **EPUB** (ebooklib): chapters follow the table of contents in spine order (an entry pointing into
  a file at an anchor starts its chapter there); files outside the contents continue the chapter
  before them, and those before the first entry (cover, title page) are front matter and skipped,
  as are entries titled like front matter (cover, title page, copyright, contents), the navigation
  document and non-linear files. Without a table of contents every spine file is a chapter.
- **Markdown** (markdown-it-py): chapters start at the top heading level; a single heading of that
  level opening the file is the book's title instead, and a level whose headings hold no text of
  their own ("# Part One" then "## Chapter 1") groups chapters: they start one level deeper. YAML
  front matter may give `title` and `author`.
- **Plain text**: chapters start at lines matching a regex (default: "Chapter 12", "CHAPTER IV",
  "Chapter One"); paragraphs are separated by blank lines; the first line before the first
  chapter is the title and a following "by ..." line the author.
- **Parquet**: one row per book: `path` (relative to the manifest's folder, or absolute, or
  s3://), optional `title`, `author`, `voice` and `chapter_voices` (a list: the voice of chapter
  1, 2, ... in reading order; null entries use the book's).

What is not read aloud: markup, code blocks, footnote markers, footnote bodies and other asides,
page-break markers, URLs. A chapter without text (a "Part One" page) is read at the start of the next chapter, before
its title; a last one is dropped. Anything unreadable is a `BookError` naming the file.
"""
from __future__ import annotations

import io
import logging
import posixpath
import re
from dataclasses import dataclass, field, replace
from html.parser import HTMLParser
from pathlib import PurePosixPath
from urllib.parse import unquote, urldefrag

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from actors.errors import VoxrayError
from actors.storage import StorageOptions, is_s3, join
from actors.text import normalize_text

DEFAULT_CHAPTER_REGEX = (r"^[ \t]*chapter[ \t]+(?:\d+|[ivxlcdm]+\b|(?:one|two|three|four|five|six|seven|eight|nine|"
                         r"ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen|"
                         r"twenty|thirty|forty|fifty)\b)[^\n]*$")
SUFFIXES = {".epub": "epub", ".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text",
            ".parquet": "parquet"}
BOOK_COLUMNS = ("path", "title", "author", "voice", "chapter_voices")
log = logging.getLogger("voxray.books")

_URL = re.compile(r"<?\b(?:https?://|ftp://|www\.)[^\s<>\"]*[^\s<>\".,;:!?)\]'>]>?", re.I)
_FOOTNOTE_MARK = re.compile(r"\[(?:\^[^\]\s]+|\d{1,3}|[a-z]|\*)\]|[\u00b9\u00b2\u00b3\u2070-\u2079]+")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
_SPACE_BEFORE_MARK = re.compile(r"\s+([.,;:!?)\]])")
_MARKER_TEXT = re.compile(r"^\s*(?:\[[^\]]{1,4}\]|\(\d{1,3}\)|\d{1,3}|[*\u2020\u2021]{1,3})\s*$")
_MD_FOOTNOTE_BODY = re.compile(r"^\[\^[^\]]+\]:.*(?:\n(?:[ \t]+.*)?)*?(?=\n\S|\Z)", re.M)
_FRONT_MATTER = re.compile(r"^(?:cover|title(?: page)?|half[- ]title|copyright(?: page)?|contents|"
                           r"table of contents|toc|imprint|colophon)$", re.I)
_BYLINE = re.compile(r"^\s*(?:by|author:)\s+(.{1,100}?)\s*$", re.I)
_BLOCKS = {"p", "div", "li", "blockquote", "dd", "dt", "td", "th", "caption", "section", "article", "header",
           "footer", "main", "body", "tr", "ul", "ol", "dl", "table", "figcaption", "hr",
           "h1", "h2", "h3", "h4", "h5", "h6"}
_SKIPPED = {"script", "style", "head", "title", "nav", "pre", "svg", "math", "rt", "rp", "aside", "template"}
_SKIPPED_TYPES = {"noteref", "footnote", "footnotes", "endnote", "endnotes", "rearnote", "rearnotes",
                  "pagebreak", "toc", "landmarks", "page-list"}
_MARKER_TAGS = {"sup", "a"}
"""Elements that may be footnote markers: dropped when all they hold is one ("1", "[2]", "*")."""


class BookError(VoxrayError):
    """A book cannot be read or holds nothing to read aloud; the message names the file."""


@dataclass
class Chapter:
    title: str
    paragraphs: list[str]
    """Clean text of each paragraph in reading order (the title not included)."""
    voice: str | None = None
    parts: list[str] = field(default_factory=list)
    """Titles of the text-less chapters before this one ("Part One"), read before its title."""

    def spoken(self) -> list[str]:
        """Everything read aloud, in order: part titles, the title, the paragraphs."""
        return [*self.parts, self.title, *self.paragraphs]


@dataclass
class Book:
    source: str
    title: str
    author: str | None
    chapters: list[Chapter]
    voice: str | None = None
    """The book's voice, if its manifest row gives one (chapters may override it)."""


@dataclass
class _Block:
    text: str = ""
    level: int = 0
    """Heading level 1-6; 0 for a paragraph."""
    anchors: list[str] = field(default_factory=list)
    """Element ids that start at or before this block (since the previous block)."""


def clean_text(text: str) -> str:
    """Text as it should be spoken: no URLs, no footnote markers, normalized (`normalize_text`)."""
    text = _EMPTY_BRACKETS.sub("", _FOOTNOTE_MARK.sub("", _URL.sub("", text)))
    return _SPACE_BEFORE_MARK.sub(r"\1", normalize_text(text))


class _HtmlText(HTMLParser):
    """Blocks of readable text from (X)HTML: headings and paragraphs, with the ids seen before each."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[_Block] = []
        self._open: list[tuple[str, bool]] = []  # (tag, skipped)
        self._skipping = 0
        self._buffers: list[list[str]] = [[]]  # a nested buffer per open marker-capable element
        self._level = 0
        self._anchors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in _BLOCKS:  # an id on a block marks where that block starts, not the text before it
            self._flush()
        if a.get("id"):
            self._anchors.append(a["id"])
        if tag in ("br", "img", "hr", "wbr", "meta", "link", "input"):  # void elements: no end tag
            if tag == "br":
                self._buffers[-1].append(" ")
            return
        types = set(a.get("epub:type", "").split()) | {r.removeprefix("doc-") for r in a.get("role", "").split()}
        skipped = tag in _SKIPPED or bool(types & _SKIPPED_TYPES) or "hidden" in a
        self._open.append((tag, skipped))
        self._skipping += skipped
        if tag[0] == "h" and tag[1:].isdigit():
            self._level = int(tag[1:])
        elif tag in _MARKER_TAGS:
            self._buffers.append([])

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in _BLOCKS:
            self._flush()
        if a.get("id"):
            self._anchors.append(a["id"])
        if tag == "br":
            self._buffers[-1].append(" ")

    def handle_endtag(self, tag: str) -> None:
        if not any(t == tag for t, _ in self._open):
            return  # a stray end tag
        while self._open:
            name, skipped = self._open.pop()
            self._skipping -= skipped
            if name in _MARKER_TAGS:
                inner = "".join(self._buffers.pop())
                if not _MARKER_TEXT.match(inner):
                    self._buffers[-1].append(inner)
            if name == tag:
                break
        if tag in _BLOCKS:
            self._flush()
            self._level = 0

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._buffers[-1].append(data)

    def _flush(self) -> None:
        text = clean_text("".join(self._buffers[0]))
        self._buffers[0] = []
        if text or self._anchors:
            self.blocks.append(_Block(text, self._level if text else 0, self._anchors))
            self._anchors = []

    def close(self) -> None:
        super().close()
        while len(self._buffers) > 1:  # unclosed marker-capable elements keep their text
            inner = "".join(self._buffers.pop())
            self._buffers[-1].append(inner)
        self._flush()


def html_blocks(html: str) -> list[_Block]:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return parser.blocks


def _key(text: str) -> str:
    return re.sub(r"\W+", " ", text).casefold().strip()


def _chapter(title: str, blocks: list[_Block]) -> Chapter:
    """A chapter of `blocks`' text; a leading heading that repeats the title is not read twice."""
    texts = [b for b in blocks if b.text]
    if texts and texts[0].level and _key(texts[0].text) == _key(title):
        texts = texts[1:]
    return Chapter(title, [b.text for b in texts])


def _settle(chapters: list[Chapter], source: str) -> list[Chapter]:
    """Chapters with text: an empty one's title is read at the start of the next; a last empty one is dropped."""
    out: list[Chapter] = []
    carried: list[str] = []
    for chapter in chapters:
        if not chapter.paragraphs:
            carried += [*chapter.parts, chapter.title]
            continue
        out.append(replace(chapter, parts=[*carried, *chapter.parts]))
        carried = []
    if carried:
        log.info("%s: dropped trailing chapters without text: %s", source, carried)
    if not out:
        raise BookError(f"{source}: no text to read aloud was found")
    return out


# --- EPUB -----------------------------------------------------------------------------------------

def _flat_toc(entries, out: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(href, title) of every table-of-contents entry, depth first, as ebooklib nests them."""
    for entry in entries:
        if isinstance(entry, (tuple, list)):
            section, children = entry
            if getattr(section, "href", None):
                out.append((section.href, section.title))
            _flat_toc(children, out)
        elif getattr(entry, "href", None):
            out.append((entry.href, entry.title))
    return out


def parse_epub(data: bytes, source: str) -> Book:
    import ebooklib
    from ebooklib import epub

    try:
        book = epub.read_epub(io.BytesIO(data), {"ignore_ncx": True})
        docs = []
        for idref, linear in book.spine:
            item = book.get_item_with_id(idref)
            if item is None or item.get_type() != ebooklib.ITEM_DOCUMENT or linear == "no" \
                    or isinstance(item, epub.EpubNav) or "nav" in (getattr(item, "properties", None) or []):
                continue
            docs.append((posixpath.normpath(item.get_name()), item.get_content().decode("utf-8", "replace")))
        toc = _flat_toc(book.toc, [])
        title = " ".join(v for v, _ in book.get_metadata("DC", "title")) or None
        author = ", ".join(v for v, _ in book.get_metadata("DC", "creator")) or None
    except Exception as e:  # noqa: BLE001 - ebooklib raises zip, XML, KeyError and its own errors alike
        raise BookError(f"{source}: not a readable EPUB ({type(e).__name__}: {e})") from None
    entries: dict[str, list[tuple[str, str]]] = {}
    for href, entry_title in toc:
        path, anchor = urldefrag(unquote(href))
        entries.setdefault(posixpath.normpath(path), []).append((anchor, normalize_text(entry_title or "")))
    by_name = {PurePosixPath(p).name: p for p in entries}
    chapters: list[Chapter] = []
    current: tuple[str, list[_Block]] | None = None
    skipped: list[str] = []
    for name, html in docs:
        targets = entries.get(name) or entries.get(by_name.get(PurePosixPath(name).name, ""), [])
        blocks = html_blocks(html)
        if not toc:  # no contents: each file is a chapter, named by its first heading
            heading = next((b.text for b in blocks if b.level and b.text), f"Chapter {len(chapters) + 1}")
            chapters.append(_chapter(heading, blocks))
            continue
        if not targets:
            if current is None:
                skipped.append(name)
            else:
                current[1].extend(blocks)
            continue
        starts = {anchor: i for i, b in enumerate(blocks) for anchor in b.anchors}
        cuts = sorted((starts.get(anchor, 0) if anchor else 0, t) for anchor, t in targets)
        if current is not None:
            current[1].extend(blocks[:cuts[0][0]])
        for k, (at, entry_title) in enumerate(cuts):
            if current is not None:
                chapters.append(_chapter(*current))
            end = cuts[k + 1][0] if k + 1 < len(cuts) else len(blocks)
            current = (entry_title, blocks[at:end])
    if current is not None:
        chapters.append(_chapter(*current))
    front = [c.title for c in chapters if _FRONT_MATTER.match(c.title)]
    if skipped or front:
        log.info("%s: skipped front matter: %s", source, skipped + front)
    chapters = [c for c in chapters if not _FRONT_MATTER.match(c.title)]
    return Book(source, title or _title_from(source), author, _settle(chapters, source))


# --- Markdown and plain text ----------------------------------------------------------------------

def _front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"\A---[ \t]*\n(.*?)\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", text, re.S)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}, text
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


def parse_markdown(text: str, source: str) -> Book:
    from markdown_it import MarkdownIt

    meta, body = _front_matter(text)
    blocks = [b for b in html_blocks(MarkdownIt("commonmark").render(_MD_FOOTNOTE_BODY.sub("", body))) if b.text]
    title, author = meta.get("title"), meta.get("author")
    levels = [b.level for b in blocks if b.level]
    top = min(levels, default=0)
    if top and levels.count(top) == 1 and blocks[0].level == top:  # "# Book title", then "## Chapter"
        title = title or blocks[0].text
        blocks = blocks[1:]
        if blocks and not blocks[0].level and (by := _BYLINE.match(blocks[0].text)):
            author = author or by.group(1)
            blocks = blocks[1:]
    title = str(title) if title else _title_from(source)
    levels = sorted({b.level for b in blocks if b.level})
    top = levels[0] if levels else 0
    # headings with no text of their own ("# Part One" then "## Chapter 1") group chapters: go one deeper
    while levels and top != levels[-1] and all(k + 1 < len(blocks) and blocks[k + 1].level
                                    for k, b in enumerate(blocks) if b.level == top):
        top = levels[levels.index(top) + 1]
    chapters: list[Chapter] = []
    lead: list[_Block] = []
    for block in blocks:
        if 0 < block.level <= top:  # a part heading becomes a text-less chapter, read before the next
            chapters.append(Chapter(block.text, []))
        elif chapters:
            chapters[-1].paragraphs.append(block.text)
        else:
            lead.append(block)
    if lead:  # text before the first chapter heading opens the book under its title
        chapters.insert(0, Chapter(title, [b.text for b in lead]))
    return Book(source, title, str(author) if author else None, _settle(chapters, source))


def _paragraphs(text: str) -> list[str]:
    return [p for p in (clean_text(chunk) for chunk in re.split(r"\n[ \t]*\n", text)) if p]


def parse_text(text: str, source: str, chapter_regex: str = DEFAULT_CHAPTER_REGEX) -> Book:
    try:
        pattern = re.compile(chapter_regex, re.M | re.I)
    except re.error as e:
        raise BookError(f"chapter regex {chapter_regex!r} is not a valid regular expression ({e})") from None
    text = text.replace("\r\n", "\n")
    marks = [m for m in pattern.finditer(text) if m.group(0).strip()]
    if not marks:
        title = _title_from(source)
        return Book(source, title, None, _settle([Chapter(title, _paragraphs(text))], source))
    lead = [line.strip() for line in text[:marks[0].start()].split("\n")]
    while lead and not lead[0]:
        lead.pop(0)
    title = clean_text(lead.pop(0)) if lead else ""
    while lead and not lead[0]:
        lead.pop(0)
    by = _BYLINE.match(lead[0]) if lead else None
    if by:
        lead.pop(0)
    title = title or _title_from(source)
    opening = _paragraphs("\n".join(lead))
    chapters = [Chapter(title, opening)] if opening else []
    for k, mark in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        chapters.append(Chapter(clean_text(mark.group(0)), _paragraphs(text[mark.end():end])))
    return Book(source, title, clean_text(by.group(1)) if by else None, _settle(chapters, source))


# --- reading ----------------------------------------------------------------------------------------

def _title_from(source: str) -> str:
    stem = PurePosixPath(source.rstrip("/")).stem
    return re.sub(r"[_-]+", " ", stem).strip().title() or "Untitled"


def kind_of(uri: str) -> str:
    suffix = PurePosixPath(uri).suffix.lower()
    if suffix not in SUFFIXES:
        raise BookError(f"{uri}: unknown kind of book (its name must end in one of {', '.join(SUFFIXES)})")
    return SUFFIXES[suffix]


def _read_bytes(uri: str, storage: StorageOptions) -> bytes:
    try:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError:
        raise BookError(f"{uri}: not found") from None
    except (OSError, pa.ArrowException) as e:
        raise BookError(f"{uri}: cannot be read ({str(e).splitlines()[0]})") from None


def read_book(uri: str, storage: StorageOptions, chapter_regex: str = DEFAULT_CHAPTER_REGEX) -> Book:
    """One EPUB, Markdown or plain-text book (local or s3://)."""
    kind = kind_of(uri)
    if kind == "parquet":
        raise BookError(f"{uri}: a manifest of books cannot list another manifest")
    data = _read_bytes(uri, storage)
    if kind == "epub":
        return parse_epub(data, uri)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BookError(f"{uri}: not UTF-8 text ({e})") from None
    return parse_markdown(text, uri) if kind == "markdown" else parse_text(text, uri, chapter_regex)


def _strings(table: pa.Table, name: str, uri: str) -> list[str | None]:
    if name not in table.column_names:
        return [None] * table.num_rows
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise BookError(f"book manifest {uri}: column {name!r} must be strings, got {column.type}")
    return [v if v and v.strip() else None for v in column.to_pylist()]


def read_books(uris: list[str], storage: StorageOptions, chapter_regex: str = DEFAULT_CHAPTER_REGEX) -> list[Book]:
    """Every book named, manifests of books expanded in place; all read before any work starts."""
    books: list[Book] = []
    for uri in uris:
        if kind_of(uri) != "parquet":
            books.append(read_book(uri, storage, chapter_regex))
            continue
        try:
            table = pq.read_table(io.BytesIO(_read_bytes(uri, storage)))
        except pa.ArrowException as e:
            raise BookError(f"book manifest {uri}: unreadable as Parquet ({str(e).splitlines()[0]})") from None
        if "path" not in table.column_names:
            raise BookError(f"book manifest {uri}: missing column 'path' (has {table.column_names}; "
                            f"known: {list(BOOK_COLUMNS)})")
        paths, titles, authors, voices = (_strings(table, c, uri) for c in ("path", "title", "author", "voice"))
        chapter_voices = table.column("chapter_voices").to_pylist() if "chapter_voices" in table.column_names \
            else [None] * table.num_rows
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        for row, path in enumerate(paths):
            if path is None:
                raise BookError(f"book manifest {uri}: row {row} has no path")
            if not (is_s3(path) or path.startswith("/")):
                path = join(base, path)
            book = read_book(path, storage, chapter_regex)
            book = replace(book, title=titles[row] or book.title, author=authors[row] or book.author,
                           voice=voices[row])
            per_chapter = chapter_voices[row] or []
            if not isinstance(per_chapter, list) or not all(v is None or isinstance(v, str) for v in per_chapter):
                raise BookError(f"book manifest {uri}: chapter_voices must be a list of strings (row {row})")
            if len(per_chapter) > len(book.chapters):
                raise BookError(f"book manifest {uri}: {len(per_chapter)} chapter_voices for {path}, which has "
                                f"{len(book.chapters)} chapters")
            book.chapters = [replace(c, voice=v or None) for c, v in
                             zip(book.chapters, per_chapter + [None] * (len(book.chapters) - len(per_chapter)))]
            books.append(book)
    return books
