"""TLS and mTLS for real: servers on loopback with certificates made at test time, both clients, the CLI.

Each server records the metadata of every call it receives, so the tests see the bearer token arrive
(as call credentials on TLS, as plain metadata on a plaintext channel)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from support import free_port
from tls_certs import Certs, make_certs

from rnnserve.cli import main
from rnnserve.client import TLS, AsyncClient, Client, RnnserveError, UnavailableError
from rnnserve.client.channel import connection
from rnnserve.client.requests import SESSION_HEADER
from rnnserve.server import app
from rnnserve.server.app import background_server
from rnnserve.server.config import ServerConfig

CLI = [sys.executable, "-m", "rnnserve"]
TOKEN = "s3cret-token"
ENV = ("RNNSERVE_URL", "RNNSERVE_TOKEN", "RNNSERVE_TLS_CA", "RNNSERVE_CLIENT_CERT", "RNNSERVE_CLIENT_KEY")


class MetadataRecorder(aio.ServerInterceptor):
    """Keeps (method, metadata) of every call the server receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = {str(k): str(v) for k, v in details.invocation_metadata or ()}
        self.calls.append((str(details.method).rsplit("/", 1)[-1], metadata))
        return await continuation(details)

    def authorization(self, method: str) -> set[str]:
        """The authorization values the calls of `method` carried."""
        return {m.get("authorization", "") for name, m in self.calls if name == method}


class Served:
    def __init__(self, url: str, recorder: MetadataRecorder) -> None:
        self.url = url
        self.recorder = recorder


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def serve(lm_repo: Path) -> Iterator[Callable[..., Any]]:
    """Starts servers (stopped at the end of the module) that record their calls' metadata."""
    stack: list[Any] = []

    def start(**tls: Any) -> Served:
        recorder = MetadataRecorder()
        real_server = aio.server

        def server(*args: Any, interceptors: Any = (), **kwargs: Any) -> aio.Server:
            return real_server(*args, interceptors=[recorder, *interceptors], **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(app.aio, "server", server)
            context = background_server(ServerConfig(repo=lm_repo, port=0, **tls))
            started = context.__enter__()
        stack.append(context)
        return Served(f"127.0.0.1:{started.port}", recorder)

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def tls_server(serve: Callable[..., Served], certs: Certs) -> Served:
    return serve(tls_cert=certs.server_cert, tls_key=certs.server_key)


@pytest.fixture(scope="module")
def mtls_server(serve: Callable[..., Served], certs: Certs) -> Served:
    return serve(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_ca=certs.ca)


@pytest.fixture(scope="module")
def plain_server(serve: Callable[..., Served]) -> Served:
    return serve()


def use_session(client: Client) -> None:
    """ListModels, CreateSession, Stream, Generate, CloseSession: every kind of call a session makes."""
    assert "tiny" in {m.name for m in client.models()}
    with client.session("tiny") as session:
        out = session.feed("def add(a, b):")
        assert out.position == len("def add(a, b):")
        stream = session.generate(max_tokens=5, seed=1)
        assert len(list(stream)) >= 1


async def use_session_async(client: AsyncClient) -> None:
    assert "tiny" in {m.name for m in await client.models()}
    async with client.session("tiny") as session:
        out = await session.feed("def add(a, b):")
        assert out.position == len("def add(a, b):")
        tokens = [t async for t in session.generate(max_tokens=5, seed=1)]
        assert tokens


def token_reached(served: Served) -> None:
    for method in ("ListModels", "CreateSession", "Stream", "Generate", "CloseSession"):
        assert served.recorder.authorization(method) == {f"Bearer {TOKEN}"}, method
    for name, metadata in served.recorder.calls:  # the token joins a session's routing header
        if name in ("Stream", "Generate", "CloseSession"):
            assert SESSION_HEADER in metadata, name


def test_the_servers_authentication_accepts_the_token_over_tls(
    serve: Callable[..., Served], certs: Certs
) -> None:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    served = serve(
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        auth_env=(("RNNSERVE_AUTH_TOKEN_ALICE", f"sha256:{digest}"),),
    )
    with Client(served.url, tls=TLS(ca_file=certs.ca), token=TOKEN, retry=None) as client:
        use_session(client)
    for token in ("wrong", ""):
        tls = TLS(ca_file=certs.ca)
        with (
            Client(served.url, tls=tls, token=token, retry=None) as client,
            pytest.raises(RnnserveError) as caught,
        ):
            client.models()
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_client_with_the_ca_uses_a_tls_server_and_sends_its_token(tls_server: Served, certs: Certs) -> None:
    with Client(tls_server.url, tls=TLS(ca_file=certs.ca), token=TOKEN, retry=None) as client:
        use_session(client)
    token_reached(tls_server)


def test_the_async_client_does_the_same(tls_server: Served, certs: Certs) -> None:
    async def run() -> None:
        tls = TLS(ca_file=str(certs.ca))
        async with AsyncClient(tls_server.url, tls=tls, token=TOKEN, retry=None) as client:
            await use_session_async(client)

    tls_server.recorder.calls.clear()
    asyncio.run(run())
    token_reached(tls_server)


def test_the_certificate_is_checked_against_the_name(tls_server: Served, certs: Certs) -> None:
    port = tls_server.url.rsplit(":", 1)[1]
    with Client(f"localhost:{port}", tls=TLS(ca_file=certs.ca), retry=None) as client:
        assert client.models()
    renamed = TLS(ca_file=certs.ca, server_name="localhost")  # the name the certificate carries
    with Client(tls_server.url, tls=renamed, retry=None) as client:
        assert client.models()
    wrong = TLS(ca_file=certs.ca, server_name="elsewhere.example")
    with Client(tls_server.url, tls=wrong, retry=None) as client, pytest.raises(UnavailableError):
        client.models()


@pytest.mark.parametrize("how", ["other CA", "system roots", "https url"])
def test_a_client_without_the_ca_is_told_the_handshake_failed(
    tls_server: Served, certs: Certs, how: str
) -> None:
    url, tls = tls_server.url, {"other CA": TLS(ca_file=certs.other_ca), "system roots": True}.get(how)
    if how == "https url":
        url = f"https://{url}"
    with Client(url, tls=tls, retry=None) as client, pytest.raises(UnavailableError) as caught:
        client.models()
    assert "TLS handshake failed: is the CA right?" in caught.value.message


def test_an_async_client_without_the_ca_is_told_too(tls_server: Served, certs: Certs) -> None:
    async def run() -> str:
        async with AsyncClient(tls_server.url, tls=TLS(ca_file=certs.other_ca), retry=None) as client:
            with pytest.raises(UnavailableError) as caught:
                await client.models()
        return caught.value.message

    assert "TLS handshake failed: is the CA right?" in asyncio.run(run())


def test_a_tls_client_of_a_plaintext_server_is_told_it_is_plaintext(
    plain_server: Served, certs: Certs
) -> None:
    tls = TLS(ca_file=certs.ca)
    with Client(plain_server.url, tls=tls, retry=None) as client, pytest.raises(UnavailableError) as caught:
        client.models()
    assert "TLS handshake failed: does the server serve TLS?" in caught.value.message


def test_mtls_refuses_a_client_without_a_certificate(mtls_server: Served, certs: Certs) -> None:
    mtls_server.recorder.calls.clear()
    tls = TLS(ca_file=certs.ca)
    with Client(mtls_server.url, tls=tls, retry=None) as client, pytest.raises(UnavailableError):
        client.models()
    assert not mtls_server.recorder.calls  # refused at the handshake, before any call


def test_mtls_accepts_a_client_with_its_certificate(mtls_server: Served, certs: Certs) -> None:
    tls = TLS(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
    with Client(mtls_server.url, tls=tls, token=TOKEN, retry=None) as client:
        use_session(client)
    token_reached(mtls_server)

    async def run() -> None:
        async with AsyncClient(mtls_server.url, tls=tls, retry=None) as client:
            await use_session_async(client)

    asyncio.run(run())


def test_a_plaintext_client_sends_the_token_as_metadata(plain_server: Served) -> None:
    with Client(plain_server.url, token=TOKEN, retry=None) as client:
        use_session(client)
    token_reached(plain_server)
    plain_server.recorder.calls.clear()

    async def run() -> None:
        async with AsyncClient(plain_server.url, token=TOKEN, retry=None) as client:
            await use_session_async(client)

    asyncio.run(run())
    token_reached(plain_server)


def test_no_token_no_authorization(plain_server: Served) -> None:
    plain_server.recorder.calls.clear()
    with Client(plain_server.url, retry=None) as client:
        use_session(client)
    assert plain_server.recorder.calls
    assert all("authorization" not in m for _, m in plain_server.recorder.calls)


def test_the_environment_configures_tls_and_token(
    mtls_server: Served, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RNNSERVE_URL", mtls_server.url)
    monkeypatch.setenv("RNNSERVE_TOKEN", TOKEN)
    monkeypatch.setenv("RNNSERVE_TLS_CA", str(certs.ca))
    monkeypatch.setenv("RNNSERVE_CLIENT_CERT", str(certs.client_cert))
    monkeypatch.setenv("RNNSERVE_CLIENT_KEY", str(certs.client_key))
    mtls_server.recorder.calls.clear()
    with Client(retry=None) as client:
        use_session(client)
    token_reached(mtls_server)
    with Client(tls=False, retry=None) as client, pytest.raises(UnavailableError):  # False wins
        client.models()


def test_connection_arguments_are_checked(certs: Certs) -> None:
    with pytest.raises(ValueError, match="together"):
        TLS(ca_file=certs.ca, cert_file=certs.client_cert)
    with pytest.raises(ValueError, match="contradicts"):
        connection("https://localhost:1", tls=False, token=None, max_message_bytes=1024)
    with pytest.raises(ValueError, match="scheme"):
        connection("grpc://localhost:1", tls=None, token=None, max_message_bytes=1024)
    plain = connection("http://localhost:1", tls=None, token="t", max_message_bytes=1024)
    assert (plain.target, plain.credentials, plain.metadata) == (
        "localhost:1",
        None,
        (("authorization", "Bearer t"),),
    )
    secure = connection("https://localhost:1/", tls=None, token="t", max_message_bytes=1024)
    assert (secure.target, secure.metadata) == ("localhost:1", ()) and secure.credentials is not None


def test_cli_commands_take_the_tls_flags(
    tls_server: Served, mtls_server: Served, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = ["--tls-ca", str(certs.ca)]
    assert main(["health", "--url", tls_server.url, *ca]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["health", "--url", tls_server.url]) == 1  # plaintext against TLS
    assert main(["health", "--url", tls_server.url, "--tls-ca", str(certs.other_ca)]) == 1
    assert "TLS handshake failed: is the CA right?" in capsys.readouterr().err
    tls_server.recorder.calls.clear()
    assert main(["models", "--url", tls_server.url, *ca, "--token", TOKEN]) == 0
    assert "tiny@1 (latest)" in capsys.readouterr().out
    assert tls_server.recorder.authorization("ListModels") == {f"Bearer {TOKEN}"}
    client_cert = ["--tls-cert", str(certs.client_cert), "--tls-key", str(certs.client_key)]
    assert main(["models", "--url", mtls_server.url, *ca]) == 1
    assert main(["models", "--url", mtls_server.url, *ca, *client_cert]) == 0
    assert main(["health", "--url", mtls_server.url, *ca, *client_cert]) == 0
    generate = ["generate", "--url", mtls_server.url, "--model", "tiny", "--max-tokens", "3", "--seed", "1"]
    assert main([*generate, *ca, *client_cert]) == 0
    assert "[finish:" in capsys.readouterr().err


def test_serve_refuses_half_a_tls_configuration(lm_repo: Path, certs: Certs) -> None:
    repo = ["serve", "--repo", str(lm_repo), "--port", "0"]
    assert main([*repo, "--tls-cert", str(certs.server_cert)]) == 2
    assert main([*repo, "--tls-client-ca", str(certs.ca)]) == 2


def test_serve_and_health_configured_by_environment_alone(lm_repo: Path, certs: Certs) -> None:
    """As in a container (docker-compose.tls.yml): the server's variables, and $RNNSERVE_TLS_CA for the
    health check, which runs with the same environment."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ENV and k != "RNNSERVE_PORT"},
        "RNNSERVE_REPO": str(lm_repo),
        "RNNSERVE_PORT": str(port),
        "RNNSERVE_METRICS_PORT": "-1",
        "RNNSERVE_TLS_CERT": str(certs.server_cert),
        "RNNSERVE_TLS_KEY": str(certs.server_key),
        "RNNSERVE_TLS_CA": str(certs.ca),
    }
    proc = subprocess.Popen(
        [*CLI, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        with Client(f"localhost:{port}", tls=TLS(ca_file=certs.ca)) as client:
            assert client.wait_ready(timeout=60), "server did not come up"
        health = subprocess.run([*CLI, "health"], env=env, capture_output=True, text=True, timeout=60)
        assert health.returncode == 0, health.stderr
        assert "SERVING" in health.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "(TLS)" in out


def test_the_http_port_serves_https_with_the_same_certificates(lm_repo: Path, certs: Certs) -> None:
    """The playground and /v2 REST share the gRPC port's TLS (and mTLS): a client trusting the CA gets
    the page over HTTPS; one that does not is refused in the handshake; with --tls-client-ca, a client
    without a certificate is refused too."""
    import ssl
    import urllib.error
    import urllib.request

    def get(url: str, context: ssl.SSLContext) -> int:
        with urllib.request.urlopen(url, context=context, timeout=30) as response:
            return int(response.status)

    trusting = ssl.create_default_context(cafile=str(certs.ca))
    with_cert = ssl.create_default_context(cafile=str(certs.ca))
    with_cert.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    tls = {"tls_cert": certs.server_cert, "tls_key": certs.server_key}
    with background_server(ServerConfig(repo=lm_repo, port=0, http_port=0, **tls)) as server:
        url = f"https://localhost:{server.http_port}/v2/health/ready"
        assert get(url, trusting) == 200
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get(url, ssl.create_default_context(cafile=str(certs.other_ca)))
    with background_server(
        ServerConfig(repo=lm_repo, port=0, http_port=0, tls_client_ca=certs.ca, **tls)
    ) as server:
        url = f"https://localhost:{server.http_port}/v2/health/ready"
        assert get(url, with_cert) == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(url, trusting)
