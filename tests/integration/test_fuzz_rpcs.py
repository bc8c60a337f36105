"""Every RPC of a live server, fuzzed: hypothesis-generated requests (edge values in every field:
empty and huge strings, ids out of range, huge repeated fields, NaN/inf floats, uint64 values that read
as negative in a signed type, unknown fields and wrong wire types, snapshots with unknown enum values)
and raw malformed bytes, through a real channel to one server for the module.

Each call ends OK or with a documented status (never INTERNAL or UNKNOWN), with a message of at most
2,048 bytes and nothing logged with a traceback; the server answers health after each; and a
bystander session, fed before the run, is exactly as it was after it (state, distribution, position).

Bounded for CI on 2 cores (a few hundred calls, derandomized: the same examples on every run).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_malformed import BAD_UTF8, CORRUPT, HEALTH, REFLECTION, RNNSERVE  # the raw-bytes approach

from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

C = grpc.StatusCode
# Every status the API documents (rnnserve.proto's header, and the token checks'); never INTERNAL/UNKNOWN.
DOCUMENTED = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.FAILED_PRECONDITION,
    C.RESOURCE_EXHAUSTED,
    C.OUT_OF_RANGE,
    C.UNAVAILABLE,
    C.PERMISSION_DENIED,
    C.UNAUTHENTICATED,
}
MAX_DETAILS_BYTES = 2048
TIMEOUT_S = 30
MAX_GENERATE_MESSAGES = 64  # read this many, then cancel (a Generate may ask for 4,096 tokens)
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
STATUSES: Counter[tuple[str, str]] = Counter()  # (method, status) over the module: printed at the end
BYSTANDER_TEXT = "def add(a, b):\n    return a + b\n"

# -- the server ----------------------------------------------------------------------------------------


class Records(logging.Handler):
    """The server's log records at ERROR or with a traceback (it runs in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(record)

    def take(self) -> str:
        text = "\n".join(
            self.format(r) + (("\n" + logging.Formatter().formatException(r.exc_info)) if r.exc_info else "")
            for r in self.bad
        )
        self.bad.clear()
        return text


@dataclass
class Live:
    """The module's server, its channel and the sessions requests are aimed at (resolved per call)."""

    channel: grpc.Channel
    stub: pb_grpc.RnnServeStub
    health: health_pb2_grpc.HealthStub
    records: Records
    victims: dict[str, str] = field(default_factory=dict)  # "@lm" / "@clf" / "@closed" -> session id
    keep: set[str] = field(default_factory=set)  # sessions not closed after a call (victims, bystander)
    vocab: int = 0

    def session(self, model: str, text: str | None = None) -> str:
        info = self.stub.CreateSession(pb.CreateSessionRequest(model=model), timeout=TIMEOUT_S)
        if text:
            list(self.stub.Stream(iter([pb.StreamRequest(session_id=info.session_id, text=text)])))
        return str(info.session_id)

    def refresh(self) -> None:
        """(Re)open the victims a fuzzed CloseSession closed."""
        for key, model, text in [("@lm", "tiny", "def "), ("@clf", "live", "great")]:
            current = self.victims.get(key)
            if current:
                try:
                    self.stub.GetSession(pb.GetSessionRequest(session_id=current), timeout=TIMEOUT_S)
                    continue
                except grpc.RpcError as e:
                    assert e.code() == C.NOT_FOUND, e
            self.keep.discard(current or "")
            self.victims[key] = self.session(model, text)
            self.keep.add(self.victims[key])
        if "@closed" not in self.victims:
            closed = self.session("tiny")
            self.stub.CloseSession(pb.CloseSessionRequest(session_id=closed), timeout=TIMEOUT_S)
            self.victims["@closed"] = closed

    def resolve(self, key: str) -> str:
        return self.victims.get(key, key)


@pytest.fixture(scope="module")
def live(lm_repo: Path, classifier_checkpoints: dict[str, Path]) -> Iterator[Live]:
    from rnnserve.export.manifest import read_manifest
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig

    records = Records()
    logging.getLogger().addHandler(records)
    # Its own server (not conftest's, shared with other modules): the fuzz opens and closes many sessions.
    config = ServerConfig(
        repo=lm_repo, host="127.0.0.1", port=0, max_message_bytes=64 * 1024, max_sessions=64
    )
    try:
        with (
            background_server(config) as server,
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            it = Live(channel, pb_grpc.RnnServeStub(channel), health_pb2_grpc.HealthStub(channel), records)
            it.vocab = read_manifest(lm_repo / "tiny" / "1").vocab_size
            it.refresh()
            yield it
    finally:
        logging.getLogger().removeHandler(records)
        print("\nstatuses by method:", dict(sorted(STATUSES.items())))


# -- calls with bytes ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    cancelled_by_us: bool = False


def send(channel: grpc.Channel, kind: str, method: str, messages: list[bytes]) -> Outcome:
    """Call `method` with these serialized messages (one unless bidi), without any serializer."""
    responses: list[bytes] = []
    try:
        if kind == "unary":
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            responses.append(call(messages[0], timeout=TIMEOUT_S))
        elif kind == "server_streaming":
            stream = channel.unary_stream(method, request_serializer=None, response_deserializer=None)(
                messages[0], timeout=TIMEOUT_S
            )
            for response in stream:
                responses.append(response)
                if len(responses) >= (1 if method.startswith(HEALTH) else MAX_GENERATE_MESSAGES):
                    stream.cancel()  # a Watch never ends; a Generate may run for 4,096 tokens
                    return Outcome(C.OK, "", responses, cancelled_by_us=True)
        else:
            stream = channel.stream_stream(method, request_serializer=None, response_deserializer=None)(
                iter(messages), timeout=TIMEOUT_S
            )
            responses.extend(stream)
    except grpc.RpcError as e:
        return Outcome(e.code(), e.details() or "", responses)
    return Outcome(C.OK, "", responses)


def check(
    live: Live, kind: str, method: str, messages: list[bytes], what: object, keep_open: bool = False
) -> Outcome:
    """Send, then assert the outcome is documented and concise, nothing was logged with a traceback,
    and the server still answers health; close a session the call opened (unless `keep_open`)."""
    outcome = send(live.channel, kind, method, messages)
    STATUSES[(method.rsplit("/", 1)[-1], outcome.code.name)] += 1
    logged = live.records.take()
    where = f"{method} with {what!r:.1500}"
    assert outcome.code in DOCUMENTED, f"{where}: {outcome.code.name} {outcome.details!r}\n{logged}"
    assert len(outcome.details.encode()) <= MAX_DETAILS_BYTES, (
        f"{where}: {len(outcome.details.encode())} bytes"
    )
    assert not logged, f"{where}: the server logged\n{logged}"
    answer = live.health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    opens = method.endswith(("/CreateSession", "/ForkSession", "/ImportSession"))
    if opens and outcome.responses and not keep_open:
        opened = pb.SessionInfo.FromString(outcome.responses[0]).session_id
        if opened not in live.keep:
            live.stub.CloseSession(pb.CloseSessionRequest(session_id=opened), timeout=TIMEOUT_S)
    live.refresh()
    return outcome


# -- strategies ----------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
uint32 = st.one_of(
    st.sampled_from([0, 1, 2, 64, 100, 101, 4096, 4097, 2**31 - 1, 2**31, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
uint64 = st.one_of(st.sampled_from([0, 1, 2, 2**32, 2**63 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
float32 = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, 1e-30, 3.4e38, NAN, INF, -INF]),
    st.floats(width=32),
)
small = st.integers(0, 8)
text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "<eos>", "<unk>", "a" * 300, "é" * 1000, "😀" * 500, "\n" * 100]),
)
huge_text = st.sampled_from(["x" * 20_000, "日" * 10_000])  # within the 64 KiB message limit
too_big_text = st.just("y" * 70_000)  # over it: RESOURCE_EXHAUSTED
any_text = st.one_of(text, text, text, huge_text, too_big_text)
model = st.one_of(
    st.sampled_from(["tiny", "tiny", "live", "bi", "", "nope", "tiny/1", "../tiny", "TINY"]),
    st.sampled_from(["tiny", "live"]),
    text,
)
version = st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "latest", "01", " 1"]), text)
session_id = st.one_of(st.sampled_from(["@lm", "@lm", "@clf", "@closed", "", "nope"]), text)
token_id = st.one_of(st.integers(0, 40), st.integers(0, 40), uint32)  # vocabularies of ~30
ids = st.one_of(
    st.lists(token_id, max_size=8), st.sampled_from([[0] * 20_000, list(range(200)), [2**32 - 1] * 3])
)
# Appended to a serialized message: unknown fields (varint, bytes, fixed32, fixed64, group), a known
# field again with the wrong wire type, or a repeat of a string field (the last one wins).
SUFFIXES = [
    b"",
    b"\xf8\x06\x01",  # field 111, varint
    b"\xfa\x06\x03abc",  # field 111, 3 bytes
    b"\x9d\x07\x00\x00\xc0\x7f",  # field 115, fixed32 (a NaN)
    b"\xa1\x07" + b"\xff" * 8,  # field 116, fixed64
    b"\xab\x07\xac\x07",  # field 117, an empty group
    b"\x08\x01",  # field 1 as a varint (it is a string or a message everywhere)
    b"\x0a\x02zz",  # field 1 again, 2 bytes
]
suffix = st.one_of(st.just(b""), st.just(b""), st.sampled_from(SUFFIXES))  # half of them plain
Build = Callable[[Live], Any]


def encoded(message: Any, tail: bytes) -> bytes:
    return bytes(message.SerializeToString() + tail)


@st.composite
def create_requests(draw: st.DrawFn) -> Build:
    m, v, ttl = draw(model), draw(version), draw(uint32)
    return lambda _: pb.CreateSessionRequest(model=m, version=v, ttl_seconds=ttl)


@st.composite
def session_requests(draw: st.DrawFn, type_: Any) -> Build:
    key = draw(session_id)
    return lambda live: type_(session_id=live.resolve(key))


@st.composite
def fork_requests(draw: st.DrawFn) -> Build:
    key, ttl = draw(session_id), draw(uint32)
    return lambda live: pb.ForkSessionRequest(session_id=live.resolve(key), ttl_seconds=ttl)


@st.composite
def stream_messages(draw: st.DrawFn) -> list[Build]:
    out = []
    for i in range(draw(st.integers(1, 3))):
        key = draw(session_id if i == 0 else st.one_of(st.just(""), session_id))
        fields: dict[str, Any] = {
            "top_k": draw(st.one_of(small, uint32)),
            "return_token_logprobs": draw(st.booleans()),
        }
        which = draw(st.sampled_from(["text", "tokens", "none"]))
        if which == "text":
            fields["text"] = draw(any_text)
        elif which == "tokens":
            fields["tokens"] = pb.TokenIds(ids=draw(ids))
        if draw(st.booleans()):
            fields["expected_position"] = draw(st.one_of(small, uint64))
        out.append(
            lambda live, key=key, fields=fields: pb.StreamRequest(session_id=live.resolve(key), **fields)
        )
    return out


@st.composite
def generate_requests(draw: st.DrawFn) -> Build:
    sampling: dict[str, Any] = {
        "temperature": draw(st.one_of(st.sampled_from([0.0, 0.7, 1.0, 1.5]), float32)),
        "top_k": draw(st.one_of(small, uint32)),
        "top_p": draw(st.one_of(st.sampled_from([0.0, 0.9, 1.0]), float32)),
    }
    if draw(st.booleans()):
        sampling["seed"] = draw(uint64)
    stops = draw(
        st.one_of(
            st.lists(text, max_size=3),
            st.just(["x"] * 17),  # over 16
            st.just(["z" * 257]),  # over 256 characters
        )
    )
    fields: dict[str, Any] = {
        "sampling": pb.SamplingParams(**sampling),
        "max_tokens": draw(st.one_of(st.integers(1, 8), small, uint32)),
        "stop": stops,
        "stop_token_ids": draw(st.lists(token_id, max_size=4)),
        "ignore_eos": draw(st.booleans()),
        "max_tokens_per_message": draw(st.one_of(small, uint32)),
        "request_id": draw(st.one_of(st.just(""), st.just(""), text, st.just("r" * 129))),
    }
    which = draw(st.sampled_from(["text", "tokens", "none"]))
    if which == "text":
        fields["prompt_text"] = draw(any_text)
    elif which == "tokens":
        fields["prompt_tokens"] = pb.TokenIds(ids=draw(ids))
    if draw(st.booleans()):
        fields["expected_position"] = draw(st.one_of(small, uint64))
    if draw(st.booleans()):
        fields["flush_interval_ms"] = draw(st.one_of(st.sampled_from([0, 1, 1000, 1001]), uint32))
    key = draw(session_id)
    return lambda live: pb.GenerateRequest(session_id=live.resolve(key), **fields)


@st.composite
def classify_requests(draw: st.DrawFn) -> Build:
    fields: dict[str, Any] = {
        "model": draw(st.one_of(st.sampled_from(["live", "bi"]), model)),
        "version": draw(version),
    }
    which = draw(st.sampled_from(["texts", "tokens", "both", "none"]))
    if which in ("texts", "both"):
        fields["texts"] = draw(st.one_of(st.lists(any_text, max_size=4), st.just(["a"] * 1025)))
    if which in ("tokens", "both"):
        fields["token_lists"] = [pb.TokenIds(ids=i) for i in draw(st.lists(ids, max_size=3))]
    return lambda _: pb.ClassifyRequest(**fields)


# A snapshot mutation: (a short name for the report, what it does to a parsed SessionSnapshot).
Mutation = tuple[str, Callable[[Any], None]]


@st.composite
def mutations(draw: st.DrawFn) -> Mutation:
    """One change to an exported snapshot, with edge values."""
    what = draw(
        st.sampled_from(
            [
                "format", "model", "version", "position", "ttl", "created_at", "state_shape", "state_data",
                "state_nan", "state_drop", "state_extra", "next_logprobs", "logprobs_nan", "class_probs",
                "recent_tokens", "applied_input", "applied_generation", "unknown_enum", "session_id",
            ]
        )
    )  # fmt: skip
    u32, u64, f, t, i = draw(uint32), draw(uint64), draw(float32), draw(text), draw(ids)
    other_model = draw(model)
    nan4 = b"\x00\x00\xc0\x7f"

    def apply(s: Any) -> None:
        if what == "format":
            s.format = u32
        elif what == "model":
            s.model = other_model
        elif what == "version":
            s.version = t
        elif what == "position":
            s.position = u64
        elif what == "ttl":
            s.ttl_seconds = u32
        elif what == "created_at":
            s.created_at, s.saved_at = f, f
        elif what == "state_shape" and s.state:
            s.state[0].shape[:] = [u32 % 5, 1, 32]
        elif what == "state_data" and s.state:
            s.state[0].data = s.state[0].data[: u32 % 100]
        elif what == "state_nan" and s.state:
            s.state[0].data = nan4 * (len(s.state[0].data) // 4)
        elif what == "state_drop":
            del s.state[:]
        elif what == "state_extra" and s.state:
            s.state.add(name=t, shape=list(s.state[0].shape), data=s.state[0].data)
        elif what == "next_logprobs":
            s.next_logprobs = s.next_logprobs[: u32 % 64]
        elif what == "logprobs_nan":
            s.next_logprobs = nan4 * (len(s.next_logprobs) // 4)
        elif what == "class_probs":
            s.class_probs = b"\x00\x00\x80\x3f" * (u32 % 4)
        elif what == "recent_tokens":
            s.recent_tokens[:] = i[:50]
        elif what == "applied_input":
            s.applied_input.start_position = u64
            s.applied_input.tokens[:] = i[:50]
        elif what == "applied_generation":
            g = s.applied_generation
            g.start_position, g.request_id, g.seed, g.first_position = u64, t, u64, u64
            g.token_ids[:] = i[:50]
            g.logprobs[:] = [f] * min(len(i), 50)
        elif what == "unknown_enum":
            s.applied_generation.finish_reason = 99  # not a FinishReason
            s.applied_generation.token_ids[:] = [3, 4]
            s.applied_generation.logprobs[:] = [-1.0, -2.0]
        elif what == "session_id":
            s.session_id = t

    return what, apply


@st.composite
def import_requests(draw: st.DrawFn) -> Build:
    """An exported snapshot (of the LM or the classifier victim) with a few mutations, or junk bytes."""
    source = draw(st.sampled_from(["@lm", "@clf", "junk"]))
    changes = draw(st.lists(mutations(), max_size=3))
    junk = draw(st.binary(max_size=64))
    ttl = draw(uint32)

    def build(live: Live) -> Any:
        if source == "junk":
            return pb.ImportSessionRequest(snapshot=junk, ttl_seconds=ttl)
        exported = live.stub.ExportSession(
            pb.ExportSessionRequest(session_id=live.resolve(source)), timeout=TIMEOUT_S
        )
        snapshot = pb.SessionSnapshot.FromString(exported.snapshot)
        for _, change in changes:
            change(snapshot)
        return pb.ImportSessionRequest(snapshot=snapshot.SerializeToString(), ttl_seconds=ttl)

    build.__qualname__ = f"import {source} with {[name for name, _ in changes]}"
    return build


UNARY_CASES: dict[str, Callable[[], st.SearchStrategy[Build]]] = {
    "ListModels": lambda: st.just(lambda _: pb.ListModelsRequest()),
    "CreateSession": create_requests,
    "GetSession": lambda: session_requests(pb.GetSessionRequest),
    "CloseSession": lambda: session_requests(pb.CloseSessionRequest),
    "ForkSession": fork_requests,
    "ExportSession": lambda: session_requests(pb.ExportSessionRequest),
    "ImportSession": import_requests,
    "Classify": classify_requests,
    "ReloadModels": lambda: st.just(lambda _: pb.ReloadModelsRequest()),
}
EXAMPLES = {"ListModels": 10, "ReloadModels": 10, "ImportSession": 80, "Classify": 60}


def use_imported(live: Live, outcome: Outcome) -> None:
    """A session that ImportSession accepted works: it streams and (a language model) generates, with
    documented statuses only (a mutated snapshot must not make a session that fails later)."""
    info = pb.SessionInfo.FromString(outcome.responses[0])
    feed = pb.StreamRequest(session_id=info.session_id, text="ab", return_token_logprobs=info.task == "lm")
    check(live, "bidi", RNNSERVE + "Stream", [feed.SerializeToString()], f"a feed of imported {info}")
    if info.task == "lm":
        generate = pb.GenerateRequest(session_id=info.session_id, max_tokens=4, sampling=pb.SamplingParams())
        check(live, "server_streaming", RNNSERVE + "Generate", [generate.SerializeToString()], "generate")
        generate.sampling.temperature = 1.0
        check(live, "server_streaming", RNNSERVE + "Generate", [generate.SerializeToString()], "generate")
    live.stub.CloseSession(pb.CloseSessionRequest(session_id=info.session_id), timeout=TIMEOUT_S)


@pytest.mark.parametrize("method", list(UNARY_CASES))
def test_fuzzed_unary_requests_end_with_documented_statuses(live: Live, bystander: Any, method: str) -> None:
    @settings(FUZZ, max_examples=EXAMPLES.get(method, 40))
    @given(build=UNARY_CASES[method](), tail=suffix)
    def run(build: Build, tail: bytes) -> None:
        request = build(live)
        use = method == "ImportSession"
        outcome = check(live, "unary", RNNSERVE + method, [encoded(request, tail)], (request, tail), use)
        if use and outcome.code == C.OK:
            use_imported(live, outcome)

    run()


@settings(FUZZ, max_examples=80)
@given(builds=stream_messages(), tails=st.lists(suffix, min_size=3, max_size=3))
def test_fuzzed_streams_end_with_documented_statuses(
    live: Live, bystander: Any, builds: list[Build], tails: list[bytes]
) -> None:
    requests = [b(live) for b in builds]
    messages = [encoded(r, t) for r, t in zip(requests, tails, strict=False)]
    check(live, "bidi", RNNSERVE + "Stream", messages, (requests, tails))


@settings(FUZZ, max_examples=100)
@given(build=generate_requests(), tail=suffix)
def test_fuzzed_generates_end_with_documented_statuses(
    live: Live, bystander: Any, build: Build, tail: bytes
) -> None:
    request = build(live)
    check(live, "server_streaming", RNNSERVE + "Generate", [encoded(request, tail)], (request, tail))


METHODS = [
    *(pytest.param("unary", RNNSERVE + m, id=m) for m in UNARY_CASES),
    pytest.param("bidi", RNNSERVE + "Stream", id="Stream"),
    pytest.param("server_streaming", RNNSERVE + "Generate", id="Generate"),
    pytest.param("unary", HEALTH + "Check", id="Health.Check"),
    pytest.param("server_streaming", HEALTH + "Watch", id="Health.Watch"),
    pytest.param("bidi", REFLECTION, id="ServerReflectionInfo"),
]
# Bytes that do not parse, or parse into something odd: corrupt lengths, bad UTF-8, bad tags, truncation.
MALFORMED = [
    CORRUPT,
    BAD_UTF8,
    b"\x0a\x02\xc3\x28",
    b"\x00",
    b"\x07",
    b"\xff" * 11,
    b"\x0b",  # a group start with no end
    b"\x0a\xff\xff\xff\xff\x0f",  # a length of 2**32 - 1
    b"\x12\x01",
    b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # an 11-byte varint
]


@pytest.mark.parametrize(("kind", "method"), METHODS)
def test_raw_malformed_bytes_end_with_documented_statuses(
    live: Live, bystander: Any, kind: str, method: str
) -> None:
    @settings(FUZZ, max_examples=25)
    @given(data=st.one_of(st.sampled_from(MALFORMED), st.binary(max_size=48)), count=st.integers(1, 3))
    def run(data: bytes, count: int) -> None:
        check(live, kind, method, [data] * (count if kind == "bidi" else 1), data)

    run()


def test_health_watch_answers(live: Live) -> None:
    """The standard health Watch (what a load balancer's watcher calls) sends the status first."""
    (first,) = send(live.channel, "server_streaming", HEALTH + "Watch", [b""]).responses
    assert health_pb2.HealthCheckResponse.FromString(first).status == health_pb2.HealthCheckResponse.SERVING


# -- the bystander -------------------------------------------------------------------------------------


@dataclass
class Bystander:
    session_id: str
    snapshot: pb.SessionSnapshot
    reference_next: list[tuple[int, str, float]]  # what feeding the text again gives (a reference session)


def feed_bystander_text(live: Live, session: str) -> list[tuple[int, str, float]]:
    """The full next-token distribution (every candidate the tiny vocabulary has) after the text."""
    request = pb.StreamRequest(session_id=session, text=BYSTANDER_TEXT, top_k=100)
    (response,) = live.stub.Stream(iter([request]), timeout=TIMEOUT_S)
    assert len(response.top) == min(100, live.vocab)
    return [(c.id, c.text, c.logprob) for c in response.top]


@pytest.fixture(scope="module")
def bystander(live: Live) -> Bystander:
    """A session fed a fixed text before the fuzz; a reference session fed it twice (then closed) says
    what feeding it again must give after."""
    reference = live.session("tiny")
    first, second = feed_bystander_text(live, reference), feed_bystander_text(live, reference)
    live.stub.CloseSession(pb.CloseSessionRequest(session_id=reference), timeout=TIMEOUT_S)
    session = live.session("tiny")
    assert feed_bystander_text(live, session) == first  # the same text from the same start: the same
    live.keep.add(session)
    exported = live.stub.ExportSession(pb.ExportSessionRequest(session_id=session), timeout=TIMEOUT_S)
    return Bystander(session, pb.SessionSnapshot.FromString(exported.snapshot), second)


def test_the_bystander_session_is_exactly_as_it_was(live: Live, bystander: Bystander) -> None:
    """Runs after the fuzz (last in the module): nothing any request did reached this session."""
    stub = live.stub
    exported = stub.ExportSession(pb.ExportSessionRequest(session_id=bystander.session_id))
    after = pb.SessionSnapshot.FromString(exported.snapshot)
    before = bystander.snapshot
    assert after.position == before.position == len(BYSTANDER_TEXT)
    assert list(after.state) == list(before.state)  # bit for bit
    assert after.next_logprobs == before.next_logprobs
    assert list(after.recent_tokens) == list(before.recent_tokens)
    assert feed_bystander_text(live, bystander.session_id) == bystander.reference_next
    assert STATUSES[("Generate", "OK")] > 0 and STATUSES[("Stream", "OK")] > 0  # the fuzz reached the model
