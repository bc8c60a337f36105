"""A session as bytes (rnnserve.v1.SessionSnapshot) and back: what the session store keeps, what
ExportSession gives a client and ImportSession takes.

Everything that decides a session's future outputs goes in exactly (float32 state and distributions
as raw bytes), so a session restored from its snapshot continues bit for bit as it would have.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
from google.protobuf.message import DecodeError

from rnnserve.server.errors import FailedPrecondition, InvalidArgument
from rnnserve.server.generation import FinishReason
from rnnserve.server.quoting import quote
from rnnserve.server.repository import LoadedModel
from rnnserve.server.sessions import RECENT_TOKENS, Applied, AppliedGeneration, AppliedInput, Session
from rnnserve.server.slab import State
from rnnserve.server.tasks import Classification, FeedResult
from rnnserve.v1 import rnnserve_pb2 as pb

FORMAT = 1
FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
}
_FINISH_REASON_OF = {code: reason for reason, code in FINISH_REASONS.items()}


def classification_pb(c: Classification) -> pb.Classification:
    return pb.Classification(label=c.label, label_id=c.label_id, probs=c.probs)


def feed_result_pb(result: FeedResult) -> pb.StreamResponse:
    return pb.StreamResponse(
        session_id=result.session_id,
        position=result.position,
        token_ids=result.token_ids,
        token_logprobs=result.token_logprobs,
        top=[pb.TokenCandidate(id=i, text=t, logprob=lp) for i, t, lp in result.top],
        classification=classification_pb(result.classification) if result.classification else None,
        replayed=result.replayed,
    )


def _feed_result(m: pb.StreamResponse) -> FeedResult:
    c = m.classification if m.HasField("classification") else None
    return FeedResult(
        session_id=m.session_id,
        position=m.position,
        token_ids=list(m.token_ids),
        token_logprobs=list(m.token_logprobs),
        top=[(t.id, t.text, t.logprob) for t in m.top],
        classification=None if c is None else Classification(c.label, c.label_id, list(c.probs)),
    )


def _floats(array: np.ndarray | None) -> bytes:
    return b"" if array is None else np.ascontiguousarray(array, dtype="<f4").tobytes()


def _array(data: bytes, size: int, what: str) -> np.ndarray | None:
    if not data:
        return None
    if len(data) != 4 * size:
        raise FailedPrecondition(f"the snapshot's {what} has {len(data) // 4} values; this model has {size}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)  # own, writable copy


def snapshot_of(session: Session) -> pb.SessionSnapshot:
    """Everything the session is, now (call it when no run on the session is in flight)."""
    m = session.model.manifest
    snapshot = pb.SessionSnapshot(
        format=FORMAT,
        session_id=session.id,
        model=m.name,
        version=m.version,
        position=session.position,
        created_at=session.created_at,
        ttl_seconds=int(session.ttl_seconds),
        state=[
            pb.StateTensor(name=name, shape=array.shape, data=_floats(array))
            for name, array in session.state.items()
        ],
        next_logprobs=_floats(session.next_logprobs),
        class_probs=_floats(session.class_probs),
        recent_tokens=list(session.recent_tokens),
        saved_at=time.time(),
        owner=session.owner,  # (a revived session keeps it: see SessionKeeper._revive)
    )
    last = session.last_applied
    if isinstance(last, AppliedInput):
        snapshot.applied_input.CopyFrom(
            pb.AppliedInputRecord(
                start_position=last.start_position, tokens=last.tokens, result=feed_result_pb(last.result)
            )
        )
    elif isinstance(last, AppliedGeneration):
        snapshot.applied_generation.CopyFrom(
            pb.AppliedGenerationRecord(
                start_position=last.start_position,
                request_id=last.request_id,
                request_digest=last.digest,
                seed=last.seed,
                first_position=max(last.first_position, 0),
                recent_before=last.recent_before,
                token_ids=last.token_ids,
                logprobs=last.logprobs,
                finish_reason=FINISH_REASONS[last.finish_reason],
                appended_eos=last.appended_eos,
            )
        )
    return snapshot


def parse_snapshot(data: bytes) -> pb.SessionSnapshot:
    """The snapshot in `data`; InvalidArgument when the bytes are not one this server can read."""
    snapshot = pb.SessionSnapshot()
    try:
        snapshot.ParseFromString(data)
    except DecodeError as exc:
        raise InvalidArgument(
            f"the bytes are not a session snapshot ({exc}); give ExportSession's bytes"
        ) from exc
    if snapshot.format != FORMAT or not snapshot.session_id or not snapshot.model:
        raise InvalidArgument(
            f"the bytes are not a session snapshot of format {FORMAT} (format {snapshot.format}, "
            f"model {quote(snapshot.model)}); give ExportSession's bytes"
        )
    return snapshot


def state_of(snapshot: pb.SessionSnapshot, model: LoadedModel) -> State:
    """The snapshot's state as batch-1 arrays in the graph's layout; FailedPrecondition, saying what
    differs, when it does not fit the model."""
    tensors = {t.name: t for t in snapshot.state}
    state: State = {}
    for spec in model.manifest.state:
        shape = tuple(1 if i == spec.batch_axis else d for i, d in enumerate(spec.shape))
        tensor = tensors.get(spec.name)
        if tensor is None or tuple(tensor.shape) != shape or len(tensor.data) != 4 * int(np.prod(shape)):
            got = "missing" if tensor is None else f"shaped {list(tensor.shape)}"
            raise FailedPrecondition(
                f"the snapshot's state {quote(spec.name)} is {got}, but model {model.key} needs {list(shape)}"
            )
        state[spec.name] = np.frombuffer(tensor.data, dtype="<f4").astype(np.float32).reshape(shape)
    extra = sorted(set(tensors) - {s.name for s in model.manifest.state})
    if extra:
        raise FailedPrecondition(f"the snapshot has state {extra} that model {model.key} does not have")
    return state


def _applied(snapshot: pb.SessionSnapshot) -> Applied | None:
    which = snapshot.WhichOneof("last_applied")
    if which == "applied_input":
        r = snapshot.applied_input
        return AppliedInput(r.start_position, tuple(r.tokens), _feed_result(r.result))
    if which == "applied_generation":
        g = snapshot.applied_generation
        return AppliedGeneration(
            start_position=g.start_position,
            request_id=g.request_id,
            digest=g.request_digest,
            seed=g.seed,
            first_position=g.first_position,
            recent_before=tuple(g.recent_before),
            token_ids=list(g.token_ids),
            logprobs=list(g.logprobs),
            finish_reason=_FINISH_REASON_OF.get(g.finish_reason),
            appended_eos=g.appended_eos,
        )
    return None


def restore(session: Session, snapshot: pb.SessionSnapshot, *, keep_applied: bool = True) -> None:
    """Make a fresh session (in its own slot, on the snapshot's model) what the snapshot says.
    `keep_applied`: also what a retry of its last message is answered with (the same session, revived;
    not a copy under a new id)."""
    m = session.model.manifest
    state = state_of(snapshot, session.model)
    next_logprobs = _array(snapshot.next_logprobs, m.vocab_size, "next-token distribution")
    class_probs = _array(snapshot.class_probs, len(m.labels), "class probabilities")
    session.slab.write(session.slot, state)
    session.position = snapshot.position
    session.next_logprobs = next_logprobs
    session.class_probs = class_probs
    session.recent_tokens = deque(snapshot.recent_tokens, maxlen=RECENT_TOKENS)
    session.created_at = snapshot.created_at or session.created_at
    if keep_applied:
        session.last_applied = _applied(snapshot)
