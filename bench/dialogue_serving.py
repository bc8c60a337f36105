"""Dialogue sessions served (docs/dialogue.md): constant memory over 1,000 turns, and turn latency.

    python bench/dialogue_serving.py --out docs/bench                  # 2x256 stacks, 1k words
    python bench/dialogue_serving.py --quick --out /tmp/x              # smoke test (tiny sizes)

Builds two random-weight models of comparable size with the same word tokenizer: an HRED dialogue model
(LSTM encoder, context and decoder, each --layers x --hidden, embedding --emb) and a flat LSTM LM
(--layers x --hidden), exported for real, and serves both from one `rnnserve serve` process. A "turn" is
what `rnnserve chat` does: `say` (--user-tokens random words, then <eos>: one Stream message) then
`reply` (a Generate with end_turn of at most --reply-tokens tokens, temperature 1, consumed to the end).

(a) Memory: --memory-dialogues dialogues run --turns turns each, concurrently; at turns 1, 10, 100 and
    1,000 every dialogue pauses while the bench reads one session's snapshot size (ExportSession bytes)
    and the server's RSS. A dialogue's state is fixed-size (enc, ctx, dec), so both stay flat.
(b) Latency: --concurrency dialogues (then as many plain LM sessions, the same turns through `say` /
    `reply`, which a plain LM serves too: <eos> ends its "document") run --latency-turns turns each;
    turn latency (say + reply, p50/p99) and reply tokens/s over the whole run.
The load generator (asyncio, the real client) shares the machine's cores with the server.
Writes <out>/dialogue_serving.json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from benchutil import median_ms
from serving import free_port, percentiles, rss_bytes, server_process

from rnnserve.client import AsyncClient
from rnnserve.client.aio_session import AsyncSession

CHECKPOINTS = (1, 10, 100, 1000)  # turns at which memory is read (those <= --turns)


@dataclass(frozen=True)
class Sizes:
    words: int  # tokenizer words (the vocabulary adds <unk> and <eos>)
    emb: int
    hidden: int
    layers: int


def build_models(sizes: Sizes, root: Path) -> Path:
    """A model repository with `chat` (random HRED) and `lm` (random LSTM LM), the same tokenizer."""
    import torch

    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.training.config import TrainConfig
    from rnnserve.training.dialogue_checkpoint import save_dialogue_checkpoint
    from rnnserve.training.dialogue_model import DialogueArgs, DialogueModel
    from rnnserve.training.model import ModelArgs, RNNLanguageModel
    from rnnserve.training.tokenizer import build_word_tokenizer, special_token_ids
    from rnnserve.training.train import save_checkpoint

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(" ".join(f"w{i}" for i in range(sizes.words)))
    vocab = tokenizer.get_vocab_size()
    h = sizes.hidden
    dialogue = DialogueArgs(
        cell="lstm", vocab_size=vocab, embedding_size=sizes.emb, encoder_hidden=h, context_hidden=h,
        decoder_hidden=h, num_layers=sizes.layers, dropout=0.0, eos_id=special_token_ids(tokenizer)["eos"],
    )  # fmt: skip
    (root / "chat").mkdir(parents=True)
    save_dialogue_checkpoint(
        root / "chat/checkpoint.pt", DialogueModel(dialogue).eval(), tokenizer, {}, tokenizer_kind="word"
    )
    export_checkpoint(root / "chat/checkpoint.pt", root / "repo", "chat")
    (root / "lm").mkdir()
    tokenizer.save(str(root / "lm/tokenizer.json"))
    config = TrainConfig(
        tokenizer="word", cell="lstm", layers=sizes.layers, hidden=h, emb=sizes.emb, out_dir=str(root / "lm")
    )
    lm = RNNLanguageModel(ModelArgs("lstm", vocab, sizes.emb, h, sizes.layers, dropout=0.0)).eval()
    save_checkpoint(root / "lm/checkpoint.pt", lm, config, {"val_ppl": float("nan")})
    export_checkpoint(root / "lm/checkpoint.pt", root / "repo", "lm")
    return root / "repo"


def raw_step_ms(repo: Path, model: str, batch: int, turn: bool = False) -> float | None:
    """ONNX Runtime alone (this process, the server's own runtime): median ms of one generated token's
    step ("last" graph) for `batch` sessions, what the served figures pay per token beyond gRPC. `turn`:
    every row feeds the end-of-turn token (the "turn_last" graph; None for a bundle without one)."""
    from rnnserve.export.manifest import read_manifest
    from rnnserve.server.runtime import OnnxModel

    bundle = next(p.parent for p in (repo / model).glob("*/manifest.json"))
    onnx = OnnxModel(bundle, read_manifest(bundle))
    if turn and onnx.end_of_turn is None:
        return None
    token = onnx.end_of_turn if turn and onnx.end_of_turn is not None else 5
    tokens, state = np.full((batch, 1), token, dtype=np.int64), onnx.initial_state(batch)  # (batch, 1)
    return median_ms(lambda: onnx.run_last(tokens, state, turn=turn))


@dataclass
class Turns:
    """What the turns of a run measured."""

    latencies_s: list[float]  # say + reply, per turn
    reply_tokens: int  # tokens of every reply (their <eos> included)
    seconds: float  # the run's wall time


async def turn(session: AsyncSession, rng: random.Random, args: argparse.Namespace) -> int:
    """One turn: say --user-tokens random words, then take the whole reply; its token count."""
    await session.say(" ".join(f"w{rng.randrange(args.words)}" for _ in range(args.user_tokens)))
    reply = session.reply(max_tokens=args.reply_tokens, temperature=1.0, seed=rng.randrange(2**31))
    return sum([1 async for _ in reply])


async def run_turns(
    client: AsyncClient, model: str, dialogues: int, turns: int, args: argparse.Namespace
) -> Turns:
    """`dialogues` sessions of `model` each running `turns` turns back to back, all at once."""
    latencies: list[float] = []
    tokens = [0]

    async def one(k: int) -> None:
        rng = random.Random(k)
        async with await client.session(model) as session:
            for _ in range(turns):
                started = time.perf_counter()
                made = await turn(session, rng, args)
                tokens[0] += made  # (not `+= await`: the sum would be read before the await)
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(dialogues)))
    return Turns(latencies, tokens[0], time.perf_counter() - started)


async def memory_run(client: AsyncClient, pid: int, args: argparse.Namespace) -> list[dict[str, float]]:
    """(a): dialogues running --turns turns, paused at each checkpoint to read memory."""
    marks = [t for t in CHECKPOINTS if t <= args.turns]
    n = args.memory_dialogues
    arrived = {t: asyncio.Event() for t in marks}
    resume = {t: asyncio.Event() for t in marks}
    counts = dict.fromkeys(marks, 0)
    sessions: list[AsyncSession] = []

    async def one(k: int) -> None:
        rng = random.Random(k)
        async with await client.session("chat") as session:
            sessions.append(session)
            for t in range(1, args.turns + 1):
                await turn(session, rng, args)
                if t in counts:
                    counts[t] += 1
                    if counts[t] == n:
                        arrived[t].set()
                    await resume[t].wait()

    async def measure() -> list[dict[str, float]]:
        points = []
        for t in marks:
            await arrived[t].wait()
            snapshot = await sessions[0].export()
            points.append(
                {"turn": t, "position": sessions[0].position, "snapshot_bytes": len(snapshot),
                 "rss_mb": rss_bytes(pid) / 2**20}
            )  # fmt: skip
            print(f"  turn {t:5d}: position {points[-1]['position']:7d}, snapshot {len(snapshot):,} B, "
                  f"server RSS {points[-1]['rss_mb']:.1f} MB", flush=True)  # fmt: skip
            resume[t].set()
        return points

    points, *_ = await asyncio.gather(measure(), *(one(k) for k in range(n)))
    return points


def latency_row(
    model: str, c: int, t: Turns, raw_ms: float | None, raw_turn_ms: float | None
) -> dict[str, float | str | int | None]:
    p50, _, p99 = percentiles(t.latencies_s)
    return {
        "model": model, "concurrency": c, "turns": len(t.latencies_s), "turn_p50_ms": p50,
        "turn_p99_ms": p99, "reply_tokens_per_s": t.reply_tokens / t.seconds,
        "turns_per_s": len(t.latencies_s) / t.seconds, "raw_step_ms": raw_ms, "raw_turn_ms": raw_turn_ms,
    }  # fmt: skip


def write_report(
    out: Path, result: dict[str, object], memory: list[dict[str, float]], rows: list[dict]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    turns = [p["turn"] for p in memory]
    left.plot(turns, [p["rss_mb"] for p in memory], "o-", label="server RSS (MB)")
    left.plot(turns, [p["snapshot_bytes"] / 1024 for p in memory], "s-", label="session snapshot (KB)")
    left.set_xscale("log")
    left.set_xlabel("turns into the conversation")
    left.set_ylim(bottom=0)
    left.set_title(f"(a) memory, {result['memory_dialogues']} dialogues")
    left.legend()
    names = [f"{r['model']}\nc={r['concurrency']}" for r in rows]
    x = np.arange(len(rows))
    right.bar(x - 0.2, [r["turn_p50_ms"] for r in rows], 0.4, label="turn p50 (ms)")
    right.bar(x + 0.2, [r["turn_p99_ms"] for r in rows], 0.4, label="turn p99 (ms)")
    right.set_xticks(x, names)
    right.set_title("(b) say + reply latency")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "dialogue_serving.png", dpi=120)
    raw = {r["model"]: float(r["raw_step_ms"] or 0.0) for r in rows}
    ratio = raw["chat"] / raw["lm"]
    lines = [
        f"# Dialogue sessions served ({result['model_sizes']})",
        "",
        f"`{result['command']}` on {os.cpu_count()} cores (server and load generator share them). "
        f"A turn: say {result['user_tokens']} words + <eos>, reply of at most {result['reply_tokens']} "
        "tokens (temperature 1) + the <eos> that closes it.",
        "",
        "## (a) Memory over a conversation",
        "",
        "| turn | position | session snapshot (B) | server RSS (MB) |",
        "|---:|---:|---:|---:|",
        *(
            f"| {p['turn']:,} | {p['position']:,} | {p['snapshot_bytes']:,} | {p['rss_mb']:.1f} |"
            for p in memory
        ),
        "",
        f"The state is {result['state_bytes']:,} B whatever the conversation's length (enc, ctx, dec: h and "
        "c); the snapshot adds the next-token log-probabilities (vocabulary x 4 B), the recent tokens and "
        "the last message's record (the last reply's tokens), which is why it moves by a few bytes.",
        "",
        "## (b) Turn latency and reply throughput",
        "",
        "| model | sessions | turns | turn p50 ms | turn p99 ms | reply tokens/s | turns/s | raw step ms "
        "| raw turn ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['model']} | {r['concurrency']} | {r['turns']:,} | {r['turn_p50_ms']:.1f} | "
            f"{r['turn_p99_ms']:.1f} | {r['reply_tokens_per_s']:,.0f} | {r['turns_per_s']:,.1f} | "
            f"{r['raw_step_ms']:.2f} | "
            + ("-" if r["raw_turn_ms"] is None else f"{r['raw_turn_ms']:.2f}")
            + " |"
            for r in rows
        ),
        "",
        "raw step ms: ONNX Runtime alone (no server), one generated token's step for all the sessions at "
        'once (the "last" graph, batch = sessions). The dialogue step graph runs the encoder and the '
        f"decoder only (the context passes through): {ratio:.1f}x the LM's step here. raw turn ms: the "
        'same when every row feeds <eos> (the "turn_last" graph: the context step, the decoder re-init and '
        "the <eos> re-read as well), which a session pays once per turn; the server runs the rows that end "
        "a turn through it and the others through the step graph. The served figures also pay gRPC, the "
        "client and the Python serving path per message, on cores the load generator shares: they vary "
        "from run to run on a busy machine.",
        "",
    ]
    (out / "dialogue_serving.md").write_text("\n".join(lines))
    (out / "dialogue_serving.json").write_text(
        json.dumps({**result, "memory": memory, "latency": rows}, indent=2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench"))
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--emb", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--words", type=int, default=1000)
    parser.add_argument("--turns", type=int, default=1000, help="(a) turns of each dialogue")
    parser.add_argument("--memory-dialogues", type=int, default=8, help="(a) dialogues at once")
    parser.add_argument("--concurrency", type=int, default=64, help="(b) sessions at once")
    parser.add_argument("--latency-turns", type=int, default=20, help="(b) turns of each session")
    parser.add_argument("--user-tokens", type=int, default=8)
    parser.add_argument("--reply-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.emb, args.words, args.turns, args.memory_dialogues = 32, 16, 100, 100, 2
        args.concurrency, args.latency_turns = 8, 3
    sizes = Sizes(args.words, args.emb, args.hidden, args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building models ({sizes}) ...", flush=True)
        repo = build_models(sizes, Path(tmp))
        raw = {m: raw_step_ms(repo, m, args.concurrency) for m in ("chat", "lm")}
        raw_turn = {m: raw_step_ms(repo, m, args.concurrency, turn=True) for m in ("chat", "lm")}
        print(f"raw ORT step, batch {args.concurrency}: {raw}; turn: {raw_turn}", flush=True)
        port = free_port()
        url = f"127.0.0.1:{port}"
        command = [sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--port", str(port),
                   "--metrics-port", "-1"]  # fmt: skip
        with server_process(command, url) as proc:
            print("(a) memory", flush=True)

            async def both() -> tuple[list[dict[str, float]], list[dict]]:
                async with AsyncClient(url, timeout=600) as client:
                    memory = await memory_run(client, proc.pid, args)
                    rows = []
                    for model in ("chat", "lm"):
                        t = await run_turns(client, model, args.concurrency, args.latency_turns, args)
                        rows.append(latency_row(model, args.concurrency, t, raw[model], raw_turn[model]))
                        print(f"(b) {model}: {rows[-1]}", flush=True)
                    return memory, rows

            memory, rows = asyncio.run(both())
    result = {
        "command": "python bench/dialogue_serving.py " + " ".join(sys.argv[1:]),
        "model_sizes": f"random-weight HRED, LSTM {args.layers}x{args.hidden} encoder, context and decoder, "
        f"embedding {args.emb}, vocabulary {args.words + 2}; the LM: LSTM {args.layers}x{args.hidden}",
        "user_tokens": args.user_tokens,
        "reply_tokens": args.reply_tokens,
        "memory_dialogues": args.memory_dialogues,
        "sizes": asdict(sizes),
        # enc, ctx and dec, each h and c: layers x hidden float32 (the snapshot adds the next-token
        # log-probabilities, vocabulary x 4 B, recent tokens and the last message's record)
        "state_bytes": 3 * 2 * args.layers * args.hidden * 4,
    }
    write_report(args.out, result, memory, rows)
    print((args.out / "dialogue_serving.md").read_text())


if __name__ == "__main__":
    main()
