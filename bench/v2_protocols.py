"""KServe V2 vs native (issue 17): one stateful stream workload through V2 gRPC, V2 REST and native v1.

    python bench/v2_protocols.py --out docs/bench
    python bench/v2_protocols.py --rounds 1 --duration 0.5 --out /tmp/x      # smoke test

Builds bench/serving.py's demo LM and starts ONE server (gRPC + --http-port). N sessions (--concurrency,
default 1 and 16) each send one token per message and wait for the reply, back to back, in a Window:
native = AsyncClient session.feed(top_k=1); V2 gRPC = ModelInfer with INPUT_IDS INT64 [1, 1] and the
parameters sequence_id / sequence_start (first message) / sequence_end (a closing message after the
window); V2 REST = POST /v2/models/bench/infer, the same request as JSON (aiohttp). The three protocols
take turns in --rounds rounds; a row pools its rounds' messages and round trips, and each V2 row is given
as a ratio to native measured in the same run. Writes <out>/v2_protocols.json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from serving import Window, build_model, free_port, percentiles, server_process

from rnnserve.client import AsyncClient
from rnnserve.inference import grpc_service_pb2 as pb
from rnnserve.inference import grpc_service_pb2_grpc as pb_grpc

MODEL = "bench"
PROTOCOLS = ("native", "v2-grpc", "v2-rest")
Step = Callable[[int, int, dict[str, Any]], Awaitable[None]]  # (session, token id, parameters)
_seq = itertools.count(1000)


async def measure(step: Step, concurrency: int, vocab: int, window: Window) -> list[float]:
    """Round trips completed inside the window; each session's first message starts its sequence and
    a last one (outside the window) ends it."""
    ids = [next(_seq) for _ in range(concurrency)]
    latencies: list[float] = []
    start, end = window.bounds()

    async def one(i: int) -> None:
        n = 0
        while (sent := time.perf_counter()) < end:
            await step(i, (i * 31 + n) % vocab, {"sequence_id": ids[i], "sequence_start": n == 0})
            n += 1
            if start <= (now := time.perf_counter()) < end:
                latencies.append(now - sent)
        await step(i, 0, {"sequence_id": ids[i], "sequence_end": True})

    await asyncio.gather(*(one(i) for i in range(concurrency)))
    return latencies


async def native(url: str, _: int, concurrency: int, vocab: int, window: Window) -> list[float]:
    async with AsyncClient(url, timeout=120) as client:
        sessions = [await client.session(MODEL) for _ in range(concurrency)]

        async def step(i: int, token: int, params: dict[str, Any]) -> None:
            if not params.get("sequence_end"):
                await sessions[i].feed([token], top_k=1)

        latencies = await measure(step, concurrency, vocab, window)
        for s in sessions:
            await s.close()
    return latencies


async def v2_grpc(url: str, _: int, concurrency: int, vocab: int, window: Window) -> list[float]:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def step(i: int, token: int, params: dict[str, Any]) -> None:
            request = pb.ModelInferRequest(model_name=MODEL)
            request.inputs.add(
                name="INPUT_IDS", datatype="INT64", shape=[1, 1]
            ).contents.int64_contents.append(token)
            request.parameters["sequence_id"].uint64_param = params["sequence_id"]
            for k in ("sequence_start", "sequence_end"):
                if params.get(k):
                    request.parameters[k].bool_param = True
            await stub.ModelInfer(request, timeout=120)

        return await measure(step, concurrency, vocab, window)


async def v2_rest(_: str, http_port: int, concurrency: int, vocab: int, window: Window) -> list[float]:
    endpoint = f"http://127.0.0.1:{http_port}/v2/models/{MODEL}/infer"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def step(i: int, token: int, params: dict[str, Any]) -> None:
            body: dict[str, Any] = {
                "inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [1, 1], "data": [token]}]
            }
            body["parameters"] = params
            async with http.post(endpoint, json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"REST infer: {r.status} {await r.text()}")
                await r.read()

        return await measure(step, concurrency, vocab, window)


LOADS = {"native": native, "v2-grpc": v2_grpc, "v2-rest": v2_rest}


async def wait_http(port: int) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/v2/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"HTTP port {port} did not become ready")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(PROTOCOLS)
    for j, proto in enumerate(PROTOCOLS):
        got = {r["concurrency"]: r for r in rows if r["protocol"] == proto}
        xs = [k + (j - 1) * width for k in range(len(levels))]
        axes[0].bar(xs, [got[c]["tokens_per_s"] for c in levels], width, label=proto)
        axes[1].bar(xs, [got[c]["p50_ms"] for c in levels], width, label=proto)
    for ax, title in zip(
        axes, ("tokens/s (higher is better)", "p50 per message, ms (lower is better)"), strict=True
    ):
        ax.set_xticks(range(len(levels)), [f"{c} session(s)" for c in levels])
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Stateful stream, one token per message: native v1 vs KServe V2 gRPC / REST")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# KServe V2 vs native: a stateful stream (issue 17)",
        "",
        f"`{cfg['command']}`: {cfg['model']}, {cfg['cores']} cores, one server, {cfg['rounds']} rounds of "
        f"{cfg['duration_s']} s windows per row (warm-up {cfg['warmup_s']} s), load {cfg['loadavg']}.",
        "Each session sends one token per message and waits for the answer. Native: `session.feed(top_k=1)`;",
        "V2: `INPUT_IDS` INT64 [1, 1] with `sequence_id`/`sequence_start`/`sequence_end`, all outputs",
        "returned (full `LOGPROBS` vector, `TOKEN_IDS`, `POSITION`). Ratios are to native in the same run.",
        "",
        "| protocol | sessions | tokens/s | vs native | p50 ms | p99 ms | p50 vs native |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['protocol']} | {r['concurrency']} | {r['tokens_per_s']:,.0f} | {r['rate_vs_native']:.2f}x "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p50_vs_native']:.2f}x |"
        )
    return "\n".join([*lines, "", "![bars](v2_protocols.png)", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds measured per row and round")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    window = Window(args.warmup, args.duration)
    pooled: dict[tuple[str, int], list[float]] = {(p, c): [] for p in PROTOCOLS for c in args.concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        _, repo = build_model("demo", Path(tmp))
        from rnnserve.export.manifest import read_manifest

        manifest = read_manifest(repo / MODEL / "1")
        vocab = manifest.vocab_size
        model = f"LSTM {manifest.num_layers}x{manifest.hidden_size}, vocab {vocab}"
        port, http_port = free_port(), free_port()
        url = f"127.0.0.1:{port}"
        cli = [sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--port", str(port),
               "--http-port", str(http_port), "--metrics-port", "-1"]  # fmt: skip
        with server_process(cli, url):
            asyncio.run(wait_http(http_port))
            for rnd in range(args.rounds):
                for c in args.concurrency:
                    order = PROTOCOLS[rnd % 3 :] + PROTOCOLS[: rnd % 3]  # who goes first rotates
                    for p in order:
                        lat = asyncio.run(LOADS[p](url, http_port, c, vocab, window))
                        pooled[p, c] += lat
                        rate, (p50, _, p99) = len(lat) / args.duration, percentiles(lat)
                        print(
                            f"  round {rnd + 1} {p:8} c={c:<3} {rate:8.0f} tok/s"
                            f"  p50 {p50:.2f} p99 {p99:.2f} ms"
                        )
    rows: list[dict[str, Any]] = []
    for c in args.concurrency:
        for p in PROTOCOLS:
            lat = pooled[p, c]
            p50, p90, p99 = percentiles(lat)
            rows.append({"protocol": p, "concurrency": c, "messages": len(lat),
                         "tokens_per_s": len(lat) / (args.duration * args.rounds),
                         "p50_ms": p50, "p90_ms": p90, "p99_ms": p99})  # fmt: skip
    for r in rows:
        base = next(b for b in rows if b["protocol"] == "native" and b["concurrency"] == r["concurrency"])
        r["rate_vs_native"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["p50_vs_native"] = r["p50_ms"] / base["p50_ms"]
    report = {
        "config": {"command": " ".join(["python", "bench/v2_protocols.py", *sys.argv[1:]]), "model": model,
                   "cores": os.cpu_count(), "rounds": args.rounds, "duration_s": args.duration,
                   "warmup_s": args.warmup, "concurrency": args.concurrency,
                   "loadavg": "/".join(f"{x:.2f}" for x in os.getloadavg())},
        "rows": rows,
    }  # fmt: skip
    (args.out / "v2_protocols.json").write_text(json.dumps(report, indent=2))
    (args.out / "v2_protocols.md").write_text(markdown(report))
    plot(rows, args.out / "v2_protocols.png")
    print()
    print(markdown(report))
    print(f"wrote {args.out / 'v2_protocols.json'}, v2_protocols.md and v2_protocols.png")


if __name__ == "__main__":
    main()
