"""Check bundles offline, in plain words: what `rnnserve models validate REPO` reports, and the graph check
the server runs before serving a bundle.

A bundle `<repo>/<name>/<version>/` is good when its manifest fits the schema (and is not from a newer
rnnserve), it lives where its manifest says, every file it names exists with the recorded sha256, every
graph loads in ONNX Runtime with exactly the inputs/outputs (names, dtypes, fixed and dynamic axes) the
manifest and its state spec describe (a generation graph: exactly its `generate[]` record's, which
the manifest checks against the generation contract), and the tokenizer has the manifest's vocabulary size.
Torch-free: ONNX Runtime and tokenizers (the `serve` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rnnserve.export.manifest import (
    DIALOGUE_PART_ROLES,
    Manifest,
    ManifestError,
    TensorSpec,
    file_problems,
    load_manifest_json,
)

LAST_OUTPUT = "logits_last"  # the "last" graph's logits [batch, vocab] (see export/variants.py)
_ORT_DTYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "float16": "tensor(float16)"}


class GraphArg(Protocol):
    """What ONNX Runtime says about one graph input or output (onnxruntime.NodeArg)."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[Any]: ...


def graph_problems(
    manifest: Manifest, role: str, inputs: Sequence[GraphArg], outputs: Sequence[GraphArg]
) -> list[str]:
    """How a graph's inputs/outputs (as ONNX Runtime reports them) differ from what the manifest says
    the graph of `role` ("step", "last", "generate" or a generation graph's file) has; [] when they match."""
    gen = next((g for g in manifest.generate if g.file == role), None) or (
        manifest.generate_graph() if role == "generate" else None
    )
    if gen is not None:  # a K-step generation graph: exactly the inputs/outputs its record lists
        return _match(gen.file, "input", gen.inputs, inputs, set()) + _match(
            gen.file, "output", gen.outputs, outputs, set()
        )
    if role in DIALOGUE_PART_ROLES:  # not served; their own inputs/outputs (export/dialogue_graphs.py)
        return []
    file = manifest.graph_file(role) or manifest.model_file
    state_outputs = [s.output_name for s in manifest.state]
    if role in ("step", "turn"):  # "turn": the step graph's inputs/outputs, for rows ending a turn
        want_outputs = list(manifest.outputs)
        allowed_extra = {LAST_OUTPUT} if manifest.graphs.get("last") == file else set()
    else:  # last-position logits: the state outputs, and logits_last instead of logits
        want_outputs = [t for t in manifest.outputs if t.name in state_outputs]
        allowed_extra = set()
        if LAST_OUTPUT not in {o.name for o in outputs}:
            return [f"{file}: the 'last' graph has no output {LAST_OUTPUT!r}"]
        allowed_extra.add(LAST_OUTPUT)
    problems = _match(file, "input", manifest.inputs, inputs, set())
    problems += _match(file, "output", want_outputs, outputs, allowed_extra)
    return problems


def _match(
    file: str, kind: str, specs: Sequence[TensorSpec], args: Sequence[GraphArg], allowed_extra: set[str]
) -> list[str]:
    by_name = {a.name: a for a in args}
    problems = []
    for spec in specs:
        arg = by_name.get(spec.name)
        if arg is None:
            problems.append(f"{file}: the graph has no {kind} {spec.name!r} (the manifest lists it)")
            continue
        if arg.type != _ORT_DTYPES.get(spec.dtype, spec.dtype):
            problems.append(
                f"{file}: {kind} {spec.name!r} is {arg.type} in the graph, {spec.dtype} in the manifest"
            )
        problems += _shape_problems(file, kind, spec, list(arg.shape))
    extra = sorted(set(by_name) - {s.name for s in specs} - allowed_extra)
    if extra:
        problems.append(f"{file}: the graph has {kind}s {extra} that the manifest does not list")
    return problems


def _shape_problems(file: str, kind: str, spec: TensorSpec, shape: list[Any]) -> list[str]:
    where = f"{file}: {kind} {spec.name!r} has shape {shape} in the graph but {spec.shape} in the manifest"
    if len(shape) != len(spec.shape):
        return [where]
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(want, str) and isinstance(got, int):
            return [f"{where} (axis {axis}, {want!r}, is fixed to {got} in the graph)"]
        if isinstance(want, int) and isinstance(got, int) and want != got:
            return [where]
    return []


def _session_problems(bundle: Path, manifest: Manifest) -> list[str]:
    import onnxruntime as ort

    problems = []
    roles = {"step": manifest.model_file, **manifest.graphs}
    roles.pop("generate", None)  # one of the generation graphs, each checked under its own file name
    roles.update({g.file: g.file for g in manifest.generate})
    for role, file in roles.items():
        if not (bundle / file).is_file() or (role != "step" and file == manifest.model_file):
            continue  # missing files are reported already; a shared file is checked as "step"
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            sess = ort.InferenceSession(str(bundle / file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for broken files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            problems.append(f"{file}: ONNX Runtime cannot load it ({first})")
            continue
        problems += graph_problems(manifest, role, sess.get_inputs(), sess.get_outputs())
    return problems


def _tokenizer_problems(bundle: Path, manifest: Manifest) -> list[str]:
    from tokenizers import Tokenizer

    path = bundle / manifest.tokenizer_file
    if not path.is_file():
        return []  # reported as a missing file
    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        return [f"{manifest.tokenizer_file}: not a readable tokenizer ({exc})"]
    if size != manifest.vocab_size:
        file, want = manifest.tokenizer_file, manifest.vocab_size
        return [f"{file} has {size} tokens but the manifest says vocab_size {want}"]
    return []


@dataclass
class BundleReport:
    """What is wrong with one bundle directory (nothing, when `ok`)."""

    path: Path
    problems: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def label(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def check_bundle(bundle: Path) -> BundleReport:
    """Every problem of one bundle; stops after the manifest when the manifest itself is unusable."""
    report = BundleReport(Path(bundle))
    try:
        manifest = load_manifest_json(report.path)
    except ManifestError as exc:
        report.problems = [
            f"manifest.json: {p}" if not p.startswith("manifest.json") else p for p in exc.problems
        ]
        return report
    report.manifest = manifest
    if (report.path.parent.name, report.path.name) != (manifest.name, manifest.version):
        report.problems.append(
            f"the manifest says {manifest.name}/{manifest.version} but the bundle lives in {report.label}"
        )
    report.problems += file_problems(report.path, manifest)
    report.problems += _session_problems(report.path, manifest)
    report.problems += _tokenizer_problems(report.path, manifest)
    return report


def bundle_dirs(repo: Path) -> list[Path]:
    """Every `<repo>/<name>/<version>/` directory (hidden ones are exports in progress, not bundles)."""
    return sorted(
        v
        for m in Path(repo).iterdir()
        if m.is_dir() and not m.name.startswith(".")
        for v in m.iterdir()
        if v.is_dir() and not v.name.startswith(".")
    )


def check_repository(repo: Path) -> list[BundleReport]:
    """A report for every bundle of a model repository; raises FileNotFoundError if `repo` is no directory."""
    if not Path(repo).is_dir():
        raise FileNotFoundError(f"model repository {repo} does not exist or is not a directory")
    return [check_bundle(b) for b in bundle_dirs(repo)]
