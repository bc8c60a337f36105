"""Server configuration (light: importable without ONNX Runtime, for the CLI and tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GENERATE_GRAPH_CHOICES = ("auto", "on", "off")  # see RuntimeOptions.generate_graphs
LOG_FORMATS = ("text", "json")  # see ServerConfig.log_format


@dataclass(frozen=True)
class ServerConfig:
    """Everything `rnnserve serve` can be told (each field has a matching CLI flag)."""

    repo: Path
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port
    device: str = "auto"  # auto | cuda | cpu
    intra_op_threads: int = 0  # 0 = per model, see runtime.default_intra_op_threads
    # K-step generation graphs: auto | on | off (see RuntimeOptions.generate_graphs) and their K
    # (0 = the bundle's default).
    generate_graphs: str = "auto"
    generate_steps: int = 0
    max_message_bytes: int = 4 * 1024 * 1024
    max_batch: int = 64
    max_wait_ms: float = 0.0
    # Batches of at most this many tokens whose runs are fast run on the event loop (0 = always the
    # ORT worker thread); see SchedulerOptions.
    inline_max_tokens: int = 4
    # Generate streams (see EngineLimits.generate_flush_ms): while at least this many sessions generate
    # on a model, a token may wait up to this long to share a message with the tokens after it.
    generate_flush_ms: float = 50.0
    generate_flush_min_sessions: int = 8
    max_sessions: int = 10_000
    session_ttl_s: float = 600.0
    # Where sessions live beyond memory (server/store.py): "memory" or redis://host:port/db, written
    # behind every persist_interval_ms (0 = write-through; see server/persist.py for what a crash can
    # lose). Sessions idle for idle_ttl_s leave memory for the store (0 = stay until their TTL).
    session_store: str = "memory"
    persist_interval_ms: float = 50.0
    idle_ttl_s: float = 0.0
    # With a shared store, each session has one owner at a time through a lease of this length in the
    # store (renewed by the owner): a dead replica's sessions move to another after at most this long.
    owner_lease_s: float = 5.0
    grace_s: float = 10.0  # on SIGTERM: how long calls in flight may take to finish
    metrics_port: int = -1  # Prometheus /metrics on host:metrics_port; 0 = any free port, -1 = none
    metrics_required: bool = True  # False: a metrics port in use is logged and skipped, not fatal
    # HTTP (server/http.py): the playground page at / and the /v2 REST routes on host:http_port, on the
    # same event loop and engine; 0 = any free port, -1 = none.
    http_port: int = -1
    # Hot reload: look for new model versions in the repository every N seconds (0 = off; the
    # ReloadModels call works either way). See server/reload.py.
    watch_interval_s: float = 0.0
    # Authentication (server/auth.py): a token file (TOML/JSON, reloaded when it changes) and the
    # RNNSERVE_AUTH_TOKEN_<NAME> variables, as (variable, value) pairs; neither: authentication off.
    auth_tokens: Path | None = None
    auth_env: tuple[tuple[str, str], ...] = ()
    # Limits that protect the server: sessions and concurrent Generate calls per token (0 = none; a
    # token's entry may set its own), tokens in one input message or prompt, max_tokens of a Generate.
    max_sessions_per_token: int = 0
    max_generates_per_token: int = 0
    max_input_tokens: int = 65_536
    max_generate_tokens: int = 4096
    # Logs (server/logs.py): "text" or "json" (one object per line), and the access log (one INFO
    # record per call, logger rnnserve.access). Traces (server/tracing.py, the `otel` extra): OTLP/gRPC
    # to this endpoint, e.g. http://otel-collector:4317; "" = off.
    log_format: str = "text"
    access_log: bool = True
    otel_endpoint: str = ""
    # TLS on the gRPC port (server/tls.py): certificate and key (PEM; None = plaintext), and for mTLS the
    # CA every client's certificate must chain to (None = clients present none).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
