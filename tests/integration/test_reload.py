"""Hot reload on a real server: new versions load without a restart (ReloadModels or the watcher), old
ones serve their sessions until the last closes, broken bundles are refused, and reloading under load
fails no call. Each test has a repository of its own (`hot`, a copy of the trained `tiny`)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from rnnserve.client import Client
from rnnserve.client.errors import NotFoundError
from rnnserve.server.app import RnnServeServer, background_server
from rnnserve.server.config import ServerConfig
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

NAME = "hot"
TEXT = "def add(a, b):\n    return a"
DEADLINE_S = 120.0  # generous: only a bound on a wait that should end far sooner, never a speed check


def add_version(repo: Path, source: Path, version: str, name: str = NAME) -> Path:
    """Publish a copy of bundle `source` as <repo>/<name>/<version>, as an export does: written under a
    hidden name (which a reload ignores), then renamed. Only manifest.json names the version and it is
    not hashed (the sha256s cover the graphs), so editing it is all a new version needs."""
    hidden = repo / name / f".{version}.partial"
    shutil.copytree(source, hidden)
    manifest = json.loads((hidden / "manifest.json").read_text())
    manifest.update(name=name, version=version)
    (hidden / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return hidden.rename(repo / name / version)


@pytest.fixture
def repo(lm_repo: Path, tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    add_version(root, lm_repo / "tiny" / "1", "1")
    return root


@contextmanager
def serving(repo: Path, **config: Any) -> Iterator[tuple[RnnServeServer, str]]:
    with background_server(ServerConfig(repo=repo, port=0, **config)) as server:
        yield server, f"127.0.0.1:{server.port}"


def reload(url: str) -> pb.ReloadModelsResponse:
    with grpc.insecure_channel(url) as channel:
        response: pb.ReloadModelsResponse = pb_grpc.RnnServeStub(channel).ReloadModels(
            pb.ReloadModelsRequest(), timeout=DEADLINE_S
        )
        return response


def versions(client: Client) -> dict[str, bool]:
    """version -> latest, for NAME."""
    return {m.version: m.latest for m in client.models() if m.name == NAME}


def eventually(what: str, check: Callable[[], bool], pause: float = 0.05) -> None:
    """Poll until check() holds (bounded by DEADLINE_S, which only guards against a hang)."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(pause)


def loaded_metric(version: str) -> float | None:
    return REGISTRY.get_sample_value(
        "rnnserve_model_loaded", {"model": f"{NAME}@{version}", "provider": "CPUExecutionProvider"}
    )


def test_new_version_serves_new_sessions_and_old_one_lives_until_its_last_session(repo: Path) -> None:
    with serving(repo) as (_, url), Client(url, timeout=60, retry=None) as client:
        old = client.session(NAME)
        first = old.feed(TEXT[:10])
        assert (reload(url).loaded, versions(client)) == ([], {"1": True})  # nothing new yet

        add_version(repo, repo / NAME / "1", "2")
        response = reload(url)
        assert [(m.name, m.version, m.latest) for m in response.loaded] == [(NAME, "2", True)]
        assert not response.refused and not response.unloaded  # v1 has a session
        assert versions(client) == {"1": False, "2": True}
        assert loaded_metric("2") == 1

        with client.session(NAME) as new:
            assert new.info().version == "2"
            fresh = new.feed(TEXT)
        # The open v1 session keeps its state and streams on v1; the same weights give the same output.
        out = old.feed(TEXT[10:])
        assert old.info().version == "1" and out.position == len(TEXT) > first.position
        assert [c.id for c in out.top] == [c.id for c in fresh.top]
        with client.session(NAME, version="1") as explicit:  # a retiring version stays addressable
            assert explicit.info().version == "1"
        assert "1" in versions(client)

        old.close()  # its last session: v1 goes (at a reload or a sweep, once quiet)
        unloaded: list[str] = []
        eventually("v1 unloaded", lambda: bool(unloaded.extend(reload(url).unloaded) or unloaded))
        assert unloaded == [f"{NAME}/1"]
        assert versions(client) == {"2": True}
        assert loaded_metric("1") is None
        with pytest.raises(NotFoundError, match="no version"):
            client.session(NAME, version="1")
        with client.session(NAME) as again:
            assert again.feed(TEXT).position == len(TEXT)


def test_broken_bundles_are_refused_and_nothing_of_them_is_served(repo: Path) -> None:
    with serving(repo) as (_, url), Client(url, timeout=60, retry=None) as client:
        truncated = add_version(repo, repo / NAME / "1", "3")
        model = truncated / "model.onnx"
        model.write_bytes(model.read_bytes()[:1000])
        misplaced = add_version(repo, repo / NAME / "1", "4")
        manifest = json.loads((misplaced / "manifest.json").read_text())
        (misplaced / "manifest.json").write_text(json.dumps({**manifest, "version": "5"}))
        shutil.copytree(repo / NAME / "1", repo / NAME / ".6.partial")  # an export in progress: unseen

        response = reload(url)
        refused = {Path(r.path).name: r.reason for r in response.refused}
        assert set(refused) == {"3", "4"}
        assert "sha256" in refused["3"]
        assert "4" in refused["4"] and "5" in refused["4"]
        assert not response.loaded and not response.unloaded
        assert versions(client) == {"1": True}
        with client.session(NAME) as session:
            assert session.info().version == "1" and session.feed(TEXT).position == len(TEXT)
        assert loaded_metric("3") is None and loaded_metric("4") is None

        # Fixed in place, the bundle loads at the next reload.
        shutil.copy(repo / NAME / "1" / "model.onnx", model)
        response = reload(url)
        assert [m.version for m in response.loaded] == ["3"]
        assert "3" not in {Path(r.path).name for r in response.refused}
        assert versions(client)["3"]


def test_a_version_gone_from_disk_is_unloaded_but_never_the_latest(repo: Path) -> None:
    add_version(repo, repo / NAME / "1", "2")  # both load at start; 1 is not retiring, only older
    with serving(repo) as (_, url), Client(url, timeout=60, retry=None) as client:
        assert reload(url).unloaded == [] and versions(client) == {"1": False, "2": True}
        with client.session(NAME, version="1") as session:
            shutil.rmtree(repo / NAME / "1")
            shutil.rmtree(repo / NAME / "2")
            assert reload(url).unloaded == []  # v1 has a session, v2 is the latest
            assert session.feed(TEXT).position == len(TEXT)
        unloaded: list[str] = []
        eventually("v1 unloaded", lambda: bool(unloaded.extend(reload(url).unloaded) or unloaded))
        assert unloaded == [f"{NAME}/1"] and versions(client) == {"2": True}


def test_the_watcher_loads_a_new_version_by_itself(repo: Path) -> None:
    with serving(repo, watch_interval_s=0.1) as (_, url), Client(url, timeout=60, retry=None) as client:
        with client.session(NAME) as session:
            session.feed(TEXT[:5])
            add_version(repo, repo / NAME / "1", "2")
            eventually("the watcher loads v2", lambda: versions(client).get("2") is True, pause=0.1)
            assert session.feed(TEXT[5:]).position == len(TEXT)
            assert session.info().version == "1"
        with client.session(NAME) as new:
            assert new.info().version == "2"
        # The sweeper (every few seconds) or the watcher's next reload unloads v1 once quiet.
        eventually("v1 unloaded", lambda: versions(client) == {"2": True}, pause=0.2)


def test_reloading_under_load_fails_no_call(repo: Path) -> None:
    workers = 6
    errors: list[BaseException] = []
    seen: set[str] = set()
    rounds = [0] * workers  # sessions each worker finished
    stop = threading.Event()
    progress = threading.Condition()

    def work(index: int, url: str) -> None:
        with Client(url, timeout=60, retry=None) as client:
            while not stop.is_set():
                try:
                    with client.session(NAME) as session:
                        seen.add(session.info().version)
                        for piece in (TEXT[:7], TEXT[7:19], TEXT[19:]):
                            session.feed(piece)
                        tokens = list(session.generate(max_tokens=8, ignore_eos=True))
                        assert len(tokens) == 8 and session.info().position == len(TEXT) + 8
                except BaseException as exc:  # every failure is the test's business
                    errors.append(exc)
                    return
                with progress:
                    rounds[index] += 1
                    progress.notify_all()

    def every_worker_finishes_a_session() -> None:
        with progress:
            start = list(rounds)
            moved = progress.wait_for(
                lambda: errors or all(r > s for r, s in zip(rounds, start, strict=True)), DEADLINE_S
            )
            assert moved, "the workers made no progress"

    # A short TTL sweeps every second, so retired versions are also unloaded by the sweeper under load.
    with serving(repo, session_ttl_s=2.0) as (_, url):
        threads = [threading.Thread(target=work, args=(i, url)) for i in range(workers)]
        for thread in threads:
            thread.start()
        try:
            every_worker_finishes_a_session()
            unloaded: list[str] = []
            with Client(url, timeout=60, retry=None) as client:
                for batch in ([2], [3, 4]):  # one reload, then two back to back
                    for version in map(str, batch):
                        add_version(repo, repo / NAME / "1", version)
                        response = reload(url)
                        assert [m.version for m in response.loaded] == [version] and not response.refused
                        unloaded.extend(response.unloaded)

                    def retired(latest: str = version) -> bool:  # by a reload or the sweeper
                        unloaded.extend(reload(url).unloaded)
                        every_worker_finishes_a_session()
                        return versions(client) == {latest: True}

                    eventually("the retired versions unloaded while sessions stream", retired)
            assert sorted(unloaded) == sorted(set(unloaded)) and f"{NAME}/4" not in unloaded
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=DEADLINE_S)
    assert errors == []
    assert {"1", "2", "4"} <= seen
