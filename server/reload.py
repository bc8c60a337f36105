"""Hot reload: model versions added to the repository are served without a restart.

A reload (the ReloadModels admin call, or the watcher every `--watch-interval-s` seconds) looks for
bundles newer than the latest loaded version of their name. The rules:

- Per name, the newest new version that loads is loaded; new versions older than it are left alone (they
  would retire at once), as is any bundle not newer than the latest loaded version (a restart loads every
  version on disk). Hidden directories are exports still being written.
- A bundle is loaded and checked completely in a thread (ORT sessions, graph checks, tokenizer), then
  published on the event loop in one synchronous step (repository, engine, metrics): never half-loaded.
  A refused bundle is logged and reported; ReloadModels retries it every time, the watcher only once its
  files change (so a broken upload is not reloaded and re-logged every few seconds).
- The new version is the latest at once: a CreateSession without a version gets it, ListModels marks it.
  The older versions of its name are *retiring*: still addressable by explicit version while loaded
  (their sessions go on; a new session may still ask for one by version), and unloaded once quiet: no
  open session, nothing queued or running in their scheduler, and no run since the previous check at
  least QUIET_S earlier (which covers a stateless Classify that picked the version just before the
  reload). Checks run at each reload and each session sweep (see app.py).
- A version whose directory disappeared from disk (seen by a reload) is unloaded the same way. The latest
  version of a name is never unloaded.
- One lock: two reloads at once (watcher and admin call) never load a bundle twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from rnnserve.export.bundle_check import bundle_dirs
from rnnserve.server import metrics
from rnnserve.server.engine import Engine
from rnnserve.server.errors import FailedPrecondition
from rnnserve.server.repository import LoadedModel, load_bundle, version_order

log = logging.getLogger(__name__)

QUIET_S = 1.0  # a retiring version must stay quiet this long (over two checks) before it is unloaded

Fingerprint = tuple[tuple[str, int, int], ...]  # (file name, size, mtime_ns) of each file of a bundle


@dataclass
class ReloadResult:
    loaded: list[LoadedModel] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # (bundle, reason)
    unloaded: list[str] = field(default_factory=list)  # "name/version"


@dataclass
class _Scan:
    on_disk: set[tuple[str, str]]  # (name, version) of every bundle directory
    candidates: dict[
        str, list[tuple[Path, Fingerprint]]
    ]  # name -> bundles newer than its latest, newest first


def _fingerprint(bundle: Path) -> Fingerprint:
    try:
        return tuple(
            sorted((f.name, st.st_size, st.st_mtime_ns) for f in bundle.iterdir() for st in [f.stat()])
        )
    except OSError:  # changing under us: the next scan sees it settled
        return ()


def _scan(root: Path, latest: dict[str, str]) -> _Scan:
    """In a thread: what is on disk, and the bundles newer than the latest loaded version of their name."""
    scan = _Scan(set(), {})
    for bundle in bundle_dirs(root):
        name, version = bundle.parent.name, bundle.name
        scan.on_disk.add((name, version))
        if name not in latest or version_order(version) > version_order(latest[name]):
            scan.candidates.setdefault(name, []).append((bundle, _fingerprint(bundle)))
    for bundles in scan.candidates.values():
        bundles.sort(key=lambda b: version_order(b[0].name), reverse=True)
    return scan


class Reloader:
    """Loads new versions from the engine's repository and unloads retired ones (see the module doc)."""

    def __init__(self, engine: Engine, quiet_s: float = QUIET_S) -> None:
        self.engine = engine
        self.quiet_s = quiet_s
        self.closed = False  # the server is stopping: nothing more is published
        self._lock = asyncio.Lock()
        self._retiring: set[str] = set()  # model keys superseded by a version a reload loaded
        self._gone: set[str] = set()  # model keys whose bundle directory was not on disk at the last scan
        self._quiet: dict[str, tuple[float, int]] = {}  # key -> (first seen quiet, its batches_run then)
        self._refused: dict[Path, Fingerprint] = {}  # refused bundles, as they were when refused

    async def reload(self, *, retry_refused: bool = True) -> ReloadResult:
        """Load what is new, then unload what is retired and quiet. `retry_refused=False` (the watcher)
        skips bundles refused before whose files have not changed since."""
        async with self._lock:
            result = ReloadResult()
            repo = self.engine.repository
            if repo.root is None or self.closed:
                return result
            latest = {m.manifest.name: m.manifest.version for m, is_latest in repo.all() if is_latest}
            try:
                scan = await asyncio.to_thread(_scan, repo.root, latest)
            except OSError as exc:
                raise FailedPrecondition(f"cannot read the model repository {repo.root}: {exc}") from exc
            for bundles in scan.candidates.values():
                for bundle, fingerprint in bundles:
                    if not retry_refused and self._refused.get(bundle) == fingerprint:
                        continue
                    try:
                        model = await asyncio.to_thread(load_bundle, bundle, repo.options)
                    except Exception as exc:  # whatever a bad bundle raises: refused, nothing of it served
                        log.error("reload: refusing bundle %s: %s", bundle, exc)
                        self._refused[bundle] = fingerprint
                        result.refused.append((bundle, str(exc)))
                        continue
                    if self.closed:
                        return result
                    self._refused.pop(bundle, None)
                    self._publish(model)
                    result.loaded.append(model)
                    break  # older new versions of this name would only retire at once
            self._gone = {
                m.key for m, _ in repo.all() if (m.manifest.name, m.manifest.version) not in scan.on_disk
            }
            result.unloaded = await self._unload_quiet()
            return result

    async def sweep(self) -> list[str]:
        """From the session sweeper: unload retiring versions gone quiet ("name/version" of each).
        Skipped while a reload runs (it checks at its end)."""
        if self._lock.locked() or not (self._retiring or self._gone):
            return []
        async with self._lock:
            try:
                return await self._unload_quiet()
            except Exception:  # the sweeper (which also expires sessions) must outlive it
                log.exception("unloading retired model versions failed")
                return []

    async def watch(self, interval_s: float) -> None:
        """Reload every interval_s seconds until cancelled (the server's watcher task)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload(retry_refused=False)
            except FailedPrecondition as exc:
                log.warning("watcher: %s", exc)
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("watcher: reload failed")

    def _publish(self, model: LoadedModel) -> None:
        """On the loop, in one step: the new version serves and is the latest; older ones retire."""
        repo = self.engine.repository
        older = [m.key for m in repo.versions(model.manifest.name)]
        repo.add(model)
        self.engine.add_model(model)
        metrics.MODELS.labels(model.key, model.runtime.provider).set(1)
        self._retiring.update(older)
        log.info("reload: serving %s as the latest; retiring %s", model.key, ", ".join(older) or "nothing")

    async def _unload_quiet(self) -> list[str]:
        """Unload the retiring (or gone) versions that are not the latest and have been quiet long enough.
        count_for is O(sessions): called once per such version per check (there are few)."""
        now = time.monotonic()
        unloaded = []
        watched = self._retiring | self._gone
        for model, is_latest in self.engine.repository.all():
            key = model.key
            if is_latest or key not in watched:
                continue
            scheduler = self.engine.schedulers[key]
            if self.engine.sessions.count_for(key) or not scheduler.idle:
                self._quiet.pop(key, None)
                continue
            since, runs = self._quiet.setdefault(key, (now, scheduler.batches_run))
            if runs != scheduler.batches_run:  # it ran since the last check: quiet starts again
                self._quiet[key] = (now, scheduler.batches_run)
            elif now - since >= self.quiet_s:
                await self._unload(model)
                unloaded.append(f"{model.manifest.name}/{model.manifest.version}")
        return unloaded

    async def _unload(self, model: LoadedModel) -> None:
        key = model.key
        self.engine.repository.remove(model.manifest.name, model.manifest.version)
        await self.engine.remove_model(key)
        with contextlib.suppress(KeyError):
            metrics.MODELS.remove(key, model.runtime.provider)
        self._retiring.discard(key)
        self._gone.discard(key)
        self._quiet.pop(key, None)
        log.info("unloaded %s (retired or gone from disk, no session left)", key)
