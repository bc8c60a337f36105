"""The session store: limits, TTL expiry, clear errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rnnserve.server.errors import InvalidArgument, NotFound, ResourceExhausted
from rnnserve.server.repository import LoadedModel, ModelRepository
from rnnserve.server.sessions import SessionLimits, SessionTable


@pytest.fixture(scope="module")
def model(lm_repo: Path) -> LoadedModel:
    return ModelRepository.load(lm_repo).get("tiny")


def test_new_session_starts_at_the_initial_state(model: LoadedModel) -> None:
    session = SessionTable().create(model)
    assert session.position == 0 and session.next_logprobs is None
    assert {k: v.shape for k, v in session.state.items()} == {"h": (2, 1, 32), "c": (2, 1, 32)}
    assert not any(v.any() for v in session.state.values())


def test_session_limit_is_resource_exhausted(model: LoadedModel) -> None:
    store = SessionTable(SessionLimits(max_sessions=2))
    store.create(model)
    store.create(model)
    with pytest.raises(ResourceExhausted, match="maximum of 2 sessions"):
        store.create(model)


def test_idle_sessions_expire_after_their_ttl(model: LoadedModel) -> None:
    store = SessionTable()
    short = store.create(model, ttl_seconds=5)
    long = store.create(model, ttl_seconds=60)
    later = time.monotonic() + 10  # a given time, not a sleep: no dependence on the machine's speed
    assert store.evict_expired(now=later) == 1
    with pytest.raises(NotFound, match="expired"):
        store.get(short.id)
    assert store.get(long.id) is long
    assert short.closed and short.slot == -1


def test_a_lookup_does_not_restart_the_idle_ttl(model: LoadedModel) -> None:
    """GetSession is a lookup, not a use (documented on GetSession in the .proto)."""
    store = SessionTable()
    session = store.create(model, ttl_seconds=5)
    session.last_used -= 4  # idle for 4 of its 5 seconds
    before = session.last_used
    assert store.get(session.id) is session
    assert session.last_used == before
    assert store.evict_expired(now=before + 6) == 1


def test_a_closed_session_frees_its_slot_once(model: LoadedModel) -> None:
    store = SessionTable()
    session = store.create(model)
    slab = session.slab
    store.close(session.id)
    session.close()  # again (e.g. closed, then found expired): nothing more happens
    assert session.slot == -1 and slab.in_use == 0


def test_bad_ttl_and_missing_id(model: LoadedModel) -> None:
    store = SessionTable()
    with pytest.raises(InvalidArgument, match="ttl_seconds"):
        store.create(model, ttl_seconds=-1)
    with pytest.raises(InvalidArgument, match="session_id is required"):
        store.get("")


def test_repository_resolves_latest_and_skips_broken_bundles(lm_repo: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(lm_repo / "tiny" / "1", repo / "tiny" / "1")
    shutil.copytree(lm_repo / "tiny" / "1", repo / "tiny" / "2")
    (repo / "tiny" / "2" / "manifest.json").write_text(
        (repo / "tiny" / "2" / "manifest.json").read_text().replace('"version": "1"', '"version": "2"')
    )
    shutil.copytree(lm_repo / "tiny" / "1", repo / "broken" / "1")
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    loaded = ModelRepository.load(repo)
    assert len(loaded) == 2
    assert loaded.get("tiny").manifest.version == "2"
    assert loaded.get("tiny", "1").manifest.version == "1"
    with pytest.raises(NotFound, match="broken"):
        loaded.get("broken")
