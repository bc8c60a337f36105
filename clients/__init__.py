"""rnnserve.client: the Python client library (and the client commands of the `rnnserve` CLI).

from rnnserve.client import Client

with Client("localhost:50051") as client, client.session("shakespeare") as session:
    print(session.feed("To be, or not").top[0])
    for token in session.generate(max_tokens=50, temperature=0.8, seed=1):
        print(token.text, end="", flush=True)
"""

from rnnserve.client.aio import AsyncClient, AsyncGenerateStream, AsyncSession
from rnnserve.client.channel import TLS
from rnnserve.client.client import Client, GenerateStream, Session
from rnnserve.client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RnnserveError,
    SessionDiverged,
    UnavailableError,
)
from rnnserve.client.retry import RetryPolicy
from rnnserve.client.types import (
    Candidate,
    Classification,
    FeedOutput,
    GeneratedToken,
    GenerateMessage,
    ModelInfo,
    RefusedModel,
    ReloadResult,
    SessionInfo,
)

__all__ = [
    "TLS",
    "AsyncClient",
    "AsyncGenerateStream",
    "AsyncSession",
    "Candidate",
    "Classification",
    "Client",
    "FailedPreconditionError",
    "FeedOutput",
    "GenerateMessage",
    "GenerateStream",
    "GeneratedToken",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "RefusedModel",
    "ReloadResult",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RnnserveError",
    "Session",
    "SessionDiverged",
    "SessionInfo",
    "UnavailableError",
]
