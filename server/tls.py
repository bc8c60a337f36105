"""TLS for the gRPC port: the server's certificate and key, and for mTLS the CA client certificates
must chain to (light: only grpc, so the CLI can check the files before loading any model)."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from rnnserve.server.config import ServerConfig


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The port's credentials: None for plaintext (no --tls-cert); with --tls-client-ca, every client
    must present a certificate that CA signed (mTLS).

    ValueError for a half-given pair or a client CA without a certificate; OSError for a file that
    cannot be read."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS first)")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("give --tls-cert and --tls-key together")
    pair = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())
    client_ca = None if config.tls_client_ca is None else Path(config.tls_client_ca).read_bytes()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The same TLS (and mTLS) for the HTTP port (playground, /v2 REST) as for the gRPC port: None for
    plaintext. Checked like server_credentials."""
    if server_credentials(config) is None:  # validates the flags and reads the files
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca is not None:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
