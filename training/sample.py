"""Sample text from a trained language model (a quick look at what it learned)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from rnnserve.training.model import RNNLanguageModel
from rnnserve.training.tokenizer import special_token_ids


@torch.no_grad()
def sample_text(
    model: RNNLanguageModel,
    tok: Tokenizer,
    prompt: str = "",
    max_tokens: int = 200,
    temperature: float = 0.8,
    seed: int = 0,
) -> str:
    """Continue `prompt` by sampling up to `max_tokens` tokens, stopping at `<eos>`; returns the new text."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    eos = special_token_ids(tok)["eos"]
    ids = tok.encode(prompt).ids or [eos]  # an empty prompt starts a fresh document
    state = model.init_state(1)
    logits, state = model(torch.tensor([ids]), state)  # (1, len(ids), vocab)
    out: list[int] = []
    for _ in range(max_tokens):
        probs = torch.softmax(logits[0, -1] / max(temperature, 1e-6), dim=-1)  # (vocab,)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == eos:
            break
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
    return tok.decode(out)
