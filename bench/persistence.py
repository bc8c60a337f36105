"""Durable sessions (issue 14): what the Redis session store costs, and how many sessions it holds.

    python bench/persistence.py --out docs/bench                     # demo LM, 1,000,000 sessions held
    python bench/persistence.py --preset design --held 100000 --out docs/bench
    python bench/persistence.py --quick --out /tmp/x                 # smoke test (tiny sizes)

Starts a real redis-server (no persistence, loopback) and three servers side by side, one per mode:
memory (today's server), redis write-behind (--persist-interval-ms 50) and redis write-through (0).
The modes take turns in --rounds rounds (a shared machine's drift hits them alike) on bench/serving.py's
workloads: 1 and 64 sessions streaming one token per message, and 64 sessions running Generate calls
of --tokens tokens. Each redis mode is reported as a ratio to memory measured in the same run. Redis's
own counters are read at the edges of each measurement window: commands (INFO commandstats, those run
inside the store's scripts included) and reply writes (total_writes_processed: one per round trip of a
small request, a few for a large pipeline, which Redis reads in chunks) per message show the batching.

Then sessions held: one server with --idle-ttl 1 (a session idle 1 s leaves memory for Redis) gets
sessions in waves, each CreateSession + one fed token through the client's channel and request
builder, for --grpc-seconds; the rest up to --held are written straight into Redis with the server's
own RedisStore (save, then release its leases; real snapshot bytes: one real session's export, with new
ids), the server reviving 50 random ones after each wave; at the end it revives --revive random sessions
among all held, each of which must answer at the right position. Server RSS and Redis used_memory are
sampled after every wave.
Writes <out>/persistence[-design].json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis
import redis.asyncio as aioredis
from serving import (
    GenerateLoad,
    Window,
    build_model,
    free_port,
    generate_load,
    generate_row,
    percentiles,
    rss_bytes,
    server_process,
    stream_load,
)

from rnnserve.client import AsyncClient
from rnnserve.client.requests import feed_request
from rnnserve.server.redis_store import RedisStore
from rnnserve.server.store import StoredSession
from rnnserve.v1 import rnnserve_pb2 as pb

MEMORY, BEHIND, THROUGH = "memory", "redis write-behind 50ms", "redis write-through"
TTL_S = 7200  # the held sessions' TTL (server default and direct writes): none expires during a run
Result = dict[str, Any]


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server on a free loopback port, without persistence (as tests/redis_server.py starts it)."""
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as directory:
        port = free_port()
        proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", directory, "--logfile", f"{directory}/redis.log"], stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client, deadline = redis.Redis(port=port), time.monotonic() + 15
            while not _pings(client):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(Path(directory, "redis.log").read_text()[-2000:])
                time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass(frozen=True)
class Probe(Window):
    """A Window that remembers its bounds, so that Redis's counters can be read at its edges."""

    seen: list[tuple[float, float]] = field(default_factory=list)

    def bounds(self) -> tuple[float, float]:
        self.seen.append(super().bounds())
        return self.seen[-1]


@dataclass
class Sample:
    """One workload on one mode in one round: its rate, latencies and Redis's counts in the window."""

    tokens_per_s: float
    latencies: list[float]  # stream: round trips (generate: in `load`)
    load: GenerateLoad | None
    messages: int  # messages the clients received in the window
    commands: int  # Redis commands in the window (INFO excluded)
    reply_writes: int  # Redis reply writes in the window


async def measure(
    url: str, redis_url: str, workload: str, c: int, tokens: int, vocab: int, window: Window
) -> Sample:
    probe, r = Probe(window.warmup_s, window.duration_s), aioredis.from_url(redis_url)

    async def counters() -> tuple[int, int]:
        stats = await r.info("commandstats")  # every command, those run inside scripts included
        commands = sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))
        return int(commands), int((await r.info("stats"))["total_writes_processed"])

    async def counts() -> tuple[int, int]:
        while not probe.seen:
            await asyncio.sleep(0.005)
        start, end = probe.seen[0]
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        a = await counters()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        b = await counters()
        return b[0] - a[0], max(0, b[1] - a[1] - 2)  # less our own two INFO replies in between

    try:
        if workload == "stream":
            (rate, lat), (commands, trips) = await asyncio.gather(stream_load(url, c, vocab, probe), counts())
            return Sample(rate, lat, None, len(lat), commands, trips)
        load, (commands, trips) = await asyncio.gather(generate_load(url, c, tokens, probe), counts())
        return Sample(load.tokens_per_s, [], load, load.messages, commands, trips)
    finally:
        await r.aclose()


def summarize(mode: str, workload: str, c: int, samples: list[Sample], memory: list[Sample]) -> Result:
    """Pooled over the rounds; `vs_memory` from the mean rates, `round_ratios` round by round."""
    rate, first = float(np.mean([s.tokens_per_s for s in samples])), None
    if workload == "stream":
        p50, _, p99 = percentiles([x for s in samples for x in s.latencies])
    else:  # p50/p99 of the gaps between messages of a call, as bench/serving.py reports them
        gs = [s.load for s in samples if s.load]
        gaps, firsts = [x for g in gs for x in g.message_gaps], [x for g in gs for x in g.first_messages]
        pooled = GenerateLoad(rate, gaps, firsts, sum(g.messages for g in gs), sum(g.tokens for g in gs))
        row = generate_row(mode, c, pooled)
        p50, p99, first = row.p50_ms, row.p99_ms, row.first_token_p50_ms
    messages, base = max(1, sum(s.messages for s in samples)), np.mean([s.tokens_per_s for s in memory])
    return {
        "mode": mode, "workload": workload, "concurrency": c, "tokens_per_s": rate,
        "vs_memory": float(rate / base) if base else None,
        "round_ratios": [s.tokens_per_s / m.tokens_per_s
                         for s, m in zip(samples, memory, strict=True) if m.tokens_per_s],
        "p50_ms": p50, "p99_ms": p99, "first_token_p50_ms": first,
        "commands_per_msg": sum(s.commands for s in samples) / messages,
        "reply_writes_per_msg": sum(s.reply_writes for s in samples) / messages,
    }  # fmt: skip


async def in_flight(fn: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> list[Any]:
    """`n` calls of `fn`, `concurrency` at a time; their results."""
    out: list[Any] = []

    async def worker(k: int) -> None:
        for _ in range(k):
            out.append(await fn())

    await asyncio.gather(*(worker(n // concurrency + (i < n % concurrency)) for i in range(concurrency)))
    return out


async def hold(
    url: str, pid: int, redis_url: str, target: int, grpc_s: float, revive: int, wave: int
) -> Result:
    """Sessions held in Redis with the server's RSS sampled (see the module's docstring)."""
    r, store, points, latencies = aioredis.from_url(redis_url), RedisStore(redis_url), [], []

    async def sample(how: str, held: int) -> None:  # held: sessions made so far
        used = (await r.info("memory"))["used_memory"]
        rss = rss_bytes(pid) / 2**20
        points.append({"held": held, "rss_mb": rss, "redis_mb": used / 2**20, "how": how})

    async with AsyncClient(url, timeout=120) as client:

        async def feed(session_id: str, position: int) -> int:
            """One message on a stream of its own, ended after the reply: the position after (-1: error)."""
            call = client.stub.Stream()
            try:
                await call.write(
                    feed_request(session_id, [3], top_k=1, token_logprobs=False, expected_position=position)
                )
                reply = await call.read()
                await call.done_writing()
                await call.code()
                return int(reply.position)
            except (grpc.RpcError, AttributeError):  # AttributeError: EOF, the stream ended without a reply
                return -1

        async def create() -> str:
            request = pb.CreateSessionRequest(model="bench", ttl_seconds=TTL_S)
            session_id = (await client.stub.CreateSession(request, timeout=120)).session_id
            if await feed(session_id, 0) != 1:
                raise RuntimeError(f"session {session_id}: its first message failed")
            return str(session_id)

        async def revive_one() -> bool:
            j = random.randrange(len(ids))  # each at most once (a revived session is at position 2)
            ids[j], ids[-1] = ids[-1], ids[j]
            start = time.perf_counter()
            ok = await feed(ids.pop(), 1) == 2
            latencies.append(time.perf_counter() - start)
            return ok

        base = (await r.info("memory"))["used_memory"]
        await sample("start", 0)
        ids: list[str] = []
        start = time.perf_counter()
        while len(ids) < target and (not ids or time.perf_counter() - start < grpc_s):
            ids += await in_flight(create, min(wave, target - len(ids)), 64)
            await sample("gRPC", len(ids))
        grpc_n, grpc_s = len(ids), time.perf_counter() - start
        print(f"  held: {grpc_n} sessions created through gRPC in {grpc_s:.0f} s", flush=True)
        exported = (await client.stub.ExportSession(pb.ExportSessionRequest(session_id=ids[0]))).snapshot
        snapshot = pb.SessionSnapshot.FromString(exported)
        direct_n, start, ok, tried, written = target - grpc_n, time.perf_counter(), 0, 0, 0
        while written < direct_n:
            goal = written + min(max(10_000, direct_n // 20), direct_n - written)
            while written < goal:
                records = []
                for _ in range(min(1000, goal - written)):
                    snapshot.session_id = uuid.uuid4().hex
                    if snapshot.HasField("applied_input"):
                        snapshot.applied_input.result.session_id = snapshot.session_id
                    records.append(StoredSession(snapshot.session_id, snapshot.SerializeToString(), TTL_S))
                    ids.append(snapshot.session_id)
                await store.save(records)
                # Let go of them as a replica does when a session leaves its memory: the server may take them.
                await store.release([r.session_id for r in records])
                written += len(records)
            ok, tried = ok + sum(await in_flight(revive_one, 50, 16)), tried + 50
            await sample("direct", grpc_n + written)
        direct_s = time.perf_counter() - start
        print(f"  held: {direct_n} written into Redis in {direct_s:.0f} s; {ok}/{tried} revived", flush=True)
        latencies.clear()
        final_ok = sum(await in_flight(revive_one, min(revive, len(ids)), 64))
        await asyncio.sleep(2.5)  # they leave memory again
        await sample("after revival", target)
    # Sessions in Redis: the store's own count (a SCAN of its session keys; leases are other keys).
    used, held, keys = (await r.info("memory"))["used_memory"], await store.count(), int(await r.dbsize())
    await store.aclose()
    await r.aclose()
    first, (p50, _, p99) = next(p for p in points if p["how"] == "gRPC"), percentiles(latencies)
    return {
        "held": held, "redis_keys": keys, "grpc_sessions": grpc_n, "grpc_seconds": grpc_s,
        "grpc_per_s": grpc_n / grpc_s,
        "direct_sessions": direct_n, "direct_seconds": direct_s, "revived_during_direct": [ok, tried],
        "revived": [final_ok, len(latencies)], "revive_p50_ms": p50, "revive_p99_ms": p99,
        "snapshot_bytes": len(exported), "redis_bytes_per_session": (used - base) / max(1, held),
        "rss_start_mb": points[0]["rss_mb"], "rss_first_wave_mb": first["rss_mb"],
        "rss_max_mb": max(p["rss_mb"] for p in points), "rss_end_mb": points[-1]["rss_mb"],
        "rss_growth_per_session_bytes":  # None: every session came in the first wave
            (points[-1]["rss_mb"] - first["rss_mb"]) * 2**20 / (held - first["held"])
            if held > first["held"] else None,
        "points": points,
    }  # fmt: skip


def goals(rows: list[Result], held: Result, c: int, state_bytes: int) -> list[tuple[str, str, bool]]:
    out = []
    for workload, doing in (("stream", "streaming"), ("generate", "generating")):
        x = next(x for x in rows if (x["mode"], x["workload"], x["concurrency"]) == (BEHIND, workload, c))
        rounds = (
            f"rounds {min(x['round_ratios']):.0%}..{max(x['round_ratios']):.0%}" if x["round_ratios"] else ""
        )
        met = bool(x["vs_memory"] and x["vs_memory"] >= 0.9)
        out.append((f"write-behind, {c} {doing} sessions: >= 90% of memory's tokens/s",
                    f"{x['vs_memory']:.0%} ({rounds})", met))  # fmt: skip
    growth, (ok, tried) = held["rss_growth_per_session_bytes"], held["revived"]
    out.append((f"{held['held']:,} sessions held in Redis, server RSS flat (growth <= 1% of the state "
                "per session)", f"RSS {held['rss_first_wave_mb']:.0f} MB after the first wave -> "
                f"{held['rss_end_mb']:.0f} MB (max {held['rss_max_mb']:.0f}): "
                f"{growth or float('nan'):.1f} B per session vs a {state_bytes} B state; "
                f"{ok}/{tried} random sessions revived",
                growth is not None and growth <= 0.01 * state_bytes and ok == tried))  # fmt: skip
    return out


def table(rows: list[Result]) -> list[str]:
    def f(v: float | None, fmt: str) -> str:
        return "" if v is None or v != v else format(v, fmt)

    lines = ["| mode | workload | sessions | tokens/s | vs memory (rounds) | p50 ms | p99 ms "
             "| 1st token p50 ms | Redis cmds/msg | Redis reply writes/msg |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for x in rows:
        rs = x["round_ratios"]
        vs = f"{x['vs_memory']:.0%} ({min(rs):.0%}..{max(rs):.0%})" if x["mode"] != MEMORY and rs else ""
        lines.append(f"| {x['mode']} | {x['workload']} | {x['concurrency']} | {x['tokens_per_s']:,.0f} "
                     f"| {vs} | {f(x['p50_ms'], '.2f')} | {f(x['p99_ms'], '.2f')} "
                     f"| {f(x['first_token_p50_ms'], '.1f')} "
                     f"| {x['commands_per_msg']:.3f} | {x['reply_writes_per_msg']:.3f} |")  # fmt: skip
    return lines


def plot(rows: list[Result], held: Result, path: Path, title: str) -> None:
    """Tokens/s per mode for each workload (labelled with the ratio to memory), the streamed message's
    round trip (p50, p99 pale), and server RSS and Redis memory against the sessions held."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colours = {MEMORY: "tab:gray", BEHIND: "tab:blue", THROUGH: "tab:orange"}
    loads = list(dict.fromkeys((x["workload"], x["concurrency"]) for x in rows))
    fig, (tput, lat, mem) = plt.subplots(1, 3, figsize=(20, 5.5))
    for k, mode in enumerate(colours):
        mine = [
            next(x for x in rows if (x["mode"], x["workload"], x["concurrency"]) == (mode, *w)) for w in loads
        ]
        bars = tput.bar(np.arange(len(loads)) + (k - 1) * 0.27, [x["tokens_per_s"] for x in mine], 0.27,
                        color=colours[mode], label=mode)  # fmt: skip
        for bar, x in zip(bars, mine, strict=True):
            if x["vs_memory"] and mode != MEMORY:
                tput.annotate(f"{x['vs_memory']:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=8)  # fmt: skip
        streams = [x for x in mine if x["workload"] == "stream"]
        xs = np.arange(len(streams)) + (k - 1) * 0.27
        lat.bar(xs, [x["p99_ms"] for x in streams], 0.27, color=colours[mode], alpha=0.35)
        lat.bar(
            xs, [x["p50_ms"] for x in streams], 0.27, color=colours[mode], label=f"{mode}: p50 (p99 pale)"
        )
    tput.set_xticks(range(len(loads)), [f"{w}, {c} session(s)" for w, c in loads])
    tput.set(ylabel="tokens/s, all sessions (label: vs memory)", title="Throughput per persistence mode")
    streamed = [c for w, c in loads if w == "stream"]
    lat.set_xticks(range(len(streamed)), [f"{c} streaming session(s)" for c in streamed])
    lat.set(yscale="log", ylabel="round trip of one message (ms)", title="Streaming: a message's round trip")
    points, rss_ax = held["points"], mem.twinx()  # RSS on its own axis (from 0), so a slope would show
    for ax, key, colour, what in ((rss_ax, "rss_mb", "tab:red", "server RSS (right axis)"),
                                  (mem, "redis_mb", "tab:green", "Redis used_memory")):  # fmt: skip
        ax.plot([p["held"] for p in points], [p[key] for p in points], color=colour, linewidth=1)
        for how, marker in (("gRPC", "o"), ("direct", "s"), ("after revival", "*")):
            mine = [p for p in points if p["how"] == how]
            ax.plot(
                [p["held"] for p in mine],
                [p[key] for p in mine],
                marker,
                color=colour,
                label=f"{what}: {how}",
            )
    rss_ax.set(ylim=(0, 1.3 * max(p["rss_mb"] for p in points)), ylabel="server RSS (MB)")
    rss_ax.legend(fontsize=7, loc="lower right")
    mem.set(xlabel="sessions held in Redis", ylabel="Redis used_memory (MB)", title="Sessions held "
            "(--idle-ttl 1; gRPC: created through the server, direct: RedisStore.save)")  # fmt: skip
    tput.set_yscale("log")
    for ax in (tput, lat):
        ax.yaxis.set(major_locator=LogLocator(subs=(1.0, 2.0, 5.0)), minor_formatter=NullFormatter(),
                     major_formatter=FuncFormatter(lambda v, _: f"{v:g}"))  # fmt: skip
    for ax in (tput, lat, mem):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        ax.title.set_fontsize(10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--preset", choices=["demo", "design"], default="demo")
    add("--sessions", type=int, default=64, help="the many-sessions level (the other is 1)")
    add("--tokens", type=int, default=256, help="max_tokens of each Generate call")
    add("--duration", type=float, default=3.0, help="seconds measured per workload, mode and round")
    add("--warmup", type=float, default=0.5, help="seconds of each measurement not counted")
    add("--rounds", type=int, default=5, help="rounds in which the modes take turns")
    add("--held", type=int, default=1_000_000, help="sessions to hold in Redis")
    add("--grpc-seconds", type=float, default=300, help="seconds creating sessions through gRPC")
    add("--wave", type=int, default=5000, help="sessions created through gRPC per wave")
    add("--revive", type=int, default=1000, help="random held sessions revived at the end")
    add("--quick", action="store_true", help="tiny sizes: the smoke test")
    add("--out", type=Path, default=Path("docs/bench"))
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.tokens, args.duration, args.warmup, args.rounds = 4, 8, 0.3, 0.1, 1
        args.held, args.grpc_seconds, args.wave, args.revive = 12_000, 1, 500, 20
    args.out.mkdir(parents=True, exist_ok=True)
    window, c = Window(args.warmup, args.duration), args.sessions
    workloads = [("stream", 1), ("stream", c), ("generate", c)]
    with tempfile.TemporaryDirectory() as tmp, redis_server() as redis_url:
        _, repo = build_model(args.preset, Path(tmp))
        from rnnserve.export.manifest import read_manifest

        manifest = read_manifest(repo / "bench" / "1")
        vocab = manifest.vocab_size
        state_bytes = sum(4 * int(np.prod(s.shape_for_batch(1))) for s in manifest.state)
        print(f"model: LSTM {manifest.num_layers}x{manifest.hidden_size}, vocab {vocab}; state "
              f"{state_bytes} B per session; {os.cpu_count()} cores", flush=True)  # fmt: skip

        def serve(*extra: str) -> tuple[list[str], str]:
            port = free_port()
            return [sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo),
                    "--port", str(port), "--metrics-port", "-1", *extra], f"127.0.0.1:{port}"  # fmt: skip

        servers = {MEMORY: serve("--session-store", "memory"),
                   BEHIND: serve("--session-store", redis_url, "--persist-interval-ms", "50"),
                   THROUGH: serve("--session-store", redis_url, "--persist-interval-ms", "0")}  # fmt: skip
        samples: dict[tuple[str, str, int], list[Sample]] = {}
        with ExitStack() as stack:
            for command, url in servers.values():
                stack.enter_context(server_process(command, url))
            for n in range(args.rounds):
                for workload, k in workloads:
                    for mode, (_, url) in servers.items():
                        s = asyncio.run(measure(url, redis_url, workload, k, args.tokens, vocab, window))
                        samples.setdefault((mode, workload, k), []).append(s)
                        print(f"  round {n + 1} {mode:24} {workload:8} x{k:<3} {s.tokens_per_s:9.0f} tok/s"
                              f"  Redis cmds/msg {s.commands / max(1, s.messages):.3f}  reply writes/msg "
                              f"{s.reply_writes / max(1, s.messages):.3f}", flush=True)  # fmt: skip
        rows = [
            summarize(m, w, k, samples[m, w, k], samples[MEMORY, w, k]) for w, k in workloads for m in servers
        ]
        redis.Redis.from_url(redis_url).flushall()
        command, url = serve("--session-store", redis_url, "--idle-ttl", "1", "--session-ttl", str(TTL_S))
        with server_process(command, url) as proc:
            held = asyncio.run(
                hold(url, proc.pid, redis_url, args.held, args.grpc_seconds, args.revive, args.wave)
            )
        servers["sessions held"] = (command, url)
    h = held
    held_text = (
        f"**{h['held']:,} sessions held in Redis.** {h['grpc_sessions']:,} were created through gRPC "
        f"(CreateSession + one fed token, 64 at a time) in {h['grpc_seconds']:.0f} s, "
        f"{h['grpc_per_s']:.0f}/s: all {h['held']:,} that way would take "
        f"{h['held'] / h['grpc_per_s'] / 60:.0f} min. The other "
        f"{h['direct_sessions']:,} were written straight into Redis with the server's RedisStore.save "
        f"({h['direct_seconds']:.0f} s; real snapshot bytes, one exported session's with new ids); after "
        f"each wave the server revived 50 random ones ({h['revived_during_direct'][0]}/"
        f"{h['revived_during_direct'][1]} answered). At the end {h['revived'][1]} random sessions among all "
        f"held were revived, 64 at a time: {h['revived'][0]} answered at the right position (round trip p50 "
        f"{h['revive_p50_ms']:.1f} ms, p99 {h['revive_p99_ms']:.1f} ms).\n\nRedis: "
        f"{h['redis_bytes_per_session']:,.0f} B per session (used_memory growth / sessions; "
        f"{h['redis_keys']:,} keys in all, the store's leases included) for a "
        f"{h['snapshot_bytes']:,} B snapshot: the state (h and c) {state_bytes:,} B + the next-token "
        f"log-probs {4 * vocab:,} B (vocab {vocab} x 4 B) + ids, position, recent tokens and the last reply; "
        f"the rest is Redis's key, expiry and allocator rounding. Server RSS: {h['rss_start_mb']:.0f} MB "
        f"before any session, {h['rss_first_wave_mb']:.0f} MB after the first wave, at most "
        f"{h['rss_max_mb']:.0f} MB, {h['rss_end_mb']:.0f} MB at the end."
    )
    verdicts = goals(rows, held, c, state_bytes)
    title = f"{args.preset} model: {manifest.num_layers}x{manifest.hidden_size} LSTM, vocab {vocab}"
    md = [f"# Durable sessions: the Redis session store ({title})", "",
          f"`{' '.join(['python', *sys.argv])}` on {os.cpu_count()} cores (servers, load generator and "
          f"Redis share them); {args.rounds} round(s) of {args.duration:g} s per workload and mode, the "
          "modes taking turns.", "", *table(rows), "",
          "p50/p99: streaming, a message's round trip; generating, the gap between messages of a call. "
          "Redis cmds/msg, reply writes/msg: Redis's own counters over the window (INFO commandstats: every "
          "command, those run inside the store's scripts included, INFO excluded; total_writes_processed), "
          "per message the clients got; a reply write is one round trip for a lone "
          "SET, while a flush of many sessions is one pipeline that Redis reads in ~16 KB chunks and answers "
          "in a few writes.",
          "", held_text, "", "## Goals", "",
          *(f"- [{'met' if ok else 'MISSED'}] {g}: {m}" for g, m, ok in verdicts), "", "## Servers", "",
          *(f"- {mode}: `rnnserve {' '.join(cmd[3:])}`" for mode, (cmd, _) in servers.items())]  # fmt: skip
    print("\n" + "\n".join(md))
    name = "persistence" + ("" if args.preset == "demo" else f"-{args.preset}")
    (args.out / f"{name}.md").write_text("\n".join(md) + "\n")
    report = {"preset": args.preset, "command": " ".join(sys.argv), "cores": os.cpu_count(), "vocab": vocab,
              "state_bytes": state_bytes, "rows": rows, "held": held,
              "goals": [{"goal": g, "measured": m, "met": ok} for g, m, ok in verdicts]}  # fmt: skip
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(rows, held, args.out / f"{name}.png", title)
    print(f"\nwrote {args.out / name}.md, .json and .png")


if __name__ == "__main__":
    main()
