"""How both clients connect: the address, plaintext or TLS (mTLS with a client certificate), a token.

    Client("localhost:50051")                                  # plaintext (loopback, the demo)
    Client("rnnserve.example.com:443", tls=True)               # TLS, the system's CA roots
    Client("https://rnnserve.example.com:443")                 # the same
    Client("10.0.0.5:50051", tls=TLS(ca_file="ca.crt", cert_file="client.crt", key_file="client.key"))
    Client(url, token="...")                                   # `authorization: Bearer ...` on every call

Left out, `tls` comes from the environment ($RNNSERVE_TLS_CA, $RNNSERVE_CLIENT_CERT, $RNNSERVE_CLIENT_KEY: any
set means TLS; $RNNSERVE_TLS_SERVER_NAME) or the URL's scheme (https://), and `token` from
$RNNSERVE_TOKEN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from grpc import aio

from rnnserve.client.requests import Metadata, channel_options

DEFAULT_URL: Final = "localhost:50051"
AUTHORIZATION: Final = "authorization"  # the call metadata key a bearer token travels in


@dataclass(frozen=True)
class TLS:
    """A TLS connection's settings.

    Args:
        ca_file: PEM file of the CA certificate(s) the server's certificate must chain to (None: the
            system's roots, as for a certificate from a public CA).
        cert_file, key_file: PEM files of this client's certificate and private key, for a server that
            requires clients to present one (mTLS); both or neither.
        server_name: the name the server's certificate must carry when it differs from the URL's host
            (an address behind a balancer, a tunnel).
    """

    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS: give a client certificate and its key together (cert_file, key_file)")

    @classmethod
    def from_env(
        cls, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
    ) -> TLS | None:
        """TLS from the files given, each falling back to its variable ($RNNSERVE_TLS_CA,
        $RNNSERVE_CLIENT_CERT, $RNNSERVE_CLIENT_KEY; $RNNSERVE_TLS_SERVER_NAME for `server_name`); None
        when no file is given or set. (The client's certificate has names of its own: a server's
        $RNNSERVE_TLS_CERT/KEY, seen by the health check in its container, are not a client's.)"""

        def env(name: str) -> str | None:
            return os.environ.get(f"RNNSERVE_{name}") or None

        ca = ca_file or env("TLS_CA")
        cert, key = cert_file or env("CLIENT_CERT"), key_file or env("CLIENT_KEY")
        if ca is None and cert is None and key is None:
            return None
        return cls(ca_file=ca, cert_file=cert, key_file=key, server_name=env("TLS_SERVER_NAME"))

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | os.PathLike[str] | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


TLSArg = TLS | bool | None


@dataclass(frozen=True)
class Connection:
    """What a client opens its channel with: `credentials` None means plaintext; `metadata` goes with
    every call (the token's header on a plaintext channel, where gRPC refuses call credentials)."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    metadata: Metadata


def connection(url: str | None, *, tls: TLSArg, token: str | None, max_message_bytes: int) -> Connection:
    """How to reach `url` (default $RNNSERVE_URL, else localhost:50051).

    tls: a `TLS`; True: TLS with the environment's settings, else the system's roots; False: plaintext;
    None: TLS when the environment configures it or the URL starts with https://, else plaintext.
    token: sent as `authorization: Bearer <token>` (default $RNNSERVE_TOKEN; empty: none)."""
    target = url or os.environ.get("RNNSERVE_URL") or DEFAULT_URL
    scheme, sep, rest = target.partition("://")
    if sep:
        if scheme not in ("http", "https"):
            raise ValueError(f"url: unknown scheme {scheme}:// (host:port, http:// or https://)")
        if (scheme == "https" and tls is False) or (scheme == "http" and tls not in (None, False)):
            raise ValueError(f"url {target!r} contradicts tls={tls!r}")
        target = rest.rstrip("/")
    settings: TLS | None
    if isinstance(tls, TLS):
        settings = tls
    elif tls is True or (tls is None and scheme == "https"):
        settings = TLS.from_env() or TLS()
    elif tls is None and scheme != "http":
        settings = TLS.from_env()
    else:
        settings = None
    token = os.environ.get("RNNSERVE_TOKEN") if token is None else token
    options: list[tuple[str, Any]] = list(channel_options(max_message_bytes))
    if settings is None:
        metadata: Metadata = ((AUTHORIZATION, f"Bearer {token}"),) if token else ()
        return Connection(target, None, options, metadata)
    credentials = settings.credentials()
    if token:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    if settings.server_name:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    return Connection(target, credentials, options, ())


def open_channel(conn: Connection) -> grpc.Channel:
    """A sync channel to `conn.target`, plaintext or TLS as `conn` says."""
    if conn.credentials is None:
        return grpc.insecure_channel(conn.target, options=conn.options)
    return grpc.secure_channel(conn.target, conn.credentials, options=conn.options)


def open_aio_channel(conn: Connection) -> aio.Channel:
    """An asyncio channel to `conn.target`, plaintext or TLS as `conn` says."""
    if conn.credentials is None:
        return aio.insecure_channel(conn.target, options=conn.options)
    return aio.secure_channel(conn.target, conn.credentials, options=conn.options)


def with_metadata(extra: Metadata, metadata: Metadata | None) -> Metadata | None:
    """A call's own metadata (or None) followed by what every call of the client carries."""
    merged = (metadata or ()) + extra
    return merged or None
