"""Calibration/training/evaluation text: the wiki cleaner, the split, user files and the corpora."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qat.text import (
    CORPUS_NAME,
    NEWS_NAME,
    cache_dir,
    clean_wikitext,
    default_corpus,
    calibration_text,
    evaluation_text,
    news_corpus,
    read_text_file,
    split_corpus,
    training_text,
)
from trellis_runtime.errors import TextError


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        ("Before{{outer|a={{inner|{{deep}}}}|b}} after.", "Before after."),
        ("Infobox gone.\n{{Infobox\n| name = {{lang|fr|X}}\n}}\nText.", "Infobox gone.\n\nText."),
        ('Fact.<ref name="a">{{cite web|url=x}} Source</ref> More.<ref name="a" /> End.',
         "Fact. More. End."),
        ("[[Paris|the capital]] of [[France]] has many [[cat]]s.", "the capital of France has many cats."),
        ("Map.\n[[File:Map.png|thumb|A map of [[France|the country]] and [[Spain]].]]\nMore.",
         "Map.\n\nMore."),
        ("A[[Image:X.jpg|left|[[Bicycle]] [above] seen]]B[[Category:Countries]]", "AB"),
        ('Intro.\n{| class="wikitable"\n|-\n| a || [[Bracket|}]]\n|-\n|\n{|\n| nested\n|}\n|}\nOutro.',
         "Intro.\n\nOutro."),
        ("== History ==\nText.\n=== Early years===\nMore.", "History\nText.\nEarly years\nMore."),
        ("'''Bold''' and ''italic'' and '''''both''''' for O'Neil.", "Bold and italic and both for O'Neil."),
        ("A&nbsp;B &amp; C &lt;b&gt; &mdash; &eacute;", "A\xa0B & C <b> — é"),
        ("See [http://example.com/a?b=c Example site] or [https://x.org].", "See Example site or ."),
        ("* one\n** two\n# three\n: indented\n; term", "one\ntwo\nthree\nindented\nterm"),
        ("a<!-- hidden\nnote -->b <span style='x'>c</span><br/>d __TOC__", "ab c d"),
        ("one\n\n\n\ntwo\n  \n\t\n\nthree", "one\n\ntwo\n\nthree"),
        ("Unclosed [[link and stray }} end.", "Unclosed link and stray  end."),
    ],
)
def test_clean_wikitext(markup: str, expected: str) -> None:
    assert clean_wikitext(markup) == expected


def _paragraphs(count: int) -> list[str]:
    """Paragraphs of uneven length, so the cut point is not trivially aligned."""
    return [f"Paragraph {i}: " + " ".join(f"w{i}.{j}" for j in range(5 + (7 * i) % 23)) for i in range(count)]


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3, 0.5])
def test_split_corpus_cuts_at_a_blank_line_near_the_fraction(fraction: float) -> None:
    paragraphs = _paragraphs(80)
    text = "\n\n".join(paragraphs)
    calibration, evaluation = split_corpus(text, fraction)

    assert evaluation + "\n\n" + calibration == text
    eval_paras, calib_paras = evaluation.split("\n\n"), calibration.split("\n\n")
    assert eval_paras + calib_paras == paragraphs  # cut between whole paragraphs
    assert not set(eval_paras) & set(calib_paras)
    target = fraction * len(text)
    assert target <= len(evaluation) < target + max(map(len, paragraphs))
    assert split_corpus(text, fraction) == (calibration, evaluation)


def test_split_corpus_rejects_text_it_cannot_cut() -> None:
    with pytest.raises(TextError, match="blank"):
        split_corpus("one long paragraph without any break\nonly single newlines")
    with pytest.raises(ValueError):
        split_corpus("a\n\nb", 0.0)
    with pytest.raises(ValueError):
        split_corpus("a\n\nb", 1.0)


def _assert_rejected(path: Path, reason: str) -> None:
    with pytest.raises(TextError, match=reason) as info:
        read_text_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_read_text_file_rejects_unusable_files(tmp_path: Path) -> None:
    _assert_rejected(tmp_path / "missing.txt", "not found")
    _assert_rejected(tmp_path, "directory")
    (tmp_path / "binary.bin").write_bytes(b"\x00\x01\xff")
    _assert_rejected(tmp_path / "binary.bin", "binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    _assert_rejected(tmp_path / "latin1.txt", "UTF-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    _assert_rejected(tmp_path / "empty.txt", "empty")
    (tmp_path / "blank.txt").write_bytes(b" \n\t\n")
    _assert_rejected(tmp_path / "blank.txt", "empty")


def test_read_text_file_and_user_text_is_used_whole(tmp_path: Path) -> None:
    text = "\n\n".join(_paragraphs(30)) + "\n\nGrüße aus Köln.\n"
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    assert read_text_file(path) == text

    (tmp_path / "dos.txt").write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    assert read_text_file(tmp_path / "dos.txt") == text

    assert calibration_text(str(path)) == text
    assert evaluation_text(str(path)) == text


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "trellis-runtime"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "trellis-runtime"


@pytest.mark.parametrize("read,name", [(default_corpus, CORPUS_NAME), (news_corpus, NEWS_NAME)])
def test_each_corpus_reads_the_cache_without_downloading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, read, name: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))  # any download would fail
    cached = tmp_path / "trellis-runtime" / "text" / name
    cached.parent.mkdir(parents=True)
    cached.write_text("First article.\n\nSecond article.\n", encoding="utf-8")
    assert read() == "First article.\n\nSecond article.\n"


def test_training_text_is_news_then_calibration_never_evaluation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    text = tmp_path / "trellis-runtime" / "text"
    text.mkdir(parents=True)
    wiki = "".join(f"Article {i} says {'x' * 50}.\n\n" for i in range(40))
    (text / CORPUS_NAME).write_text(wiki, encoding="utf-8")
    (text / NEWS_NAME).write_text("News one.\n\nNews two.\n", encoding="utf-8")
    training = training_text(None)
    assert training == "News one.\n\nNews two.\n\n" + calibration_text(None)
    assert evaluation_text(None) not in training
    assert training_text(str(text / NEWS_NAME)) == "News one.\n\nNews two.\n"  # a file, whole


def test_default_corpus_reports_a_failed_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_python = tmp_path / "fake-python"
    fake_python.write_text("#!/bin/sh\necho 'WARNING: noise' >&2\necho 'ERROR: no network' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "executable", str(fake_python))

    with pytest.raises(TextError, match="ERROR: no network") as info:
        default_corpus()
    assert "\n" not in str(info.value)
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]  # no partial corpus

    monkeypatch.setattr(sys, "executable", str(tmp_path / "missing-python"))
    with pytest.raises(TextError, match="cannot build the default corpus"):
        default_corpus()


def test_unobtainable_default_text_points_to_a_file_flag(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """No cached corpus and pip cannot reach an index (PIP_NO_INDEX, as offline): the error says the
    default text cannot be obtained and names the flag that gives a file instead."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    for read, flag in ((calibration_text, "--calib-text FILE"), (evaluation_text, "--text FILE")):
        with pytest.raises(TextError) as info:
            read(None)
        message = str(info.value)
        assert message.startswith("the default text cannot be obtained (could not download gensim")
        assert message.endswith(f"give your own UTF-8 text file with {flag}")
        assert "\n" not in message


@pytest.mark.slow
def test_default_corpus_from_the_gensim_wheel() -> None:
    """Uses the real user cache: the first run downloads the 28 MB wheel, later runs read the text."""
    corpus = default_corpus()
    assert len(corpus.split()) > 300_000
    for markup in ("{{", "}}", "[[", "]]", "<ref", "{|"):
        assert markup not in corpus, markup
    assert (cache_dir() / "text" / CORPUS_NAME).read_text(encoding="utf-8") == corpus
    assert not list(cache_dir().rglob("*.whl"))
    assert default_corpus() == corpus
    news = news_corpus()
    assert len(news.split()) > 60_000 and (cache_dir() / "text" / NEWS_NAME).is_file()
    assert training_text(None) == news + "\n" + calibration_text(None)

    calibration, evaluation = calibration_text(None), evaluation_text(None)
    assert evaluation + "\n\n" + calibration == corpus
    assert 0.1 <= len(evaluation) / len(corpus) < 0.11
    # Short lines such as section headings ("References") recur in every article; prose must not.
    calibration_lines = set(calibration.splitlines())
    shared = [line for line in evaluation.splitlines() if len(line) >= 40 and line in calibration_lines]
    assert not shared
