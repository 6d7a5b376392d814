"""Calibration, training and evaluation text.

No dataset hub is reachable where this runs, so the default corpus is the Wikipedia excerpt
(about 106 articles, CC BY-SA) that ships as test data inside the gensim wheel on PyPI; its head is
the evaluation part, the rest calibration. Training (BCJR-QAT, fine-tuning) reads more: the Lee news
corpus from the same wheel (about 350 short Australian news articles, 64k words) before the
calibration part. Both are fetched once with pip, reduced to plain text, and cached; the wheel
itself is not kept. Users can supply their own UTF-8 text file instead.
"""

from __future__ import annotations

import bz2
import html
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Callable
from xml.etree import ElementTree

from trellis_runtime.errors import TextError
from trellis_runtime.paths import cache_dir

GENSIM_VERSION = "4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CORPUS_NAME = f"enwiki-gensim-{GENSIM_VERSION}.txt"
NEWS_MEMBERS = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")
NEWS_NAME = f"lee-news-gensim-{GENSIM_VERSION}.txt"

# Each pattern matches an innermost construct (no nested opener inside), so applying it until
# nothing changes removes nested constructs from the inside out.
_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*?\}\}", re.S)
# Table delimiters only count at the start of a line, as in MediaWiki: "|}" also occurs in links.
_TABLE = re.compile(r"^[ \t]*\{\|(?:(?!^[ \t]*(?:\{\||\|\})).)*?^[ \t]*\|\}", re.S | re.M)
_WIKILINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*?)\]\]", re.S)

_DROPPED_LINK = re.compile(r"\s*(?:file|image|category)\s*:", re.I)
# Brackets and braces that the source never closed (typos in the articles).
_STRAY = re.compile(r"\[\[|\]\]|\{\{|\}\}")
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF_EMPTY = re.compile(r"<ref\b[^>]*/>", re.I)
# Footnotes, image galleries and LaTeX are not prose: drop them with their content.
_ELEMENT = re.compile(r"<(ref|gallery|math)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*[ \t]*([^\]\n]*)\]", re.I)
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_LIST = re.compile(r"^[*#:;]+[ \t]*", re.M)
_BREAK = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-z][^>]*>", re.I)
_MAGIC = re.compile(r"__[A-Z]+__")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_BLANK_RUN = re.compile(r"\n{3,}")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def _until_stable(pattern: re.Pattern[str], repl: str | Callable[[re.Match[str]], str], text: str) -> str:
    """Apply an innermost-construct pattern until no match is left, i.e. through all nesting."""
    count = 1
    while count:
        text, count = pattern.subn(repl, text)
    return text


def _link_text(match: re.Match[str]) -> str:
    """What a reader sees of [[target|label]]: the label, or the target; nothing for media and categories."""
    target, _, label = match.group(1).partition("|")
    if _DROPPED_LINK.match(target):
        return ""
    return label or target.lstrip(":")


def clean_wikitext(markup: str) -> str:
    """Reduce MediaWiki markup to the prose a reader sees: calibrate on language, not on syntax."""
    text = _COMMENT.sub("", markup)
    text = _REF_EMPTY.sub("", text)
    text = _ELEMENT.sub("", text)
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _until_stable(_WIKILINK, _link_text, text)
    text = _STRAY.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST.sub("", text)
    text = _BREAK.sub(" ", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = html.unescape(text)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUN.sub("\n\n", text).strip()


def _local(tag: str) -> str:
    """An XML tag without its namespace, so any export schema version parses."""
    return tag.rsplit("}", 1)[-1]


def _articles(xml_stream: IO[bytes]) -> list[str]:
    """The cleaned text of each main-namespace, non-redirect page, in dump order."""
    articles = []
    for _, elem in ElementTree.iterparse(xml_stream, events=("end",)):
        if _local(elem.tag) != "page":
            continue
        fields = {_local(child.tag): child.text or "" for child in elem.iter()}
        if fields.get("ns") == "0" and "redirect" not in fields:
            body = clean_wikitext(fields.get("text", ""))
            if body:
                articles.append(body)
        elem.clear()
    return articles


def _news_articles(lines: IO[bytes]) -> list[str]:
    """The Lee corpus holds one plain-text article per line, in Latin-1 (its one non-ASCII byte is
    a pound sign)."""
    return [line.decode("latin-1").strip() for line in lines if line.strip()]


def _build_corpora(workdir: Path) -> dict[str, str]:
    """Download the gensim wheel into workdir; its Wikipedia excerpt and its news articles as plain
    text, by cache file name (one download fills both)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"gensim=={GENSIM_VERSION}", "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        # pip may print warnings too; its own ERROR line says what went wrong.
        lines = result.stderr.strip().splitlines() or ["no output from pip"]
        reason = ([line for line in lines if line.startswith("ERROR")] or lines)[-1]
        raise TextError(f"could not download gensim=={GENSIM_VERSION} for the default corpus: {reason}")
    wheels = sorted(workdir.glob("gensim-*.whl"))
    if not wheels:
        raise TextError(f"pip did not fetch a gensim=={GENSIM_VERSION} wheel for this platform")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            with wheel.open(WIKI_MEMBER) as packed:
                articles = _articles(bz2.open(packed))
            news = []
            for member in NEWS_MEMBERS:
                with wheel.open(member) as lines:
                    news += _news_articles(lines)
    except (KeyError, OSError, zipfile.BadZipFile, ElementTree.ParseError) as exc:
        raise TextError(f"cannot read the text corpora from {wheels[0].name}: {exc}") from exc
    if not articles or not news:
        raise TextError(f"the text corpora in {wheels[0].name} hold no articles")
    return {CORPUS_NAME: "\n\n".join(articles) + "\n", NEWS_NAME: "\n\n".join(news) + "\n"}


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename, so a concurrent or interrupted run never leaves a partial corpus behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _cached_corpus(name: str) -> str:
    """A corpus of the gensim wheel by cache file name, built on first use, then read from the cache."""
    target = cache_dir() / "text" / name
    if target.is_file():
        return target.read_text(encoding="utf-8")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="download-") as workdir:
            corpora = _build_corpora(Path(workdir))
        for file_name, text in corpora.items():
            _write_atomically(target.parent / file_name, text)
    except OSError as exc:
        raise TextError(f"cannot build the default corpus in {cache_dir()}: {exc}") from exc
    return corpora[name]


def default_corpus() -> str:
    """The cleaned Wikipedia excerpt: evaluation and calibration text."""
    return _cached_corpus(CORPUS_NAME)


def news_corpus() -> str:
    """The Lee news articles, one paragraph each: extra training text, never evaluated on."""
    return _cached_corpus(NEWS_NAME)


def split_corpus(text: str, eval_fraction: float = 0.1) -> tuple[str, str]:
    """Split into (calibration, evaluation): evaluation is the head, up to the first blank line past
    eval_fraction of the characters, and calibration is the rest.

    Cutting at a blank line keeps paragraphs (and articles) whole, so the model is never evaluated
    on text it was calibrated on; a fixed cut rather than sampling keeps runs reproducible.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    cut = _PARAGRAPH_BREAK.search(text, int(len(text) * eval_fraction))
    evaluation, calibration = (text[:cut.start()], text[cut.end():]) if cut else (text, "")
    if not evaluation.strip() or not calibration.strip():
        raise TextError("cannot split the text into calibration and evaluation parts: it needs a blank "
                        f"line (paragraph break) after the first {eval_fraction:.0%} of its characters")
    return calibration, evaluation


def read_text_file(path: str | os.PathLike) -> str:
    """A user's text file, rejected early and clearly if it cannot be plain UTF-8 prose."""
    file = Path(path)
    if not file.exists():
        raise TextError(f"text file not found: {file}")
    if file.is_dir():
        raise TextError(f"text file is a directory: {file}")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise TextError(f"cannot read text file {file}: {exc.strerror}") from exc
    if b"\x00" in data:
        raise TextError(f"text file looks binary (contains NUL bytes): {file}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TextError(f"text file is not valid UTF-8 (byte {exc.start}): {file}") from exc
    if not text.strip():
        raise TextError(f"text file is empty: {file}")
    # Normalise line endings so blank-line boundaries are found the same way on every platform.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _default_corpus_or_hint(flag: str, read: Callable[[], str] = default_corpus) -> str:
    """A built-in corpus (`read`); when it cannot be obtained (offline, no pip), the error names
    `flag`, the command's way to give a text file instead."""
    try:
        return read()
    except TextError as err:
        raise TextError(f"the default text cannot be obtained ({err}); give your own UTF-8 text "
                        f"file with {flag}") from None


def calibration_text(path: str | None) -> str:
    """A user's file whole, or the calibration part of the default corpus."""
    if path is not None:
        return read_text_file(path)
    return split_corpus(_default_corpus_or_hint("--calib-text FILE"))[0]


def training_text(path: str | None) -> str:
    """A user's file whole, or the news corpus followed by the calibration part of the default
    corpus. The calibration part comes last so that the held-out validation tail training cuts
    from the end (qat.distill.TextWindows) is the same Wikipedia text with or without the news."""
    if path is not None:
        return read_text_file(path)
    return _default_corpus_or_hint("--calib-text FILE", news_corpus) + "\n" + calibration_text(None)


def evaluation_text(path: str | None) -> str:
    """A user's file whole, or the evaluation part of the default corpus (never calibrated on)."""
    if path is not None:
        return read_text_file(path)
    return split_corpus(_default_corpus_or_hint("--text FILE"))[1]
