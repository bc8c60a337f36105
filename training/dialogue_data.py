"""Dialogues made ready for HRED/VHRED training: split, tokenizer, encoding, batches, the flat stream.

The dialogues come from `rnnserve.training.dialogue_corpora` (the readers, `read_dialogues`, and
`resolve_source`); every public name there is re-exported here, so callers import them all from this
module. A dialogue is a tuple of turns (strings).

`split_dialogues` shuffles whole dialogues with `random.Random(seed)` and cuts 90/5/5 (train/valid/test) by
default, each split kept in corpus order. The char tokenizer is learnt on the train split's turns only.

Encoding: a turn is its ids followed by `<eos>` (id 1, the end of turn; docs/dialogue.md). The
turn-batched layout (`DialogueBatch`, what `DialogueModel.loss` reads) is `turns` (batch,
n_turns, max_len) int64 (each turn's ids and its `<eos>`, padded with 0) and `lengths` (batch, n_turns)
int64 (0 for a dialogue's missing turns). The flat stream of a dialogue (the baseline LM's input) is the
concatenation of its encoded turns; `FlatBatch` holds inputs, next-token targets and the mask of the
response targets (turns 2+, each with its `<eos>`).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from rnnserve.training.dialogue_corpora import (
    NAMED_SOURCES,
    Dialogue,
    DialogueFormatError,
    detect_format,
    read_chatterbot,
    read_dialogues,
    read_jsonl,
    read_shakespeare,
    read_turns_text,
    resolve_source,
)
from rnnserve.training.tokenizer import build_char_tokenizer, special_token_ids

__all__ = [
    "DEFAULT_FRACTIONS",
    "NAMED_SOURCES",
    "Dialogue",
    "DialogueBatch",
    "DialogueData",
    "DialogueFormatError",
    "DialogueSplits",
    "EncodedDialogue",
    "FlatBatch",
    "build_dialogue_tokenizer",
    "detect_format",
    "dialogue_batch",
    "encode_dialogues",
    "flat_batch",
    "flat_stream",
    "length_batches",
    "prepare_dialogue_data",
    "read_chatterbot",
    "read_dialogues",
    "read_jsonl",
    "read_shakespeare",
    "read_turns_text",
    "resolve_source",
    "response_targets",
    "response_token_count",
    "split_dialogues",
]

DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)


# --- split ---------------------------------------------------------------------------------------------


@dataclass
class DialogueSplits:
    train: list[Dialogue]
    valid: list[Dialogue]
    test: list[Dialogue]

    def describe(self) -> str:
        parts = []
        for name in ("train", "valid", "test"):
            split: list[Dialogue] = getattr(self, name)
            turns = sum(len(d) for d in split)
            chars = sum(len(t) for d in split for t in d)
            parts.append(f"{name} {len(split)} dialogues / {turns} turns / {chars:,} chars")
        return "; ".join(parts)


def split_dialogues(
    dialogues: Sequence[Dialogue], fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> DialogueSplits:
    """Whole dialogues to train/valid/test by a seeded shuffle; valid and test get round(n * fraction)
    each (at least one when there are >= 3 dialogues), train the rest; each split keeps corpus order."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    n = len(dialogues)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_valid, n_test = (round(n * f) if f == 0 or n < 3 else max(1, round(n * f)) for f in fractions[1:])
    picks = (order[n_valid + n_test :], order[:n_valid], order[n_valid : n_valid + n_test])
    train, valid, test = ([dialogues[i] for i in sorted(p)] for p in picks)
    return DialogueSplits(train, valid, test)


# --- encoding and batches ------------------------------------------------------------------------------

EncodedDialogue = list[list[int]]  # each turn's ids followed by <eos>


def build_dialogue_tokenizer(train: Iterable[Dialogue]) -> Tokenizer:
    """The LM char tokenizer (`<unk>` 0, `<eos>` 1 = end of turn) learnt on the training turns only."""
    return build_char_tokenizer(turn for d in train for turn in d)


def encode_dialogues(tok: Tokenizer, dialogues: Sequence[Dialogue]) -> list[EncodedDialogue]:
    """Every turn as its ids followed by `<eos>`."""
    eos = special_token_ids(tok)["eos"]
    flat = [turn for d in dialogues for turn in d]
    ids = [[*enc.ids, eos] for enc in tok.encode_batch(flat, add_special_tokens=False)]
    out: list[EncodedDialogue] = []
    start = 0
    for d in dialogues:
        out.append(ids[start : start + len(d)])
        start += len(d)
    return out


def flat_stream(dialogue: EncodedDialogue) -> list[int]:
    """The dialogue as one token stream: each turn's ids and its `<eos>`, turn after turn."""
    return [i for turn in dialogue for i in turn]


def response_targets(dialogue: EncodedDialogue) -> list[bool]:
    """For each next-token target of the flat stream (positions 1..len-1): does it belong to a response
    (turn 2+, its `<eos>` included)? Turn 1's tokens are context only."""
    first = len(dialogue[0])
    return [pos >= first for pos in range(1, len(flat_stream(dialogue)))]


def response_token_count(dialogues: Iterable[EncodedDialogue]) -> int:
    """How many tokens the response perplexity averages over (turns 2+, each with its `<eos>`)."""
    return sum(len(turn) for d in dialogues for turn in d[1:])


@dataclass
class DialogueBatch:
    """What `DialogueModel.forward`/`loss` read (its `TurnBatch`)."""

    turns: Tensor  # (batch, n_turns, max_len) int64: each turn's ids then <eos>, padded with 0
    lengths: Tensor  # (batch, n_turns) int64: counting the <eos>; 0 where a dialogue has fewer turns

    def to(self, device: torch.device | str) -> DialogueBatch:
        return DialogueBatch(self.turns.to(device), self.lengths.to(device))


@dataclass
class FlatBatch:
    inputs: Tensor  # (batch, seq) int64: stream[:-1], padded with 0
    targets: Tensor  # (batch, seq) int64: stream[1:]
    mask: Tensor  # (batch, seq) bool: a real target (not padding)
    response: Tensor  # (batch, seq) bool: a response target (turn 2+), what the quality metric scores


def dialogue_batch(dialogues: Sequence[EncodedDialogue]) -> DialogueBatch:
    n_turns = max(len(d) for d in dialogues)
    max_len = max(len(t) for d in dialogues for t in d)
    turns = torch.zeros(len(dialogues), n_turns, max_len, dtype=torch.int64)
    lengths = torch.zeros(len(dialogues), n_turns, dtype=torch.int64)
    for b, d in enumerate(dialogues):
        for k, turn in enumerate(d):
            turns[b, k, : len(turn)] = torch.tensor(turn)
            lengths[b, k] = len(turn)
    return DialogueBatch(turns, lengths)


def flat_batch(dialogues: Sequence[EncodedDialogue]) -> FlatBatch:
    streams = [flat_stream(d) for d in dialogues]
    seq = max(len(s) for s in streams) - 1
    out = FlatBatch(*(torch.zeros(len(streams), seq, dtype=torch.int64) for _ in range(2)),
                    *(torch.zeros(len(streams), seq, dtype=torch.bool) for _ in range(2)))  # fmt: skip
    for b, (d, s) in enumerate(zip(dialogues, streams, strict=True)):
        n = len(s) - 1
        out.inputs[b, :n] = torch.tensor(s[:-1])
        out.targets[b, :n] = torch.tensor(s[1:])
        out.mask[b, :n] = True
        out.response[b, :n] = torch.tensor(response_targets(d))
    return out


def length_batches(
    dialogues: Sequence[EncodedDialogue],
    batch_size: int,
    rng: random.Random | None = None,
    by_longest_turn: bool = False,
) -> list[list[int]]:
    """Indices of `dialogues` in batches of similar length (less padding): shuffled by `rng` (None: corpus
    order), sorted within windows of 50 batches by total length (a flat stream's padding) or, with
    `by_longest_turn`, by the longest turn (the turn-batched layout pads every turn to it), then the
    batches shuffled again."""
    order = list(range(len(dialogues)))
    if rng is not None:
        rng.shuffle(order)
    window = batch_size * 50
    size = [max(map(len, d)) if by_longest_turn else sum(map(len, d)) for d in dialogues]
    chunks = [sorted(order[i : i + window], key=size.__getitem__) for i in range(0, len(order), window)]
    batches = [c[i : i + batch_size] for c in chunks for i in range(0, len(c), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


# --- a corpus ready to train on ------------------------------------------------------------------------


@dataclass
class DialogueData:
    """A dialogue corpus ready to train on: its splits, the tokenizer (train split) and the encodings."""

    splits: DialogueSplits
    tokenizer: Tokenizer
    train: list[EncodedDialogue]
    valid: list[EncodedDialogue]
    test: list[EncodedDialogue]

    def describe(self) -> str:
        unk = special_token_ids(self.tokenizer)["unk"]
        valid_ids = [i for d in self.valid for t in d for i in t]
        rate = sum(1 for i in valid_ids if i == unk) / max(1, len(valid_ids))
        return (
            f"{self.splits.describe()}\n  vocabulary: {self.tokenizer.get_vocab_size()} chars (train split), "
            f"valid <unk> {rate:.3%}, valid response tokens {response_token_count(self.valid):,}"
        )


def prepare_dialogue_data(
    dialogues: Sequence[Dialogue], seed: int = 0, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> DialogueData:
    """Split, learn the char tokenizer on train, encode every split."""
    splits = split_dialogues(dialogues, fractions, seed)
    tok = build_dialogue_tokenizer(splits.train)
    encoded = (encode_dialogues(tok, s) for s in (splits.train, splits.valid, splits.test))
    return DialogueData(splits, tok, *encoded)
