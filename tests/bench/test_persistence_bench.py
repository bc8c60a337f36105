"""The durable-sessions benchmark (bench/persistence.py) still runs end to end at a tiny size: every mode
and workload in its table, Redis's counters, the sessions held (through gRPC and written directly) and
revived, the goals, the Markdown and the plot.

Structure only: speed is measured by running the benchmark itself, never asserted here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis_server import redis_binary

BENCH = Path(__file__).resolve().parents[2] / "bench" / "persistence.py"


@pytest.fixture
def redis_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark starts `redis-server` from PATH: skip (or, in CI, fail) as the Redis tests do."""
    monkeypatch.setenv("PATH", f"{Path(redis_binary()).parent}{os.pathsep}{os.environ['PATH']}")


def test_persistence_benchmark_writes_its_table_goals_and_plot(tmp_path: Path, redis_on_path: None) -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    report = json.loads((tmp_path / "persistence.json").read_text())
    modes = ["memory", "redis write-behind 50ms", "redis write-through"]
    rows = {(r["mode"], r["workload"], r["concurrency"]): r for r in report["rows"]}
    assert set(rows) == {(m, w, c) for m in modes for w, c in [("stream", 1), ("stream", 4), ("generate", 4)]}
    for (mode, _, _), r in rows.items():
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] >= 0
        assert r["commands_per_msg"] >= 0 and r["reply_writes_per_msg"] >= 0
        if mode == "memory":
            assert r["vs_memory"] in (1.0, None) and r["commands_per_msg"] == 0  # nothing goes to Redis
        else:
            assert len(r["round_ratios"]) <= 1  # one round in --quick

    held = report["held"]
    assert held["held"] == 12_000 and held["grpc_sessions"] + held["direct_sessions"] == 12_000
    assert held["grpc_sessions"] > 0 and held["direct_sessions"] > 0
    assert (
        held["revived"] == [20, 20] and held["revived_during_direct"][0] == held["revived_during_direct"][1]
    )
    assert held["snapshot_bytes"] > report["state_bytes"] == 2 * 2 * 256 * 4  # h and c of the 2x256 LSTM
    assert held["redis_bytes_per_session"] > 0
    hows = [p["how"] for p in held["points"]]
    assert hows[0] == "start" and "gRPC" in hows and "direct" in hows and hows[-1] == "after revival"

    goals = [g["goal"] for g in report["goals"]]
    assert goals[0].startswith("write-behind, 4 streaming sessions: >= 90% of memory")
    assert goals[1].startswith("write-behind, 4 generating sessions: >= 90% of memory")
    assert goals[2].startswith("12,000 sessions held in Redis, server RSS flat")
    md = (tmp_path / "persistence.md").read_text()
    assert "| redis write-through | stream | 1 |" in md and "## Goals" in md and "--idle-ttl 1" in md
    assert (tmp_path / "persistence.png").stat().st_size > 10_000
