"""Text handling in generation: incremental decoding and stop strings."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers

from rnnserve.server.generation import StopMatcher
from rnnserve.server.text import IncrementalDecoder, TextCodec


def word_codec() -> TextCodec:
    vocab = {"<unk>": 0, "<eos>": 1, "the": 2, "cat": 3, "sat": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<eos>"])
    return TextCodec(tok, {"unk": 0, "eos": 1})


def test_incremental_decoding_keeps_word_spacing_after_the_prompt() -> None:
    codec = word_codec()
    decoder = IncrementalDecoder(codec, context=codec.encode("the"))
    deltas = [decoder.push(t) for t in codec.encode("cat sat")]
    assert "the" + "".join(deltas) == "the cat sat"


def test_special_tokens_decode_to_nothing_but_have_a_name() -> None:
    codec = word_codec()
    assert codec.decode([2, 1, 3]) == "the cat"
    assert codec.token_text(1) == "<eos>"


def test_stop_string_split_across_tokens_is_held_back_and_never_sent() -> None:
    stops = StopMatcher(["END"])
    sent = []
    for piece in ["ab", "cE", "N", "Dxyz"]:
        text, stopped = stops.push(piece)
        sent.append(text)
        if stopped:
            break
    assert "".join(sent) == "abc"
    assert stopped


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    stops = StopMatcher(["END"])
    assert stops.push("aE") == ("a", False)
    assert stops.push("x") == ("Ex", False)
    assert stops.push("E") == ("", False)
    assert stops.flush() == "E"


def test_earliest_of_several_stop_strings_wins() -> None:
    stops = StopMatcher(["zz", "\n\n"])
    text, stopped = stops.push("ab\n\ncd zz")
    assert (text, stopped) == ("ab", True)


def test_stop_matching_equals_a_naive_search_and_keeps_only_a_short_tail() -> None:
    """Whatever the split into deltas: the text sent is the text up to the earliest stop string (all of
    it if none), and the matcher never holds more than the longest stop minus one character between
    pushes, so each token costs the same however long the generation (issue 12, item 7: it was
    quadratic)."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 40)))
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = (text[: min(hits)], True) if hits else (text, False)
        matcher, sent, stopped, at = StopMatcher(stops), "", False, 0
        while at < len(text) and not stopped:
            delta = text[at : at + rng.randint(1, 4)]
            at += len(delta)
            out, stopped = matcher.push(delta)
            sent += out
            assert stopped or len(matcher.pending) < max(len(s) for s in stops)
        if not stopped:
            sent += matcher.flush()
        assert (sent, stopped) == expected, (stops, text)
