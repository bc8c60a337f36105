"""Authentication, session ownership and per-token limits (issue 16, items 1, 2 and 4) against a real
server on loopback, spoken to with raw gRPC stubs that send the `authorization` metadata themselves.

Reloads are waited for by the token store's counters (bounded waits), never by sleeping a set time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import HeldRuns, scrape, value, wait_for

from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.auth import (
    BAD_TOKEN,
    NO_TOKEN,
    NOT_BEARER,
    TokenFileError,
    TokenStore,
    hash_token,
    parse_env_tokens,
    parse_token_file,
)
from rnnserve.server.config import ServerConfig
from rnnserve.server.errors import Unauthenticated
from rnnserve.server.sessions import session_not_found
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

TOKENS = {name: f"tok-{name}-{uuid.uuid4().hex}" for name in ("alice", "bob", "carol", "limited", "envy")}
SERVICE = "rnnserve.v1.RnnServe"


def entry(name: str, models: str = '["*"]', **limits: int) -> str:
    lines = ["[[token]]", f'name = "{name}"', f'sha256 = "{hash_token(TOKENS[name])}"', f"models = {models}"]
    lines += [f"{k} = {v}" for k, v in limits.items()]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace the file in one step (a server reading it meanwhile sees the old or the new one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def md(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")]


@pytest.fixture(scope="module")
def tiny_only(lm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    repo = tmp_path_factory.mktemp("auth-repo")
    shutil.copytree(lm_repo / "tiny", repo / "tiny")
    return repo


@pytest.fixture(scope="module")
def served(tiny_only: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RnnServeServer]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens.toml"
    tokens.write_text(
        entry("alice")
        + entry("bob")
        + entry("carol", '["other"]')
        + entry("limited", '["tiny"]', max_sessions=2, max_generates=1)
    )
    config = ServerConfig(
        repo=tiny_only,
        port=0,
        metrics_port=0,
        inline_max_tokens=0,  # every run goes to the ORT worker, where a test can hold it
        auth_tokens=tokens,
        auth_env=(("RNNSERVE_AUTH_TOKEN_ENVY", f"sha256:{hash_token(TOKENS['envy'])};models=tiny"),),
    )
    with background_server(config) as server:
        yield server


@pytest.fixture(scope="module")
def stub(served: RnnServeServer) -> Iterator[pb_grpc.RnnServeStub]:
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        yield pb_grpc.RnnServeStub(channel)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value


def stream(stub: pb_grpc.RnnServeStub, session_id: str, text: str, who: str) -> list[pb.StreamResponse]:
    return list(
        stub.Stream(iter([pb.StreamRequest(session_id=session_id, text=text)]), metadata=md(who), timeout=60)
    )


def every_call(
    stub: pb_grpc.RnnServeStub, session_id: str, snapshot: bytes = b"x"
) -> dict[str, Callable[..., Any]]:
    """Each RnnServe method, called with the given metadata (a keyword: metadata=...)."""
    return {
        "ListModels": lambda **kw: stub.ListModels(pb.ListModelsRequest(), timeout=30, **kw),
        "CreateSession": lambda **kw: stub.CreateSession(
            pb.CreateSessionRequest(model="tiny"), timeout=30, **kw
        ),
        "GetSession": lambda **kw: stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), timeout=30, **kw
        ),
        "CloseSession": lambda **kw: stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), timeout=30, **kw
        ),
        "Stream": lambda **kw: list(
            stub.Stream(iter([pb.StreamRequest(session_id=session_id, text="x")]), timeout=30, **kw)
        ),
        "Generate": lambda **kw: list(
            stub.Generate(pb.GenerateRequest(session_id=session_id, max_tokens=2), timeout=30, **kw)
        ),
        "Classify": lambda **kw: stub.Classify(
            pb.ClassifyRequest(model="tiny", texts=["x"]), timeout=30, **kw
        ),
        "ForkSession": lambda **kw: stub.ForkSession(
            pb.ForkSessionRequest(session_id=session_id), timeout=30, **kw
        ),
        "ExportSession": lambda **kw: stub.ExportSession(
            pb.ExportSessionRequest(session_id=session_id), timeout=30, **kw
        ),
        "ImportSession": lambda **kw: stub.ImportSession(
            pb.ImportSessionRequest(snapshot=snapshot), timeout=30, **kw
        ),
        "ReloadModels": lambda **kw: stub.ReloadModels(pb.ReloadModelsRequest(), timeout=30, **kw),
    }


# -- authentication ------------------------------------------------------------------------------------


def test_every_method_needs_a_valid_token_and_refusals_are_counted(
    served: RnnServeServer, stub: pb_grpc.RnnServeStub
) -> None:
    session = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), metadata=md("alice"), timeout=30)
    before = scrape(served.metrics_port)
    calls = every_call(stub, session.session_id)
    wrong = {
        "no token": ((), NO_TOKEN),
        "bad token": ((("authorization", "Bearer not-a-token-we-know"),), BAD_TOKEN),
        "not bearer": ((("authorization", f"Basic {TOKENS['alice']}"),), NOT_BEARER),
        "empty bearer": ((("authorization", "Bearer "),), NOT_BEARER),
    }
    for method, call in calls.items():
        for what, (metadata, message) in wrong.items():
            error = rpc_error(lambda call=call, metadata=metadata: call(metadata=metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (method, what, error)
            assert error.details() == message, (method, what)
            assert TOKENS["alice"] not in (error.details() or "") and "not-a-token-we-know" not in message
    after = scrape(served.metrics_port)
    for method in calls:  # the ErrorInterceptor (outermost) mapped and counted every refusal
        labels = {"service": SERVICE, "method": method, "code": "UNAUTHENTICATED"}
        assert value(after, "rnnserve_requests_total", **labels) - value(
            before, "rnnserve_requests_total", **labels
        ) == len(wrong)
    # ... and the session was not touched by any of them
    info = stub.GetSession(
        pb.GetSessionRequest(session_id=session.session_id), metadata=md("alice"), timeout=30
    )
    assert info.position == 0


def test_health_and_reflection_stay_open(served: RnnServeServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=30))
        assert SERVICE in {s.name for s in response.list_services_response.service}


def test_a_token_from_the_environment_works(stub: pb_grpc.RnnServeStub) -> None:
    session = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), metadata=md("envy"), timeout=30)
    assert stream(stub, session.session_id, "ab", "envy")[-1].position == 2
    models = stub.ListModels(pb.ListModelsRequest(), metadata=md("envy"), timeout=30)
    assert [m.name for m in models.models] == ["tiny"]


def test_a_model_not_allowed_is_permission_denied(stub: pb_grpc.RnnServeStub) -> None:
    """carol may use model "other" only: tiny is refused wherever a model is named, and ListModels
    shows her nothing; ReloadModels needs a token allowed every model."""
    allowed = stub.ListModels(pb.ListModelsRequest(), metadata=md("carol"), timeout=30)
    assert list(allowed.models) == []
    assert [
        m.name for m in stub.ListModels(pb.ListModelsRequest(), metadata=md("alice"), timeout=30).models
    ] == ["tiny"]
    session = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), metadata=md("alice"), timeout=30)
    exported = stub.ExportSession(
        pb.ExportSessionRequest(session_id=session.session_id), metadata=md("alice"), timeout=30
    )
    refused = {
        "CreateSession": lambda: stub.CreateSession(
            pb.CreateSessionRequest(model="tiny"), metadata=md("carol"), timeout=30
        ),
        "Classify": lambda: stub.Classify(
            pb.ClassifyRequest(model="tiny", texts=["x"]), metadata=md("carol"), timeout=30
        ),
        "ImportSession": lambda: stub.ImportSession(
            pb.ImportSessionRequest(snapshot=exported.snapshot), metadata=md("carol"), timeout=30
        ),
        # A model that does not exist is refused the same way: no token learns what it may not use.
        "CreateSession (unknown model)": lambda: stub.CreateSession(
            pb.CreateSessionRequest(model="nope"), metadata=md("carol"), timeout=30
        ),
    }
    for what, call in refused.items():
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (what, error)
        assert "token 'carol' may not use model" in (error.details() or "") and "other" in (
            error.details() or ""
        )
    error = rpc_error(lambda: stub.ReloadModels(pb.ReloadModelsRequest(), metadata=md("limited"), timeout=30))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "may not reload models" in (
        error.details() or ""
    )
    stub.ReloadModels(pb.ReloadModelsRequest(), metadata=md("alice"), timeout=60)  # "*" may


# -- ownership -----------------------------------------------------------------------------------------


def test_a_session_is_not_found_for_another_token(served: RnnServeServer, stub: pb_grpc.RnnServeStub) -> None:
    """bob gets exactly the NOT_FOUND of a missing session on every session RPC for alice's session; alice's
    session is untouched by all of it."""
    session = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), metadata=md("alice"), timeout=30)
    sid = session.session_id
    assert stream(stub, sid, "def", "alice")[-1].position == 3
    missing = uuid.uuid4().hex
    by_session = {
        "GetSession": lambda s, who: stub.GetSession(
            pb.GetSessionRequest(session_id=s), metadata=md(who), timeout=30
        ),
        "Stream": lambda s, who: stream(stub, s, "x", who),
        "Generate": lambda s, who: list(
            stub.Generate(pb.GenerateRequest(session_id=s, max_tokens=3), metadata=md(who), timeout=30)
        ),
        "ForkSession": lambda s, who: stub.ForkSession(
            pb.ForkSessionRequest(session_id=s), metadata=md(who), timeout=30
        ),
        "ExportSession": lambda s, who: stub.ExportSession(
            pb.ExportSessionRequest(session_id=s), metadata=md(who), timeout=30
        ),
        "CloseSession": lambda s, who: stub.CloseSession(
            pb.CloseSessionRequest(session_id=s), metadata=md(who), timeout=30
        ),
    }
    for method, call in by_session.items():
        theirs = rpc_error(lambda call=call: call(sid, "bob"))
        absent = rpc_error(lambda call=call: call(missing, "bob"))
        assert theirs.code() == absent.code() == grpc.StatusCode.NOT_FOUND, method
        assert theirs.details() == str(session_not_found(sid)), method
        assert absent.details() == str(session_not_found(missing)), method
        assert (theirs.details() or "").replace(sid, missing) == absent.details(), method
    info = stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md("alice"), timeout=30)
    assert info.position == 3  # bob's Stream and Generate did nothing to it
    assert served.engine.sessions.get(sid).owner == "alice"
    # A fork is its maker's; an export carries its owner; an import is the importer's, not the exporter's.
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=md("alice"), timeout=30)
    assert (
        rpc_error(
            lambda: stub.GetSession(
                pb.GetSessionRequest(session_id=fork.session_id), metadata=md("bob"), timeout=30
            )
        ).code()
        == grpc.StatusCode.NOT_FOUND
    )
    exported = stub.ExportSession(pb.ExportSessionRequest(session_id=sid), metadata=md("alice"), timeout=30)
    snapshot = pb.SessionSnapshot.FromString(exported.snapshot)
    assert snapshot.owner == "alice"
    imported = stub.ImportSession(
        pb.ImportSessionRequest(snapshot=exported.snapshot), metadata=md("bob"), timeout=30
    )
    assert imported.position == 3
    assert stream(stub, imported.session_id, "x", "bob")[-1].position == 4
    assert (
        rpc_error(
            lambda: stub.GetSession(
                pb.GetSessionRequest(session_id=imported.session_id), metadata=md("alice"), timeout=30
            )
        ).code()
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=md("alice"), timeout=30).position
        == 3
    )
    for s, who in ((fork.session_id, "alice"), (imported.session_id, "bob")):
        stub.CloseSession(pb.CloseSessionRequest(session_id=s), metadata=md(who), timeout=30)


# -- per-token limits ----------------------------------------------------------------------------------


def test_sessions_per_token_are_limited(stub: pb_grpc.RnnServeStub) -> None:
    def create(who: str) -> pb.SessionInfo:
        return stub.CreateSession(pb.CreateSessionRequest(model="tiny"), metadata=md(who), timeout=30)

    first, second = create("limited"), create("limited")
    error = rpc_error(lambda: create("limited"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error.details() or ""
    assert "token 'limited' holds its maximum of 2 open sessions" in details
    assert "close sessions you no longer need" in details
    for refused in (  # a fork or an import is a new session too
        lambda: stub.ForkSession(
            pb.ForkSessionRequest(session_id=first.session_id), metadata=md("limited"), timeout=30
        ),
        lambda: stub.ImportSession(
            pb.ImportSessionRequest(
                snapshot=stub.ExportSession(
                    pb.ExportSessionRequest(session_id=first.session_id), metadata=md("limited"), timeout=30
                ).snapshot
            ),
            metadata=md("limited"),
            timeout=30,
        ),
    ):
        assert rpc_error(refused).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    create("alice")  # another token is not limited by it
    stub.CloseSession(pb.CloseSessionRequest(session_id=first.session_id), metadata=md("limited"), timeout=30)
    third = create("limited")  # room again
    for s in (second, third):
        stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), metadata=md("limited"), timeout=30)


def test_concurrent_generates_per_token_are_limited(
    served: RnnServeServer, stub: pb_grpc.RnnServeStub
) -> None:
    """limited may have one Generate in flight: while one is (its runs held), a second is refused at once
    with RESOURCE_EXHAUSTED; once it ends, the next one runs."""
    a = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), metadata=md("limited"), timeout=30)
    b = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), metadata=md("limited"), timeout=30)
    results: list[Any] = []

    def first() -> None:
        try:
            results.extend(
                stub.Generate(
                    pb.GenerateRequest(session_id=a.session_id, max_tokens=5),
                    metadata=md("limited"),
                    timeout=60,
                )
            )
        except grpc.RpcError as exc:
            results.append(exc)

    with HeldRuns(served) as runs:
        thread = threading.Thread(target=first, daemon=True)
        thread.start()
        assert runs.held.wait(60)  # the first Generate is in flight (its first run held)
        error = rpc_error(
            lambda: list(
                stub.Generate(
                    pb.GenerateRequest(session_id=b.session_id, max_tokens=5),
                    metadata=md("limited"),
                    timeout=30,
                )
            )
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error.details() or ""
        assert "token 'limited' has its maximum of 1 Generate calls in flight" in details
        assert "retry when a Generate ends" in details
        runs.release()
        thread.join(60)
    assert not thread.is_alive() and results and all(isinstance(r, pb.GenerateResponse) for r in results)
    again = list(
        stub.Generate(
            pb.GenerateRequest(session_id=b.session_id, max_tokens=5), metadata=md("limited"), timeout=60
        )
    )
    assert sum(len(r.token_ids) for r in again) == 5
    assert served.engine.generates.in_flight == {}
    for s in (a, b):
        stub.CloseSession(pb.CloseSessionRequest(session_id=s.session_id), metadata=md("limited"), timeout=30)


# -- the token file: reload, refusal ---------------------------------------------------------------------


def test_the_token_file_is_reloaded_without_a_restart_and_a_bad_one_is_refused(
    tiny_only: Path, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(entry("alice"))
    config = ServerConfig(repo=tiny_only, port=0, auth_tokens=tokens)
    with background_server(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RnnServeStub(channel)
        list_models = lambda who: stub.ListModels(pb.ListModelsRequest(), metadata=md(who), timeout=30)  # noqa: E731
        assert server.auth is not None
        list_models("alice")
        assert rpc_error(lambda: list_models("bob")).code() == grpc.StatusCode.UNAUTHENTICATED

        loaded = server.auth.reloads
        write_atomically(tokens, entry("bob"))  # bob in, alice out
        wait_for(lambda: server.auth is not None and server.auth.reloads > loaded, "the reload")
        list_models("bob")
        error = rpc_error(lambda: list_models("alice"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and error.details() == BAD_TOKEN

        refused = server.auth.refusals
        write_atomically(tokens, entry("alice") + 'oops = "not an entry"\n[[token]\n')  # malformed
        wait_for(lambda: server.auth is not None and server.auth.refusals > refused, "the refusal")
        list_models("bob")  # the tokens in force stay
        assert rpc_error(lambda: list_models("alice")).code() == grpc.StatusCode.UNAUTHENTICATED

        refused = server.auth.refusals
        write_atomically(tokens, entry("alice").replace(hash_token(TOKENS["alice"]), TOKENS["alice"]))
        wait_for(lambda: server.auth is not None and server.auth.refusals > refused, "the refusal")
        list_models("bob")  # a plaintext token where its hash belongs is refused too


# -- token files, variables and commands -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("[[token]\n", "not valid TOML"),
        ('[[token]]\nname = "a"\nsha256 = "00"\nmodels = ["*"]\n', "64 hex digits"),
        (f'[[token]]\nname = "a"\nsha256 = "{"0" * 64}"\nmodels = ["*"]\nsha265 = "x"\n', "unknown key"),
        (f'[[token]]\nname = "a b"\nsha256 = "{"0" * 64}"\nmodels = ["*"]\n', "name must be"),
        (f'[[token]]\nname = "a"\nsha256 = "{"0" * 64}"\n', "models must be"),
        (
            f'[[token]]\nname = "a"\nsha256 = "{"0" * 64}"\nmodels = ["*"]\nmax_sessions = -1\n',
            "max_sessions",
        ),
        (
            f'[[token]]\nname = "a"\nsha256 = "{"0" * 64}"\nmodels = ["*"]\n'
            f'[[token]]\nname = "a"\nsha256 = "{"1" * 64}"\nmodels = ["*"]\n',
            "two tokens are named 'a'",
        ),
        ('[tokens]\nname = "a"\n', "expected only [[token]] entries"),
    ],
)
def test_a_bad_token_file_is_refused_at_start(tmp_path: Path, text: str, complaint: str) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(TokenFileError, match=None) as info:
        TokenStore(path)
    assert complaint in str(info.value)


def test_token_files_in_json_and_tokens_from_variables(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    alice_entry = {
        "name": "alice",
        "sha256": hash_token(TOKENS["alice"]),
        "models": ["tiny"],
        "max_generates": 2,
    }
    path.write_text(json.dumps({"token": [alice_entry]}))
    (alice,) = parse_token_file(path)
    assert alice.caller.models == frozenset({"tiny"}) and alice.caller.max_generates == 2
    env = {
        "RNNSERVE_AUTH_TOKEN_BOB": f"sha256:{hash_token(TOKENS['bob'])}",
        "RNNSERVE_AUTH_TOKEN_CAROL": f"sha256:{hash_token(TOKENS['carol'])};models=tiny,live;max_sessions=3",
        "RNNSERVE_AUTH_TOKENS": "/not/a/token",  # the file's variable, not a token
    }
    store = TokenStore(path, parse_env_tokens(env))
    assert store.names == ["alice", "bob", "carol"]
    assert store.authenticate(md("bob")).models is None
    carol = store.authenticate(md("carol"))
    assert carol.models == frozenset({"tiny", "live"}) and carol.max_sessions == 3
    with pytest.raises(Unauthenticated):
        store.authenticate(md("envy"))
    with pytest.raises(TokenFileError, match="64 hex digits"):
        parse_env_tokens({"RNNSERVE_AUTH_TOKEN_X": TOKENS["alice"]})  # a plaintext token is refused


def test_auth_commands_make_tokens_the_server_accepts(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    cli = [sys.executable, "-m", "rnnserve", "auth"]
    added = subprocess.run(
        [*cli, "add", "dave", "--models", "tiny", "--max-sessions", "5", "--file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    token = added.stdout.strip()
    assert token and token not in path.read_text()  # the file holds only its hash
    printed = subprocess.run([*cli, "add", "erin"], capture_output=True, text=True, timeout=120, check=True)
    with path.open("a") as f:  # the printed entry, as an operator would paste it
        f.write(
            "\n" + "\n".join(line for line in printed.stdout.splitlines() if not line.startswith("#")) + "\n"
        )
    erin_token = printed.stdout.splitlines()[1].removeprefix("# ").strip()
    store = TokenStore(path)
    dave = store.authenticate([("authorization", f"Bearer {token}")])
    assert dave.name == "dave" and dave.models == frozenset({"tiny"}) and dave.max_sessions == 5
    assert store.authenticate([("authorization", f"Bearer {erin_token}")]).models is None
    hashed = subprocess.run(
        [*cli, "hash"], input=token + "\n", capture_output=True, text=True, timeout=120, check=True
    )
    assert hashed.stdout.strip() == hash_token(token)


def test_authentication_is_off_without_tokens(tiny_only: Path) -> None:
    with background_server(ServerConfig(repo=tiny_only, port=0)) as server:
        assert server.auth is None
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RnnServeStub(channel)
            session = stub.CreateSession(pb.CreateSessionRequest(model="tiny"), timeout=30)
            assert session.session_id and server.engine.sessions.get(session.session_id).owner == ""


def test_the_open_inference_protocols_liveness_and_readiness_need_no_token(served: RnnServeServer) -> None:
    """As grpc.health: probes and load balancers ask them without a token; the V2 work does need one."""
    from rnnserve.inference import grpc_service_pb2 as v2
    from rnnserve.inference import grpc_service_pb2_grpc as v2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        v2_stub = v2_grpc.GRPCInferenceServiceStub(channel)
        assert v2_stub.ServerLive(v2.ServerLiveRequest(), timeout=30).live
        assert v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=30).ready
        error = rpc_error(lambda: v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="tiny"), timeout=30))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert v2_stub.ModelMetadata(
            v2.ModelMetadataRequest(name="tiny"), metadata=md("alice"), timeout=30
        ).name
