"""Streaming text: whole characters only, and stop strings cut however the text is split."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from trellis_runtime.detokenize import (REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringFilter,
                                        TextStream)

MULTIBYTE_TEXT = "Price: 5€, naïve café 日本語のテキスト 🎉👍🏽 emoji 한국어 done."


@pytest.fixture(scope="module")
def tokenizer(builtin_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(builtin_tokenizer_dir))


def test_multibyte_characters_stream_whole(tokenizer) -> None:
    prompt = tokenizer.encode("Say it:")
    ids = tokenizer.encode(MULTIBYTE_TEXT)
    # The premise: byte-level BPE splits some of these characters over several tokens.
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
    assert "".join(deltas) == MULTIBYTE_TEXT
    assert sum(delta == "" for delta in deltas[:-1]) > 0  # held back while a character was partial


def test_incomplete_tail_is_released_at_the_end(tokenizer) -> None:
    ids = tokenizer.encode("ok 🎉")
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(detokenizer.push(i) for i in ids[:-1])  # stop inside the emoji
    assert streamed == "ok"
    assert detokenizer.flush().endswith(REPLACEMENT_CHAR)


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[:min(hits)], True) if hits else (text, False)


def stream_pieces(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    filter_ = StopStringFilter(stops)
    released = []
    for piece in pieces:
        text, stopped = filter_.push(piece)
        released.append(text)
        if stopped:
            return released, True
    return released + [filter_.flush()], False


def test_stop_string_split_across_pieces() -> None:
    released, stopped = stream_pieces(["Hello wor", "ld, ST", "O", "P and more"], ["STOP"])
    assert stopped and "".join(released) == "Hello world, "
    assert released[1] == "ld, "  # "ST" was held back: it might have started "STOP"


def test_false_start_is_released() -> None:
    filter_ = StopStringFilter(["</end>"])
    assert filter_.push("a </e") == ("a ", False)
    assert filter_.push("xtra") == ("</extra", False)


def test_earliest_of_several_stops_wins() -> None:
    released, stopped = stream_pieces(["one two three"], ["three", "two"])
    assert stopped and "".join(released) == "one "


def test_partial_stop_at_the_end_is_just_text() -> None:
    released, stopped = stream_pieces(["the end is ne"], ["near"])
    assert not stopped and "".join(released) == "the end is ne"


def test_random_splits_match_the_reference() -> None:
    rng = random.Random(0)
    alphabet = "ab€🎉 "
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        released, stopped = stream_pieces(pieces, stops)
        expected, expected_stop = reference_cut(text, stops)
        assert ("".join(released), stopped) == (expected, expected_stop), (text, stops, pieces)
        assert not any(s in "".join(released) for s in stops)


def test_text_stream_with_real_tokens(tokenizer) -> None:
    text = "The answer is 42. 世界 END of story"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, [], stops=["界 END"])
    out = []
    for token in ids:
        delta = stream.push(token)
        out.append(delta.text)
        if delta.stopped:
            break
    assert delta.stopped and "".join(out) == "The answer is 42. 世"
