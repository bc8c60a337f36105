"""The K-step generation graphs: K unrolled LM steps with sampling inside, so a run returns token ids.

    build_generate_graph(Path("model.onnx"), Path("model_gen_k8.onnx"), steps=8, vocab_size=96)
    build_plain_generate_graph(Path("model.onnx"), Path("model_gen_plain_k8.onnx"), steps=8, vocab_size=96)

Contract (`model_gen_k<K>.onnx`, manifest `generate[]` / `graphs["generate"]`), B dynamic:
  inputs   tokens       int64 [B, 1]   x0, the last sampled token, not yet applied to the state
           state_in.h (.c)  float32 [layers, B, hidden]
           uniforms     float32 [B, K] one draw per step from each session's own seeded stream
           temperature  float32 [B]    0 = greedy (argmax, first index on ties)
           top_k        int64 [B]      0 = off; 1..top_k_max honoured exactly
           top_p        float32 [B]    1 = off; honoured exactly when 1 <= top_k <= top_k_max (or when
                                       vocab <= top_k_max: pass top_k = vocab for "top_p alone")
  outputs  ids          int64 [B, K]   x1..xK
           logprobs     float32 [B, K] log_softmax(logits_i)[x_{i+1}] under the unmodified model
           state_out.h (.c)  the state after applying x0..x_{K-1} (xK is sampled, not applied)
Each step samples like server/sampling.py `sample_batch`: plain rows by the inverse CDF over the
vocabulary in id order (the id whose cumulative-weight interval holds u * total, searchsorted
side="right"), two-level in blocks of CDF_BLOCK so a 10k vocabulary needs no 10k-wide CumSum; cut rows
(top-k / top-p) like `_sample_cut`, by the inverse CDF over the kept candidates in descending order.
A row the graph cannot express (top_k > top_k_max, or top_p < 1 with top_k 0 and vocab > top_k_max)
must keep the host path.

The plain variant (`model_gen_plain_k<K>.onnx`, manifest `generate[]` with top_k_max 0) has the same
contract minus the cut: no top_k/top_p inputs, and it samples every row as a plain row (greedy at
temperature 0, else the inverse CDF above), so it serves a run whose rows all have top_k 0 and top_p 1.
Its sampler is written node by node (`_plain_sampler`) for the CPU, where per node and per vocabulary-
wide pass costs are what a step pays on top of the step graph:
  - no ArgMax over the vocabulary (ORT's is ~10x a ReduceMax: 390 vs 40 us at batch 64 x 10k): the
    logits are padded with -inf to whole CDF blocks once, the block maxima give the row max, and greedy
    is the first block holding the max, then ArgMax inside that block (first index on ties, as argmax);
  - exp once: e = exp(logits - max) gives the row's logsumexp (the sum of its block sums) and, at
    temperature 1, the weights themselves; only when some row's temperature is neither 0 nor 1 does an
    If branch compute weights = exp((logits - max) * (1 / t)) (Mul, not Div: ~half the cost);
  - the logprob of the chosen id from the shifted logits: (logits - max)[id] - log(sum e);
  - the two CDF levels (block sums [B, blocks], one block [B, 128]) in float64 as the host's cumsums,
    cheap since they are small: the vocabulary-wide passes stay float32.
bench/generate_graph.py measures it against the host path (docs/bench/generate_graph.json).

How it is built: the validated step graph (`model.onnx`) is copied K times, node for node, with its
weights shared (one initializer each, whatever K), chained through the state, and a sampler subgraph
(`Sampler`, exported from torch once) is spliced after each copy. So each step computes exactly what
the step graph computes, and both exporters' graphs work. A bundle's generation graph is spliced from
its final step graph (optimised, at the bundle's precision), so an int8 or fp16 generation graph is that
precision's step graph K times, with the sampler in float32 after the step graph's float32 logits.
(Converting a spliced fp32 graph instead does not work: onnxruntime 1.31's quantize_dynamic transposes
an LSTM weight shared by several nodes once per node, so the quantised generation graph computed
different logits from the quantised step graph.)
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from rnnserve.export.manifest import GenerateGraph, TensorSpec, generate_specs
from rnnserve.export.optimize import optimize_offline

CDF_BLOCK = 128  # == server.sampling.CDF_BLOCK: the same two-level inverse CDF
TOP_K_MAX = 64  # one TopK(kmax) per step serves every row's top_k <= kmax (vLLM users ask for 20-50)
GENERATE_INPUTS = ("tokens", "uniforms", "temperature", "top_k", "top_p")  # besides the state


def generate_file(steps: int, *, plain: bool = False) -> str:
    """The bundle file of the K-step generation graph (cut, or plain)."""
    return f"model_gen_plain_k{steps}.onnx" if plain else f"model_gen_k{steps}.onnx"


class Sampler(nn.Module):
    """One step's choice for every row: logits [B, V] -> (id [B] int64, logprob [B] float32)."""

    def __init__(self, vocab_size: int, top_k_max: int) -> None:
        super().__init__()
        self.vocab = vocab_size
        self.kmax = min(top_k_max, vocab_size)

    def forward(
        self, logits: Tensor, u: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor
    ) -> tuple[Tensor, Tensor]:
        m = logits.max(dim=-1, keepdim=True).values  # [B, 1]
        shifted = logits - m  # [B, V]
        lse = torch.log(torch.exp(shifted).sum(dim=-1))  # [B]: logsumexp of the unmodified logits
        greedy = torch.argmax(logits, dim=-1)  # [B]
        t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))  # [B], no 0 division
        scaled = shifted / t[:, None]  # [B, V], max 0 per row
        weights = torch.exp(scaled)  # [B, V] unnormalised probabilities
        plain = self._inverse_cdf(weights, u)  # [B]
        cut = self._sample_cut(scaled, u, top_k, top_p)  # [B]
        is_cut = (top_k > 0) | (top_p < 1.0)
        ids = torch.where(temperature > 0, torch.where(is_cut, cut, plain), greedy)  # [B]
        logprob = shifted.gather(1, ids[:, None])[:, 0] - lse  # [B]
        return ids, logprob

    def _inverse_cdf(self, weights: Tensor, u: Tensor) -> Tensor:
        """server.sampling.inverse_cdf: block sums, the block holding u * total, then inside that block."""
        v, b = self.vocab, CDF_BLOCK
        if v <= b:  # one block
            cdf = torch.cumsum(weights, dim=-1)  # [B, V]
            found = (cdf <= (u * cdf[:, -1])[:, None]).sum(dim=-1)  # [B]
            return torch.clamp(found, max=v - 1)
        blocks = -(-v // b)
        padded = nn.functional.pad(weights, (0, blocks * b - v))  # [B, blocks * b], zero weights
        block_cdf = torch.cumsum(padded.reshape(-1, blocks, b).sum(dim=-1), dim=-1)  # [B, blocks]
        target = u * block_cdf[:, -1]  # [B]
        block = torch.clamp((block_cdf <= target[:, None]).sum(dim=-1), max=blocks - 1)  # [B]
        before = block_cdf.gather(1, torch.clamp(block - 1, min=0)[:, None])[:, 0]  # [B]
        before = torch.where(block > 0, before, torch.zeros_like(before))
        columns = block[:, None] * b + torch.arange(b)  # [B, b]
        inner_cdf = before[:, None] + torch.cumsum(padded.gather(1, columns), dim=-1)  # [B, b]
        inner = torch.clamp((inner_cdf <= target[:, None]).sum(dim=-1), max=b - 1)  # [B]
        return torch.clamp(block * b + inner, max=v - 1)

    def _sample_cut(self, scaled: Tensor, u: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
        """server.sampling._sample_cut: the best k in descending order (ties: lower id first, as
        TopK and a stable sort agree), the smallest prefix whose mass reaches top_p, inverse CDF."""
        values, index = torch.topk(scaled, self.kmax, dim=-1)  # [B, kmax], sorted descending
        pos = torch.arange(self.kmax)[None, :]  # [1, kmax]
        k = torch.where(top_k > 0, torch.clamp(top_k, max=self.kmax), torch.full_like(top_k, self.kmax))
        w = torch.where(pos < k[:, None], torch.exp(values), torch.zeros_like(values))  # [B, kmax]
        cdf = torch.cumsum(w, dim=-1)  # [B, kmax]
        reach = (cdf < (top_p * cdf[:, -1])[:, None]).sum(dim=-1) + 1  # [B]: searchsorted(top_p) + 1
        keep = torch.minimum(k, reach)  # [B], >= 1
        cdf = torch.cumsum(torch.where(pos < keep[:, None], w, torch.zeros_like(w)), dim=-1)  # [B, kmax]
        total = cdf.gather(1, (keep - 1)[:, None])[:, 0]  # [B]
        j = torch.minimum((cdf <= (u * total)[:, None]).sum(dim=-1), keep - 1)  # [B]
        return index.gather(1, j[:, None])[:, 0]


def export_sampler(path: Path, vocab_size: int, top_k_max: int, opset: int) -> onnx.ModelProto:
    """The sampler as an ONNX graph (TorchScript exporter, batch dynamic); returns the loaded model."""
    b = 3
    args = (
        torch.randn(b, vocab_size),
        torch.rand(b),
        torch.ones(b),
        torch.zeros(b, dtype=torch.long),
        torch.ones(b),
    )
    names = ["logits", "u", "temperature", "top_k", "top_p"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer warnings: validated numerically anyway
        torch.onnx.export(
            Sampler(vocab_size, top_k_max),
            args,
            str(path),
            input_names=names,
            output_names=["id", "logprob"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "id", "logprob"]},
            opset_version=opset,
            dynamo=False,
        )
    optimize_offline(path, path)  # folded once here: the spliced step graph is optimised already
    return onnx.load(str(path))


def _splice(
    graph: onnx.GraphProto, prefix: str, node_prefix: str, bound: dict[str, str], shared: set[str]
) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """Copies of `graph`'s nodes: inputs in `bound` renamed to their value, `shared` (initializers) kept,
    every other tensor prefixed. Returns the nodes and the renaming of the graph's outputs."""

    def rename(name: str) -> str:
        if not name or name in shared:
            return name
        return bound.get(name, prefix + name)

    nodes = []
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name} has a subgraph: the step graph must be straight-line")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = node_prefix + (node.name or node.output[0])
        copy.ClearField("input")
        copy.ClearField("output")
        copy.input.extend(rename(n) for n in node.input)
        copy.output.extend(prefix + n for n in node.output)
        nodes.append(copy)
    return nodes, {o.name: rename(o.name) for o in graph.output}


def build_generate_graph(
    step_path: Path, dst: Path, steps: int, vocab_size: int, top_k_max: int = TOP_K_MAX
) -> Path:
    """Write the K-step generation graph of the LM step graph at `step_path` (any precision)."""
    step = onnx.load(str(step_path))
    opset = next(o.version for o in step.opset_import if o.domain in ("", "ai.onnx"))
    with tempfile.TemporaryDirectory() as tmp:
        sampler = export_sampler(Path(tmp) / "sampler.onnx", vocab_size, top_k_max, opset).graph
    state_in = [i.name for i in step.graph.input if i.name.startswith("state_in.")]
    shared = {t.name for t in step.graph.initializer}
    consts = [numpy_helper.from_array(np.array([1], np.int64), "gen/axis1")]  # Squeeze/Unsqueeze axis
    for t in sampler.initializer:  # the sampler's constants, shared by every step under their own names
        t.name = "sampler/" + t.name
    sampler_inits = {t.name.removeprefix("sampler/"): t.name for t in sampler.initializer}
    nodes: list[onnx.NodeProto] = []
    token, state = "tokens", {n: n for n in state_in}
    ids, logprobs = [], []
    for i in range(steps):
        step_nodes, out = _splice(step.graph, f"s{i}/", f"s{i}/", {"tokens": token, **state}, shared)
        nodes += step_nodes
        state = {n: out[n.replace("state_in.", "state_out.")] for n in state_in}
        logits, u = f"s{i}/logits_2d", f"s{i}/u"
        consts.append(numpy_helper.from_array(np.array(i, np.int64), f"gen/step{i}"))
        nodes += [
            helper.make_node("Squeeze", [out["logits"], "gen/axis1"], [logits], f"s{i}/squeeze"),
            helper.make_node("Gather", ["uniforms", f"gen/step{i}"], [u], f"s{i}/u", axis=1),
        ]
        bound = {"logits": logits, "u": u, "temperature": "temperature", "top_k": "top_k", "top_p": "top_p"}
        bound.update(sampler_inits)
        sample_nodes, sampled = _splice(sampler, f"d{i}/", f"d{i}/", bound, set())
        nodes += sample_nodes
        token = f"s{i}/next"
        nodes.append(helper.make_node("Unsqueeze", [sampled["id"], "gen/axis1"], [token], f"s{i}/next"))
        ids.append(token)
        logprobs.append(f"s{i}/logprob")
        nodes.append(
            helper.make_node("Unsqueeze", [sampled["logprob"], "gen/axis1"], [logprobs[-1]], f"s{i}/logprob")
        )
    nodes.append(helper.make_node("Concat", ids, ["ids"], "gen/ids", axis=1))
    nodes.append(helper.make_node("Concat", logprobs, ["logprobs"], "gen/logprobs", axis=1))
    for n, last in state.items():
        nodes.append(helper.make_node("Identity", [last], [n.replace("state_in.", "state_out.")], f"gen/{n}"))
    state_specs = [s for s in _specs(step.graph.input) if s.name in state_in]
    ins, outs = generate_specs(state_specs, steps)
    graph = helper.make_graph(
        nodes,
        f"generate_k{steps}",
        [_value_info(s) for s in ins],
        [_value_info(s) for s in outs],
        [*step.graph.initializer, *sampler.initializer, *consts],
    )
    model = helper.make_model(graph, opset_imports=list(step.opset_import), producer_name="rnnserve")
    model.functions.extend(step.functions)  # dynamo graphs may call local functions
    model.ir_version = step.ir_version
    model = onnx.shape_inference.infer_shapes(model)
    if all(o.domain in ("", "ai.onnx") for o in model.opset_import):  # int8 graphs use com.microsoft ops
        onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)


def generate_graph_record(
    file: str, steps: int, step_inputs: list[TensorSpec], vocab_size: int, top_k_max: int = TOP_K_MAX
) -> GenerateGraph:
    """The manifest's description of one generation graph (top_k_max 0: a plain graph)."""
    state = [s for s in step_inputs if s.name.startswith("state_in.")]
    ins, outs = generate_specs(state, steps, plain=top_k_max == 0)
    return GenerateGraph(
        file=file, steps=steps, top_k_max=min(top_k_max, vocab_size), inputs=ins, outputs=outs
    )


def build_plain_generate_graph(
    step_path: Path, dst: Path, steps: int, vocab_size: int, *, temperature_branch: bool = True
) -> Path:
    """Write the K-step plain generation graph of the LM step graph at `step_path` (any precision).

    `temperature_branch` False computes the tempered weights for every batch (no If): for measuring.
    """
    step = onnx.load(str(step_path))
    opset = next(o.version for o in step.opset_import if o.domain in ("", "ai.onnx"))
    state_in = [i.name for i in step.graph.input if i.name.startswith("state_in.")]
    shared = {t.name for t in step.graph.initializer}
    b = _Builder(opset)
    nodes = b.nodes
    # Once per run: the rows' controls and draws.
    b.add("Greater", ["temperature", b.const("zero", np.float32(0))], "gen/sampling")  # [B] bool
    b.add("Unsqueeze", ["gen/sampling", b.const("axes1", [1])], "gen/sampling2")  # [B, 1]
    t = b.add("Where", ["gen/sampling", "temperature", b.const("one", np.float32(1))], "gen/t")
    b.add("Reciprocal", [b.add("Unsqueeze", [t, "gen/axes1"], "gen/t2")], "gen/inv_t")  # [B, 1]
    tempered = None
    if temperature_branch:  # whether any row's weights are not exp(logits - max): temperature not in {0, 1}
        b.add("Equal", ["temperature", "gen/one"], "gen/t_is_1")
        b.add("And", ["gen/sampling", b.add("Not", ["gen/t_is_1"], "gen/t_not_1")], "gen/tempered_rows")
        b.add("Cast", ["gen/tempered_rows"], "gen/tempered_rows_f", to=TensorProto.FLOAT)
        b.reduce("ReduceMax", "gen/tempered_rows_f", "gen/tempered_any_f", axis=0, keepdims=False)
        tempered = b.add("Cast", ["gen/tempered_any_f"], "gen/tempered_any", to=TensorProto.BOOL)
    b.add("Cast", ["uniforms"], "gen/u64", to=TensorProto.DOUBLE)  # [B, K]
    us = [f"gen/u{i}" for i in range(steps)]  # [B, 1] each
    if steps == 1:
        b.add("Identity", ["gen/u64"], us[0])
    else:
        b.add("Split", ["gen/u64"], us, axis=1, **({"num_outputs": steps} if opset >= 18 else {}))
    token, state = "tokens", {n: n for n in state_in}
    ids, logprobs = [], []
    for i in range(steps):
        step_nodes, out = _splice(step.graph, f"s{i}/", f"s{i}/", {"tokens": token, **state}, shared)
        nodes += step_nodes
        state = {n: out[n.replace("state_in.", "state_out.")] for n in state_in}
        token, logprob = _plain_sampler(b, f"d{i}/", out["logits"], us[i], vocab_size, tempered)
        ids.append(token)
        logprobs.append(logprob)
    b.add("Concat", ids, "ids", axis=1)
    b.add("Concat", logprobs, "logprobs", axis=1)
    for n, last in state.items():
        b.add("Identity", [last], n.replace("state_in.", "state_out."))
    state_specs = [s for s in _specs(step.graph.input) if s.name in state_in]
    ins, outs = generate_specs(state_specs, steps, plain=True)
    graph = helper.make_graph(
        nodes,
        f"generate_plain_k{steps}",
        [_value_info(s) for s in ins],
        [_value_info(s) for s in outs],
        [*step.graph.initializer, *b.consts.values()],
    )
    model = helper.make_model(graph, opset_imports=list(step.opset_import), producer_name="rnnserve")
    model.functions.extend(step.functions)
    model.ir_version = step.ir_version
    model = onnx.shape_inference.infer_shapes(model)
    if all(o.domain in ("", "ai.onnx") for o in model.opset_import):
        onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return Path(dst)


class _Builder:
    """Nodes and constants of a hand-written graph (each node named after its first output)."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.consts: dict[str, onnx.TensorProto] = {}

    def const(self, name: str, value: object) -> str:
        name = f"gen/{name}"
        if name not in self.consts:
            array = np.asarray(value)
            self.consts[name] = numpy_helper.from_array(
                array.astype(np.int64) if array.dtype == int else array, name
            )
        return name

    def add(self, op: str, inputs: list[str], output: str | list[str], **attrs: Any) -> str:
        outputs = [output] if isinstance(output, str) else output
        self.nodes.append(helper.make_node(op, inputs, outputs, outputs[0], **attrs))
        return outputs[0]

    def reduce(self, op: str, x: str, out: str, axis: int, keepdims: bool = True) -> str:
        """ReduceMax/ReduceSum over one axis (ReduceMax takes its axes as an input from opset 18)."""
        if op == "ReduceSum" or self.opset >= 18:
            return self.add(op, [x, self.const(f"axes{axis}", [axis])], out, keepdims=int(keepdims))
        return self.add(op, [x], out, axes=[axis], keepdims=int(keepdims))


def _plain_sampler(
    b: _Builder, p: str, logits: str, u: str, vocab: int, tempered: str | None
) -> tuple[str, str]:
    """One step's plain sampling of logits [B, 1, vocab] with u [B, 1] float64: (next token [B, 1] int64,
    logprob [B, 1]). Semantics of server.sampling.sample_batch for rows without a cut (module doc)."""
    blk = CDF_BLOCK
    blocks = -(-vocab // blk)
    x = b.add("Squeeze", [logits, b.const("axes1", [1])], p + "logits")  # [B, V]
    if blocks > 1:  # -inf up to whole blocks: exp gives them weight 0, no max comes from them
        pads = b.const(f"pads{vocab}", [0, 0, 0, blocks * blk - vocab])
        x = b.add("Pad", [x, pads, b.const("neg_inf", np.float32(-np.inf))], p + "padded")  # [B, V']
        x3 = b.add("Reshape", [x, b.const("blocks3", [0, blocks, blk])], p + "logits3")  # [B, blocks, blk]
        b.reduce("ReduceMax", x3, p + "block_max", axis=2, keepdims=False)  # [B, blocks]
        m = b.reduce("ReduceMax", p + "block_max", p + "max", axis=1)  # [B, 1]
        # greedy: the first block holding the max, then the first max inside it
        b.add("Equal", [p + "block_max", m], p + "is_max_block")
        b.add("Cast", [p + "is_max_block"], p + "is_max_block_f", to=TensorProto.FLOAT)
        b.add("ArgMax", [p + "is_max_block_f"], p + "greedy_block", axis=1, keepdims=1)  # [B, 1]
        b.add("GatherND", [x3, p + "greedy_block"], p + "greedy_logits", batch_dims=1)  # [B, blk]
        b.add("ArgMax", [p + "greedy_logits"], p + "greedy_inner", axis=1, keepdims=1)
        b.add("Mul", [p + "greedy_block", b.const("block", np.int64(blk))], p + "greedy_base")
        greedy = b.add("Add", [p + "greedy_base", p + "greedy_inner"], p + "greedy")  # [B, 1]
    else:
        m = b.reduce("ReduceMax", x, p + "max", axis=1)
        greedy = b.add("ArgMax", [x], p + "greedy", axis=1, keepdims=1)  # first index on ties
    s = b.add("Sub", [x, m], p + "shifted")  # [B, V'], max 0
    e = b.add("Exp", [s], p + "exp")

    def block_sums(w: str, q: str) -> list[str]:  # nodes' outputs: [B, blocks, blk] and [B, blocks]
        w3 = b.add("Reshape", [w, "gen/blocks3"], q + "w3")
        return [w3, b.reduce("ReduceSum", w3, q + "block_sums", axis=2, keepdims=False)]

    def tempered_weights(q: str) -> str:
        return b.add("Exp", [b.add("Mul", [s, "gen/inv_t"], q + "scaled")], q + "weights")

    if blocks > 1:
        w3_e, sums_e = block_sums(e, p + "e_")
        z = b.reduce("ReduceSum", sums_e, p + "sum_exp", axis=1)  # [B, 1]
    else:
        z = b.reduce("ReduceSum", e, p + "sum_exp", axis=1)
    lse = b.add("Log", [z], p + "lse")

    def sample(q: str, w: str, w3: str, sums: str) -> str:  # the inverse CDF: sampled ids [B, 1]
        return _two_level(b, q, w3, sums, u, vocab, blocks) if blocks > 1 else _one_level(b, q, w, u, vocab)

    def sample_tempered(q: str) -> str:
        w = tempered_weights(q)
        return sample(q, w, *(block_sums(w, q) if blocks > 1 else ("", "")))

    # the sampling weights: e itself when every row's temperature is 0 or 1, else exp(shifted / t)
    if tempered is None:
        sampled = sample_tempered(p)
    else:  # the inverse CDF inside both branches: the If returns ids [B, 1], not a copy of the weights
        outer, b.nodes = b.nodes, []
        got = sample_tempered(p + "t/")
        then_nodes, b.nodes = b.nodes, []
        kept = sample(p + "e/", e, *((w3_e, sums_e) if blocks > 1 else ("", "")))
        else_nodes, b.nodes = b.nodes, outer

        def branch(name: str, nodes: list[onnx.NodeProto], result: str) -> onnx.GraphProto:
            return helper.make_graph(
                nodes, p + name, [], [helper.make_tensor_value_info(result, TensorProto.INT64, None)]
            )

        sampled = b.add("If", [tempered], p + "sampled", then_branch=branch("tempered", then_nodes, got),
                        else_branch=branch("untempered", else_nodes, kept))  # fmt: skip
    token = b.add("Where", ["gen/sampling2", sampled, greedy], p + "token")  # [B, 1]
    chosen = b.add("GatherElements", [s, token], p + "chosen", axis=1)  # [B, 1]
    return token, b.add("Sub", [chosen, lse], p + "logprob")


def _count_at_most(b: _Builder, q: str, cdf: str, target: str, cap: int) -> str:
    """min(#(cdf <= target), cap) per row, [B, 1] int64: searchsorted side="right", clamped."""
    b.add("LessOrEqual", [cdf, target], q + "le")
    b.add("Cast", [q + "le"], q + "le_i", to=TensorProto.INT64)
    b.reduce("ReduceSum", q + "le_i", q + "count", axis=1)
    return b.add("Min", [q + "count", b.const(f"cap{cap}", np.int64(cap))], q + "found")


def _one_level(b: _Builder, p: str, w: str, u: str, vocab: int) -> str:
    cdf = b.add(
        "CumSum",
        [b.add("Cast", [w], p + "w64", to=TensorProto.DOUBLE), b.const("axis1", np.int64(1))],
        p + "cdf",
    )
    total = b.add("Gather", [cdf, b.const(f"last{vocab}", [vocab - 1])], p + "total", axis=1)  # [B, 1]
    target = b.add("Mul", [u, total], p + "target")
    return _count_at_most(b, p, cdf, target, vocab - 1)


def _two_level(b: _Builder, p: str, w3: str, sums: str, u: str, vocab: int, blocks: int) -> str:
    """server.sampling.inverse_cdf: block sums' cumulative sum finds the block, that block's the id."""
    sums64 = b.add("Cast", [sums], p + "sums64", to=TensorProto.DOUBLE)  # [B, blocks]
    before_all = b.add("CumSum", [sums64, b.const("axis1", np.int64(1))], p + "before_all", exclusive=1)
    block_cdf = b.add("Add", [before_all, sums64], p + "block_cdf")  # == the inclusive CumSum
    total = b.add("Gather", [block_cdf, b.const(f"last{blocks}", [blocks - 1])], p + "total", axis=1)
    target = b.add("Mul", [u, total], p + "target")  # [B, 1]
    block = _count_at_most(b, p + "b_", block_cdf, target, blocks - 1)  # [B, 1]
    before = b.add("GatherElements", [before_all, block], p + "before", axis=1)  # [B, 1]
    inner_w = b.add("GatherND", [w3, block], p + "inner_w", batch_dims=1)  # [B, blk]
    inner64 = b.add("Cast", [inner_w], p + "inner64", to=TensorProto.DOUBLE)
    inner_cdf = b.add(
        "Add", [b.add("CumSum", [inner64, "gen/axis1"], p + "inner_cs"), before], p + "inner_cdf"
    )
    inner = _count_at_most(b, p + "i_", inner_cdf, target, CDF_BLOCK - 1)
    base = b.add("Mul", [block, b.const("block", np.int64(CDF_BLOCK))], p + "base")
    return b.add(
        "Min",
        [b.add("Add", [base, inner], p + "raw"), b.const(f"cap{vocab - 1}", np.int64(vocab - 1))],
        p + "sampled",
    )


_DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}


def _value_info(spec: TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, _DTYPES[spec.dtype], list(spec.shape))


def _specs(values: Iterable[onnx.ValueInfoProto]) -> list[TensorSpec]:
    """TensorSpecs of graph inputs (dims by value or by name)."""
    specs = []
    for v in values:
        dims: list[int | str] = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        specs.append(TensorSpec(v.name, dims, "float32" if v.type.tensor_type.elem_type == 1 else "int64"))
    return specs
