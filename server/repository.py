"""The model repository: `<repo>/<name>/<version>/{model.onnx, manifest.json, tokenizer.json}`.

Every valid bundle is loaded at start; a bundle that fails to load is logged and skipped, so one bad
upload never takes the whole server down. A bundle is refused when its manifest does not fit the schema
or comes from a newer rnnserve, when a file it names is missing or does not match its sha256, or when
its graph's inputs/outputs are not the ones its manifest (and state spec) describes. `rnnserve models
validate REPO` reports the same problems offline. Versions added to the repository later are loaded
without a restart by the reloader (reload.py), through the same checks (`load_bundle`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rnnserve.export.bundle_check import bundle_dirs, graph_problems
from rnnserve.export.manifest import Manifest, ManifestError, read_manifest
from rnnserve.server.errors import NotFound
from rnnserve.server.quoting import quote
from rnnserve.server.runtime import OnnxModel, RuntimeOptions
from rnnserve.server.text import TextCodec

log = logging.getLogger(__name__)

KNOWN_NAMES = 32  # model names (or versions) listed in a NotFound message; the rest are counted


@dataclass
class LoadedModel:
    """A model version ready to serve: its runtime and its text codec."""

    runtime: OnnxModel
    codec: TextCodec

    @property
    def manifest(self) -> Manifest:
        return self.runtime.manifest

    @property
    def key(self) -> str:
        return self.runtime.key


def _codec(bundle: Path, manifest: Manifest) -> TextCodec:
    try:
        return TextCodec.from_file(bundle / manifest.tokenizer_file, manifest.special_tokens)
    except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot read
        raise ManifestError(f"{manifest.tokenizer_file}: not a readable tokenizer ({exc})") from exc


def _listing(names: list[str]) -> str:
    """Names for a message: "a, b, c", the first KNOWN_NAMES of them when there are more, or "none"."""
    if not names:
        return "none"
    shown = ", ".join(names[:KNOWN_NAMES])
    return shown if len(names) <= KNOWN_NAMES else f"{shown}, … (+{len(names) - KNOWN_NAMES:,} more)"


def version_order(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(version)) if version.isdigit() else (0, version)


# What a broken bundle raises while loading (ORT's own errors are RuntimeErrors).
LOAD_ERRORS = (ManifestError, OSError, RuntimeError, ValueError)


def load_bundle(bundle: Path, options: RuntimeOptions | None = None) -> LoadedModel:
    """Load and check one bundle completely (raises one of LOAD_ERRORS saying why it is refused).
    Nothing is published here: a hot reload runs this in a thread, then adds the result."""
    manifest = read_manifest(bundle)
    if (bundle.parent.name, bundle.name) != (manifest.name, manifest.version):
        raise ManifestError(
            f"the manifest says {manifest.name}/{manifest.version} but the bundle lives in "
            f"{bundle.parent.name}/{bundle.name}"
        )
    runtime = OnnxModel(bundle, manifest, options)
    mismatch = graph_problems(manifest, "step", runtime.session.get_inputs(), runtime.session.get_outputs())
    if mismatch:
        raise ManifestError(mismatch)
    return LoadedModel(runtime, codec=_codec(bundle, manifest))


class ModelRepository:
    """All loaded model versions, addressable by name and version (empty version = latest)."""

    def __init__(
        self, models: list[LoadedModel], root: Path | None = None, options: RuntimeOptions | None = None
    ) -> None:
        self.root = root  # where bundles come from (a hot reload looks there again)
        self.options = options  # how they were loaded (a reload loads new ones the same way)
        self._by_name: dict[str, dict[str, LoadedModel]] = {}
        for model in models:
            self.add(model)

    def add(self, model: LoadedModel) -> None:
        """Serve a (fully loaded) version; it is the latest of its name if its version sorts last."""
        self._by_name.setdefault(model.manifest.name, {})[model.manifest.version] = model

    def remove(self, name: str, version: str) -> LoadedModel:
        """Stop addressing a version (its sessions keep their own reference to it)."""
        versions = self._by_name[name]
        model = versions.pop(version)
        if not versions:
            del self._by_name[name]
        return model

    def latest_version(self, name: str) -> str | None:
        """The version an unversioned request gets, or None when the name is not loaded."""
        versions = self._by_name.get(name)
        return max(versions, key=version_order) if versions else None

    def versions(self, name: str) -> list[LoadedModel]:
        """The loaded versions of a name, oldest first."""
        versions = self._by_name.get(name, {})
        return [versions[v] for v in sorted(versions, key=version_order)]

    @classmethod
    def load(cls, root: Path, options: RuntimeOptions | None = None) -> ModelRepository:
        """Load every bundle under root; log and skip the ones that are broken."""
        if not root.is_dir():
            raise FileNotFoundError(f"model repository {root} does not exist or is not a directory")
        models = []
        for bundle in bundle_dirs(root):  # hidden directories are exports being written: skipped
            try:
                models.append(load_bundle(bundle, options))
            except LOAD_ERRORS as exc:
                log.error("refusing bundle %s: %s", bundle, exc)
        if not models:
            log.warning("no loadable model bundles under %s", root)
        return cls(models, root, options)

    def all(self) -> list[tuple[LoadedModel, bool]]:
        """Every loaded version with a flag marking the latest of its name."""
        out = []
        for name in sorted(self._by_name):
            versions = sorted(self._by_name[name], key=version_order)
            out += [(self._by_name[name][v], v == versions[-1]) for v in versions]
        return out

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The named model at `version` (latest when empty); NotFound says what exists."""
        versions = self._by_name.get(name)
        if not versions:
            known = _listing(sorted(self._by_name))
            raise NotFound(f"model {quote(name)} is not loaded (models: {known})")
        if not version:
            version = max(versions, key=version_order)
        if version not in versions:
            known = _listing(sorted(versions, key=version_order))
            raise NotFound(f"model {quote(name)} has no version {quote(version)} (versions: {known})")
        return versions[version]

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_name.values())
