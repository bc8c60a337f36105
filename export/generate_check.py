"""Validation of a generation graph: its ids equal a plain PyTorch reference sampler's, step by step.

The reference (`reference_draw`) is the textbook version of server/sampling.py's semantics, in float64
over the whole vocabulary (no blocks, a full sort for cut rows), so it checks the graph's two-level
inverse CDF and its TopK cut rather than repeating them. The check is teacher-forced: from the same
state, the reference applies x_i (the graph's own previous id), computes logits_i with `step`
(PyTorch's model, or an ONNX Runtime step graph for the int8/fp16 variants), draws with the same
uniform and must find the graph's x_{i+1}. When every id matches, this is the same as running both
freely; when one does not, the first mismatch is reported where it happened.

Float rounding can move a draw that lands within ~1e-6 of an interval boundary (the logits agree to
~1e-6, not bit for bit). A mismatch is excused as a boundary tie only when the reference puts the
uniform within `tie_tol` of the graph id's interval (or the two ids' scaled logits within `tie_tol`:
an ordering tie in a top-k cut, or greedy); ties are counted in the figures and may not exceed
MAX_TIE_RATE of the draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from rnnserve.export.validate import ExportValidationError, max_abs_diff

Arrays = dict[str, np.ndarray]
# (tokens [B, 1], state tuple) -> (logits [B, vocab] float32, new state tuple)
StepFn = Callable[[np.ndarray, tuple[np.ndarray, ...]], tuple[np.ndarray, tuple[np.ndarray, ...]]]
MAX_TIE_RATE = 0.01
BATCH_SIZES = (1, 3, 8)
TIE_TOL = 1e-4  # the exporter's atol on logits: a draw that close to a boundary may go either way


@dataclass(frozen=True)
class RowParams:
    """One row's sampling controls, as the graph takes them (top_k 0 = off, top_p 1 = off)."""

    temperature: float
    top_k: int = 0
    top_p: float = 1.0


def validation_rows(vocab_size: int, top_k_max: int) -> list[RowParams]:
    """The settings the validation cycles through: greedy, temperatures, top-k, top-p, both (top_k_max 0,
    a plain graph: greedy and temperatures only)."""
    rows = [RowParams(0.0), RowParams(1.0), RowParams(0.7), RowParams(1.6)]
    if top_k_max == 0:
        return rows
    rows += [
        RowParams(1.0, 5),
        RowParams(0.8, top_k_max, 0.9),
        RowParams(1.2, 3, 0.5),
        RowParams(1.0, 1),
    ]
    if vocab_size <= top_k_max:  # top_p alone is expressible (as top_k = vocab)
        rows.append(RowParams(1.0, vocab_size, 0.8))
    return rows


def reference_draw(logits: torch.Tensor, p: RowParams, u: float) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(id, candidates in CDF order, normalised CDF) for one row logits [vocab] drawn with uniform u."""
    scaled = logits.double() / (p.temperature or 1.0)  # [vocab]
    if p.temperature == 0.0:
        best = int(torch.argmax(logits))
        return best, torch.tensor([best]), torch.ones(1, dtype=torch.float64)
    if p.top_k or p.top_p < 1.0:
        order = torch.sort(scaled, descending=True, stable=True).indices  # ties: lower id first
        cand = order[: p.top_k] if p.top_k else order
        probs = torch.exp(scaled[cand] - scaled[cand[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:  # the smallest prefix whose mass reaches top_p
            keep = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor(p.top_p, dtype=torch.float64)))
            cand, probs = cand[: keep + 1], probs[: keep + 1] / probs[: keep + 1].sum()
    else:
        cand = torch.arange(len(scaled))
        probs = torch.softmax(scaled, 0)
    cdf = torch.cumsum(probs, 0)
    i = int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)[0])
    return int(cand[min(i, len(cand) - 1)]), cand, cdf


def is_boundary_tie(logits: torch.Tensor, p: RowParams, u: float, got: int, tol: float) -> bool:
    """Whether the graph's id `got` is the reference's choice but for rounding (see the module doc)."""
    want, cand, cdf = reference_draw(logits, p, u)
    scaled = logits.double() / (p.temperature or 1.0)
    ordered = p.temperature == 0.0 or p.top_k or p.top_p < 1.0  # ids ranked by logit, not by id
    if ordered and abs(float(scaled[got] - scaled[want])) <= tol:
        return True
    hit = (cand == got).nonzero()
    if len(hit) == 0:
        return False
    j = int(hit[0, 0])
    lo, hi = (float(cdf[j - 1]) if j else 0.0), float(cdf[j])
    return lo - tol <= u <= hi + tol


def torch_step(model: torch.nn.Module) -> StepFn:
    """A StepFn from the PyTorch language model (eval mode)."""
    model.eval()

    @torch.no_grad()
    def step(tokens: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        logits, new = model(torch.from_numpy(tokens), tuple(torch.from_numpy(s) for s in state))
        return logits[:, -1].numpy(), tuple(s.numpy() for s in new)

    return step


def ort_step(path: Path, state_names: Sequence[str], so: ort.SessionOptions | None = None) -> StepFn:
    """A StepFn from an ONNX Runtime LM step graph (CPU)."""
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = ["logits", *(f"state_out.{n}" for n in state_names)]

    def step(tokens: np.ndarray, state: tuple[np.ndarray, ...]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        feeds = {"tokens": tokens, **{f"state_in.{n}": s for n, s in zip(state_names, state, strict=True)}}
        logits, *new = sess.run(outs, feeds)
        return logits[:, -1], tuple(new)

    return step


def generate_feeds(
    rows: Sequence[RowParams],
    state: tuple[np.ndarray, ...],
    state_names: Sequence[str],
    tokens: np.ndarray,
    uniforms: np.ndarray,
    *,
    plain: bool = False,
) -> Arrays:
    """The generation graph's inputs for rows of `rows` (state tensors [layers, B, hidden]); a plain
    graph takes no top_k/top_p (its rows must have none)."""
    feeds = {
        "tokens": tokens,  # [B, 1]
        **{f"state_in.{n}": s for n, s in zip(state_names, state, strict=True)},
        "uniforms": uniforms.astype(np.float32),  # [B, K]
        "temperature": np.array([r.temperature for r in rows], np.float32),
    }
    if plain:
        assert not any(r.top_k or r.top_p < 1.0 for r in rows), "a plain graph cannot cut"
    else:
        feeds["top_k"] = np.array([r.top_k for r in rows], np.int64)
        feeds["top_p"] = np.array([r.top_p for r in rows], np.float32)
    return feeds


def is_plain_graph(gen: ort.InferenceSession) -> bool:
    """Whether `gen` is a plain generation graph (no top_k input)."""
    return "top_k" not in {i.name for i in gen.get_inputs()}


def _row_sets(settings: list[RowParams], plain: bool) -> list[list[RowParams]]:
    """The rows' settings to cycle through, per run: all of them; for a plain graph also only greedy and
    temperature 1 (its untempered branch, taken when no row needs exp((logits - max) / t))."""
    if not plain:
        return [settings]
    return [settings, [r for r in settings if r.temperature in (0.0, 1.0)]]


def check_generate_graph(
    gen: ort.InferenceSession,
    step: StepFn,
    state_names: Sequence[str],
    vocab_size: int,
    hidden: tuple[int, int],
    top_k_max: int,
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    atol: float = 1e-4,
    tie_tol: float = TIE_TOL,
    seed: int = 0,
) -> dict[str, float]:
    """Figures of `gen` against `step` + reference_draw (teacher-forced, see the module doc); raises
    ExportValidationError on the first real id mismatch, too many ties, or logprobs/state over atol.
    `hidden` is (layers, hidden_size); `top_k_max` 0 for a plain graph (greedy and temperature rows only,
    each batch size run twice: with all of them, and with greedy and temperature 1 only)."""
    steps = int(gen.get_inputs()[[i.name for i in gen.get_inputs()].index("uniforms")].shape[1])
    plain = is_plain_graph(gen)
    rng = np.random.default_rng(seed)
    figures = {"draws": 0.0, "boundary_ties": 0.0, "logprobs_max_abs_diff": 0.0, "state_max_abs_diff": 0.0}
    state_out = [f"state_out.{n}" for n in state_names]
    runs = [
        (batch, settings)
        for settings in _row_sets(validation_rows(vocab_size, 0 if plain else top_k_max), plain)
        for batch in batch_sizes
    ]
    for batch, settings in runs:
        rows = [settings[(batch + i) % len(settings)] for i in range(batch)]
        state = tuple(
            rng.uniform(-1, 1, (hidden[0], batch, hidden[1])).astype(np.float32) for _ in state_names
        )
        tokens = rng.integers(0, vocab_size, (batch, 1), dtype=np.int64)
        uniforms = rng.random((batch, steps), dtype=np.float32)
        feeds = generate_feeds(rows, state, state_names, tokens, uniforms, plain=plain)
        ids, logprobs, *new = gen.run(["ids", "logprobs", *state_out], feeds)
        x, carried = tokens, state
        for i in range(steps):
            logits, carried = step(x, carried)  # logits_i [B, vocab] after applying x_i
            lt = torch.from_numpy(logits)
            for r in range(batch):
                want = reference_draw(lt[r], rows[r], float(uniforms[r, i]))[0]
                got = int(ids[r, i])
                figures["draws"] += 1
                if got == want:
                    continue
                if not is_boundary_tie(lt[r], rows[r], float(uniforms[r, i]), got, tie_tol):
                    raise ExportValidationError(
                        f"generation graph ({steps} steps): at batch {batch}, row {r} ({rows[r]}), step {i} "
                        f"it chose id {got} where the reference sampler chose {want} (uniform "
                        f"{uniforms[r, i]:.6f})"
                    )
                figures["boundary_ties"] += 1
            ref_lp = torch.log_softmax(lt.double(), -1).gather(1, torch.from_numpy(ids[:, i : i + 1]))[:, 0]
            d = max_abs_diff(logprobs[:, i], ref_lp.numpy(), f"logprobs at batch {batch}, step {i}")
            figures["logprobs_max_abs_diff"] = max(figures["logprobs_max_abs_diff"], d)
            x = ids[:, i : i + 1]
        for got_s, want_s in zip(new, carried, strict=True):
            d = max_abs_diff(got_s, want_s, f"state at batch {batch}")
            figures["state_max_abs_diff"] = max(figures["state_max_abs_diff"], d)
    over = {k: v for k, v in figures.items() if k.endswith("diff") and not v <= atol}
    if over or figures["boundary_ties"] > MAX_TIE_RATE * figures["draws"]:
        raise ExportValidationError(f"generation graph ({steps} steps) off (atol {atol:g}): {figures}")
    return figures


def agreement_rate(
    variant: ort.InferenceSession,
    reference: ort.InferenceSession,
    state_names: Sequence[str],
    vocab_size: int,
    hidden: tuple[int, int],
    top_k_max: int,
    *,
    batch: int = 64,
    seed: int = 1,
) -> float:
    """Share of rows whose first id agrees between two generation graphs (e.g. int8 vs fp32) from the same
    random states, tokens and uniforms. Only the first id is compared: after a disagreement the two runs
    apply different tokens, so later ids measure divergence, not the variant's accuracy."""
    rng = np.random.default_rng(seed)
    plain = is_plain_graph(variant)
    settings = validation_rows(vocab_size, 0 if plain else top_k_max)
    rows = [settings[i % len(settings)] for i in range(batch)]
    state = tuple(rng.uniform(-1, 1, (hidden[0], batch, hidden[1])).astype(np.float32) for _ in state_names)
    tokens = rng.integers(0, vocab_size, (batch, 1), dtype=np.int64)
    steps = int(variant.get_inputs()[[i.name for i in variant.get_inputs()].index("uniforms")].shape[1])
    feeds = generate_feeds(rows, state, state_names, tokens, rng.random((batch, steps)), plain=plain)
    a, b = variant.run(["ids"], feeds)[0], reference.run(["ids"], feeds)[0]
    return float(np.mean(a[:, 0] == b[:, 0]))
