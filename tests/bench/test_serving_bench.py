"""The load benchmark still runs end to end: every system, the raw loop at each thread count and its best,
the sweeps, the floor, the in-process engine, the goals and the plot.

A smoke test with tiny windows (speed is measured by running the benchmark itself, never asserted here).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serving.py"


def test_serving_benchmark_writes_its_table_goals_and_plot(tmp_path: Path) -> None:
    command = [
        sys.executable, str(BENCH), "--concurrency", "1", "2", "--tokens", "8", "--duration", "0.3",
        "--warmup", "0.1", "--idle-sessions", "50", "--flush-sweep", "0", "--call-sweep", "4",
        "--out", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "serving.json").read_text())
    rows = {(r["system"], r["workload"], r["concurrency"]) for r in report["rows"]}
    for system in ("ort-ceiling", "rnnserve", "naive-torch"):
        for workload in ("stream", "generate"):
            assert {(system, workload, 1), (system, workload, 2)} <= rows
    assert {("grpc-echo", "stream", 1), ("rnnserve flush 0 ms", "generate", 2)} <= rows
    assert ("rnnserve calls of 4", "generate", 2) in rows
    assert {("engine", "in-process", 2), ("ort-ceiling", "in-process", 2)} <= rows
    # A rate, not a speed bound: a slow machine may complete nothing in a 0.3 s window.
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] >= 0 for r in report["rows"])

    # The ceiling: the fastest of the raw loop's thread counts (1, 2, the server's), measured side by side.
    threads = report["ceiling_threads"]
    assert {1, 2, report["server_intra_op_threads"]} == set(threads)
    for workload, c in [("stream", 1), ("stream", 2), ("generate", 1), ("generate", 2), ("in-process", 2)]:
        raw = {r["threads"]: r for r in report["rows"] if r["system"].startswith("ort ")
               and (r["workload"], r["concurrency"]) == (workload, c)}  # fmt: skip
        assert set(raw) == set(threads)
        best = next(
            r
            for r in report["rows"]
            if (r["system"], r["workload"], r["concurrency"]) == ("ort-ceiling", workload, c)
        )
        assert best["tokens_per_s"] == max(r["tokens_per_s"] for r in raw.values())
        assert best["threads"] == max(raw.values(), key=lambda r: r["tokens_per_s"])["threads"]

    # Generation reports what a user waits for: time to first token and the gap between messages.
    served_generate = [r for r in report["rows"] if r["system"] == "rnnserve" and r["workload"] == "generate"]
    for r in served_generate:  # (None where nothing arrived inside a 0.3 s window on a slow machine)
        if r["first_token_p50_ms"] is not None:
            assert r["first_token_p99_ms"] >= r["first_token_p50_ms"] > 0
        if r["tokens_per_message"] is not None:
            assert r["tokens_per_message"] >= 1

    assert report["idle"]["sessions"] == 50 and report["idle"]["grpc_echo_create_close_p50_ms"] > 0
    goals = [g["goal"] for g in report["goals"]]
    assert goals[0].startswith("2 streaming sessions: >= 50% of the best raw ORT loop")
    assert goals[1].startswith("1 streaming session: p50 <= ORT step + the gRPC echo floor + 0.1 ms")
    assert goals[2].startswith("2 generating sessions served: >= 90% of the best raw ORT loop")
    assert goals[3].startswith(
        "2 generating sessions, the engine in-process: >= 100% of the best raw ORT loop"
    )
    assert all(
        "intra-op thread" in g["measured"] for g in report["goals"] if "best raw ORT loop" in g["goal"]
    )
    assert (tmp_path / "serving.png").stat().st_size > 10_000
    assert "goals (issue 13" in run.stdout
