"""The text path, fuzzed for its invariants (hypothesis, bounded and derandomized for CI):

- `IncrementalDecoder`: the deltas of any id sequence join to the text of the whole sequence (a prefix
  of it while the sequence ends inside a character), and never show U+FFFD unless that text does;
- `StopMatcher`: what it lets out plus what it holds back is the input up to the first stop string,
  which is never let out;
- `Replay`: the texts of a Generate's tokens rebuilt for a retry are the texts the live call sent.

On a byte-level BPE tokenizer trained here on multilingual text (accents, CJK, emoji, RTL scripts), so
that many characters are split across tokens, and a small random-weights LSTM on it for `Replay`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve.server.engine import Engine, GenerateRequest
from rnnserve.server.generation import Replay, StopMatcher
from rnnserve.server.repository import ModelRepository
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.sessions import AppliedGeneration
from rnnserve.server.text import IncrementalDecoder, TextCodec
from rnnserve.training.tokenizer import build_bpe_tokenizer, special_token_ids

MULTILINGUAL = (
    "Héllo wörld! Ça va? naïve café résumé, señor. 日本語のテキストです。中文字符测试。한국어 문장. "
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵. Ελληνικά, русский текст, עברית, العربية. "
    "def add(a, b):\n    return a + b\n"
) * 3
# Characters of 1 to 4 UTF-8 bytes, and joiners: what texts and stop strings are drawn from.
ALPHABET = "ab \n.éüñ日本語中テ한ΕлעعЖ😀🎉👍🏽\u200d🇫🇷"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FFFD = "\ufffd"


def bpe_codec() -> TextCodec:
    tokenizer = build_bpe_tokenizer(MULTILINGUAL, max_size=400, min_freq=2)
    return TextCodec(tokenizer, special_token_ids(tokenizer))


CODEC = bpe_codec()  # built at import (milliseconds): the strategies below draw from it
VOCAB = CODEC.tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return CODEC


def test_the_tokenizer_splits_characters_across_tokens(codec: TextCodec) -> None:
    """The premise of the fuzzing below: many characters need several tokens."""
    split = [c for c in ALPHABET if len(codec.encode(c)) > 1]
    assert len(split) >= 5, split
    assert codec.decode(codec.encode(MULTILINGUAL)) == MULTILINGUAL


@st.composite
def id_sequences(draw: st.DrawFn) -> list[int]:
    """Token ids: a text's encoding cut anywhere (characters split at the cut), arbitrary ids (stray
    UTF-8 bytes, special tokens), or both, in either order."""
    ids = CODEC.encode(draw(st.text(ALPHABET, max_size=24)))
    cut = ids[: draw(st.integers(0, len(ids)))]
    noise = draw(st.lists(st.integers(0, VOCAB - 1), max_size=8))
    return draw(st.sampled_from([cut, noise, cut + noise, noise + cut]))


def decoded_deltas(codec: TextCodec, ids: list[int], context: list[int] | None = None) -> str:
    decoder = IncrementalDecoder(codec, context)
    return "".join(decoder.push(i) for i in ids)


@FUZZ
@given(data=st.data())
def test_deltas_join_to_the_text_of_the_whole_sequence(codec: TextCodec, data: st.DataObject) -> None:
    ids = data.draw(id_sequences())
    joined, full = decoded_deltas(codec, ids), codec.decode(ids)
    assert full.startswith(joined), (ids, joined, full)
    if not full.endswith(FFFD):  # the sequence ends on a complete character: nothing is held back
        assert joined == full, (ids, joined, full)
    if FFFD not in full:
        assert FFFD not in joined


@FUZZ
@given(before=st.text(ALPHABET, max_size=12), data=st.data())
def test_deltas_after_a_context_join_to_the_text_after_it(
    codec: TextCodec, before: str, data: st.DataObject
) -> None:
    """A session's recent tokens (a prompt, ending on a character boundary) start the decoder: the
    deltas are exactly the text the new ids add to it."""
    context = codec.encode(before)
    ids = data.draw(id_sequences())
    joined = decoded_deltas(codec, ids, context)
    prefix, full = codec.decode(context), codec.decode(context + ids)
    assert full.startswith(prefix + joined), (context, ids, joined, full)
    if not full.endswith(FFFD):
        assert prefix + joined == full, (context, ids, joined, full)


def test_a_character_split_between_the_context_and_the_new_tokens_is_sent(codec: TextCodec) -> None:
    ids = codec.encode("a😀b")
    cuts = [cut for cut in range(1, len(ids)) if codec.decode(ids[:cut]).endswith(FFFD)]
    assert cuts  # the emoji takes several tokens
    for cut in cuts:
        sent_before = codec.decode(ids[:cut]).rstrip(FFFD)  # what the earlier call could send: "a"
        assert sent_before + decoded_deltas(codec, ids[cut:], ids[:cut]) == "a😀b", cut


# -- StopMatcher ---------------------------------------------------------------------------------------

STOP_ALPHABET = "ab日😀\n"  # small, so that stop strings occur (and almost occur) often


@FUZZ
@given(
    deltas=st.lists(st.text(STOP_ALPHABET, max_size=6), max_size=12),
    stops=st.lists(st.text(STOP_ALPHABET, min_size=1, max_size=4), max_size=3),
)
def test_stop_matcher_lets_out_the_input_up_to_the_first_stop(deltas: list[str], stops: list[str]) -> None:
    matcher = StopMatcher(stops)
    out, fed, stopped = "", "", False
    for delta in deltas:
        fed += delta
        text, stopped = matcher.push(delta)
        out += text
        longest = max((len(s) for s in stops), default=1)
        assert len(matcher.pending) < longest  # only a possible start of a stop string is held back
        for s in stops:
            assert s not in out, (s, out)  # a stop string is never let out
        if stopped:
            break
        assert out + matcher.pending == fed  # nothing lost, nothing added
    hits = [i for i in (fed.find(s) for s in stops) if i >= 0]
    if stopped:
        assert out == fed[: min(hits)], (deltas, stops, out)
    else:
        assert not hits, (deltas, stops)  # a stop string in the input is always found
        assert out + matcher.flush() == fed
        assert matcher.pending == ""


@FUZZ
@given(
    text=st.text(STOP_ALPHABET, max_size=30), stops=st.lists(st.text(STOP_ALPHABET, min_size=1, max_size=4))
)
def test_stop_matcher_holds_back_only_possible_starts_of_a_stop(text: str, stops: list[str]) -> None:
    """Pushed one character at a time: what is held back is the longest suffix that begins a stop."""
    stops = stops[:3]
    matcher = StopMatcher(stops)
    fed = ""
    for char in text:
        fed += char
        _, stopped = matcher.push(char)
        if stopped:
            return
        starts = [
            k for k in range(1, len(fed) + 1) if any(s.startswith(fed[-k:]) and s != fed[-k:] for s in stops)
        ]
        assert len(matcher.pending) == max(starts, default=0), (fed, stops, matcher.pending)


# -- Replay against the live path ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_repo(tmp_path_factory: pytest.TempPathFactory, codec: TextCodec) -> Path:
    """A repository with `bpe`: a small random-weights LSTM on the multilingual BPE tokenizer (near
    uniform sampling: every byte token, so characters split and invalid sequences, is generated)."""
    import torch

    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.model import ModelArgs, RNNLanguageModel
    from rnnserve.training.train import TrainConfig, save_checkpoint

    root = tmp_path_factory.mktemp("bpe")
    run = root / "run"
    run.mkdir()
    codec.tokenizer.save(str(run / "tokenizer.json"))
    torch.manual_seed(3)
    args = ModelArgs(
        cell="gru", vocab_size=codec.tokenizer.get_vocab_size(), embedding_size=8, hidden_size=16
    )
    args.num_layers = 1
    metrics = {"val_loss": 2.0, "val_ppl": math.exp(2.0), "train_loss": 2.5, "epoch": 1}
    config = TrainConfig(cell="gru", tokenizer="bpe", layers=1, hidden=16, emb=8)
    save_checkpoint(run / "checkpoint.pt", RNNLanguageModel(args), config, metrics)
    export_checkpoint(run / "checkpoint.pt", root / "repo", "bpe")
    return root / "repo"


@dataclass
class Loop:
    """An event loop running an engine across hypothesis examples (one engine for the module)."""

    loop: asyncio.AbstractEventLoop
    engine: Engine

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine_loop(bpe_repo: Path) -> Iterator[Loop]:
    loop = asyncio.new_event_loop()

    async def make() -> Engine:
        engine = Engine(ModelRepository.load(bpe_repo))
        engine.start()
        return engine

    try:
        engine = loop.run_until_complete(make())
        yield Loop(loop, engine)
        loop.run_until_complete(engine.stop())
    finally:
        loop.close()


async def generate(
    engine: Engine, session_id: str, request: GenerateRequest
) -> list[tuple[int, str, str | None]]:
    return [
        (t.token_id, t.text, t.finish_reason)
        async for tokens in engine.generate(session_id, request)
        for t in tokens
    ]


@settings(FUZZ, max_examples=60)
@given(
    prompt=st.text(ALPHABET, max_size=10),
    seed=st.integers(0, 2**32),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
    max_tokens=st.integers(1, 48),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=2), max_size=3),
    ignore_eos=st.booleans(),
)
def test_replay_rebuilds_the_texts_the_live_generate_sent(
    engine_loop: Loop,
    codec: TextCodec,
    prompt: str,
    seed: int,
    temperature: float,
    max_tokens: int,
    stops: list[str],
    ignore_eos: bool,
) -> None:
    engine = engine_loop.engine
    session = engine.create_session("bpe")
    try:
        request = GenerateRequest(
            SamplingParams(temperature=temperature, seed=seed),
            max_tokens=max_tokens,
            stop=stops,
            ignore_eos=ignore_eos,
            prompt=prompt or None,
            request_id="r1",
        )
        live = engine_loop.run(generate(engine, session.id, request))
        assert isinstance(live, list) and live and live[-1][2] is not None
        applied = session.last_applied
        assert isinstance(applied, AppliedGeneration)
        replay = Replay(session.model.codec, applied, stops)
        assert [(t.token_id, t.text, t.finish_reason) for t in replay.tokens] == live
        # The retry under the same request_id (which hands over Replay's tokens) sends the same.
        assert engine_loop.run(generate(engine, session.id, request)) == live

        # The live texts are the generated text (the decoder's, tested above), up to the first stop.
        visible = decoded_deltas(codec, [i for i, _, _ in live], list(applied.recent_before))
        sent = "".join(text for _, text, _ in live)
        hits = [i for i in (visible.find(s) for s in stops) if i >= 0]
        if live[-1][2] == "stop":
            assert hits and sent == visible[: min(hits)], (stops, sent, visible)
        else:
            assert not hits and sent == visible, (stops, sent, visible)
    finally:
        engine.sessions.close(session.id)
