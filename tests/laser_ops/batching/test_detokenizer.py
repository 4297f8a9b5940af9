"""The one incremental detokenizer: pieces join to the decoded text, characters are never split,
stop strings are found across token boundaries and held back from streams."""

from __future__ import annotations

import pytest

from laser_ops.batching.detokenizer import IncrementalDetokenizer, StopMatcher, TextStream
from laser_ops.testing import tiny_tokenizer

TEXT = "héllo 😀 wörld, the capital of France is Paris"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("fast", [True, False])
def test_pieces_join_to_the_decoded_text(tok, fast: bool) -> None:
    ids = tok(TEXT, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok)
    if not fast:
        detok._stream = None  # the pure-Python path for tokenizers without a Rust backend
    pieces = detok.pieces(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # a multi-byte character arrives whole
    assert "" in pieces  # some token ended inside a character


def test_context_keeps_the_leading_space(tok) -> None:
    ids = tok(" Paris is", add_special_tokens=False).input_ids
    context = tok("The capital is", add_special_tokens=False).input_ids[-1:]
    assert "".join(IncrementalDetokenizer(tok, context=context).pieces(ids)) == " Paris is"


def test_a_sequence_cut_inside_a_character_flushes_a_replacement(tok) -> None:
    ids = tok("😀", add_special_tokens=False).input_ids
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids[:-1]) == ""
    assert "\ufffd" in detok.flush()


def test_stop_matcher_finds_strings_across_pieces_and_holds_back_prefixes() -> None:
    stops = StopMatcher(["END", "xyz"])
    assert stops.find("abcE", 1) is None and stops.find("abcEN", 1) is None
    assert stops.find("abcENDef", 3) == 3
    assert stops.holdback("abcEN") == 2 and stops.holdback("abcx") == 1 and stops.holdback("abc") == 0


def test_text_stream_cuts_at_a_stop_string_and_never_streams_it(tok) -> None:
    ids = tok(TEXT, add_special_tokens=False).input_ids
    stream = TextStream(tok, stop=["wö", "never"])
    streamed = ""
    for i in ids:
        stream.push(i)
        streamed += stream.delta()
        assert "wö" not in streamed and "\ufffd" not in streamed
        if stream.stopped:
            break
    stream.finish()
    streamed += stream.delta(final=True)
    assert stream.stopped and stream.text == "héllo 😀 " and streamed == stream.text
