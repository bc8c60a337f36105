"""Bearer-token authentication: the token store and the interceptor that gives each call its `Caller`.

Off unless tokens are configured (`--auth-tokens FILE` or `RNNSERVE_AUTH_TOKEN_<NAME>` variables); then
every call except health and reflection must carry `authorization: Bearer <token>` metadata with a
known token, else UNAUTHENTICATED. A token has a name (what logs, session ownership and limits use:
the token itself is never logged, echoed or stored), the models it may use, and optional limits.

The token file (TOML; a name ending in .json: the same structure in JSON) holds only SHA-256 hashes:

    [[token]]
    name = "alice"                  # letters, digits, '_', '-', '.'; unique
    sha256 = "<64 hex digits>"      # of the token's UTF-8 bytes (`rnnserve auth hash` or `auth add`)
    models = ["tiny", "live"]       # or ["*"]: every model (and ReloadModels)
    max_sessions = 100              # optional: overrides --max-sessions-per-token (0 = no limit)
    max_generates = 4               # optional: overrides --max-generates-per-token (0 = no limit)

The server re-reads the file when it changes (checked every RELOAD_INTERVAL_S seconds, and at once on
SIGHUP): a file that does not parse, or has a bad entry, is refused and logged, and the tokens loaded
before stay in force. A variable `RNNSERVE_AUTH_TOKEN_<NAME>=sha256:<hex>` adds a token named <name>
(lower-cased) allowed every model; `sha256:<hex>;models=tiny,live;max_sessions=10;max_generates=2`
narrows it. Variables are read at start (and stay across file reloads).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tomllib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from rnnserve.server.caller import CALLER, Caller
from rnnserve.server.errors import LogLimiter, Unauthenticated

log = logging.getLogger(__name__)

RELOAD_INTERVAL_S = 2.0  # how often the server looks for a changed token file
ENV_PREFIX = "RNNSERVE_AUTH_TOKEN_"
# Services any caller may use without a token: probes and tooling need them.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
# The Open Inference Protocol's liveness and readiness: probes and load balancers ask them without a token.
OPEN_METHODS = frozenset(
    {"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"}
)
TOKEN_PREFIX = "rns_"  # of the tokens `rnnserve auth add` makes (easy to spot in a leaked file)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_KEYS = frozenset({"name", "sha256", "models", "max_sessions", "max_generates"})
REFUSED_LOG_INTERVAL_S = 60.0

NO_TOKEN = (
    "this server requires a token: send the metadata 'authorization: Bearer <token>' (the client's "
    "token option, or $RNNSERVE_TOKEN)"
)
NOT_BEARER = "the 'authorization' metadata must be 'Bearer <token>' (another scheme, or no token, was sent)"
BAD_TOKEN = "the bearer token is not valid (unknown or revoked); check the token you were given"


class TokenFileError(ValueError):
    """A token file (or variable) that cannot be used; says where and what."""


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token's UTF-8 bytes: what the token file holds."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    caller: Caller
    digest: bytes  # the SHA-256 of the token (32 bytes)


def _limit(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TokenFileError(f"{what} must be a whole number >= 0 (0 = no limit), got {value!r}")
    return value


def _digest(value: Any, what: str) -> bytes:
    text = value.strip().lower() if isinstance(value, str) else ""
    text = text.removeprefix("sha256:")
    if not _HEX.match(text):
        raise TokenFileError(
            f"{what}: sha256 must be the 64 hex digits of the token's SHA-256 (`rnnserve auth hash`); "
            "never put the token itself in the file"
        )
    return bytes.fromhex(text)


def entry_of(raw: Mapping[str, Any], where: str) -> TokenEntry:
    """One token entry (a table of the file), checked."""
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise TokenFileError(f"{where}: unknown key(s) {unknown}; an entry has {sorted(_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise TokenFileError(f"{where}: name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}")
    where = f"{where} ({name})"
    models = raw.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise TokenFileError(f'{where}: models must be a non-empty list of model names, or ["*"]')
    return TokenEntry(
        Caller(
            name,
            None if "*" in models else frozenset(models),
            max_sessions=_limit(raw.get("max_sessions"), f"{where}: max_sessions"),
            max_generates=_limit(raw.get("max_generates"), f"{where}: max_generates"),
        ),
        _digest(raw.get("sha256"), where),
    )


def parse_token_file(path: Path) -> list[TokenEntry]:
    """The entries of a token file; TokenFileError (or OSError) when it cannot be used as a whole."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:  # (JSONDecodeError is a ValueError)
        raise TokenFileError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}"
        ) from None
    tokens = data.get("token", []) if isinstance(data, dict) else None
    unknown = sorted(set(data) - {"token"}) if isinstance(data, dict) else []
    if not isinstance(tokens, list) or unknown:
        raise TokenFileError(f"{path}: expected only [[token]] entries (a list under 'token')")
    return [
        entry_of(raw if isinstance(raw, dict) else {}, f"{path}: token {i + 1}")
        for i, raw in enumerate(tokens)
    ]


def parse_env_tokens(environ: Mapping[str, str]) -> list[TokenEntry]:
    """Tokens from `RNNSERVE_AUTH_TOKEN_<NAME>=sha256:<hex>[;models=a,b][;max_sessions=N]
    [;max_generates=N]` variables."""
    entries = []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or not key[len(ENV_PREFIX) :]:
            continue
        name = key[len(ENV_PREFIX) :].lower()
        digest, *options = environ[key].split(";")
        raw: dict[str, Any] = {"name": name, "sha256": digest, "models": ["*"]}
        for option in options:
            field, sep, value = option.strip().partition("=")
            if not sep or field not in ("models", "max_sessions", "max_generates"):
                raise TokenFileError(
                    f"${key}: options after the hash are models=a,b, max_sessions=N or max_generates=N "
                    "(separated by ';')"
                )
            if field == "models":
                raw["models"] = [m.strip() for m in value.split(",") if m.strip()]
            else:
                raw[field] = int(value) if value.strip().isdigit() else value
        entries.append(entry_of(raw, f"${key}"))
    return entries


def _check_unique(entries: Sequence[TokenEntry], where: str) -> None:
    names: set[str] = set()
    digests: set[bytes] = set()
    for entry in entries:
        if entry.caller.name in names:
            raise TokenFileError(f"{where}: two tokens are named {entry.caller.name!r}")
        if entry.digest in digests:
            raise TokenFileError(f"{where}: token {entry.caller.name!r} has the same hash as another")
        names.add(entry.caller.name)
        digests.add(entry.digest)


class TokenStore:
    """The tokens in force: those of the file (reloaded when it changes) and of the environment."""

    def __init__(self, path: Path | None = None, env_entries: Sequence[TokenEntry] = ()) -> None:
        self.path = path
        self.env_entries = list(env_entries)
        self.reloads = 0  # successful loads of the file (the first included)
        self.refusals = 0  # changed files refused (the old tokens stayed)
        self._entries: tuple[TokenEntry, ...] = ()
        self._seen: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of the file last read
        if path is not None:
            self._load()  # at start a bad file is fatal (raised), not logged
        else:
            self._set(list(self.env_entries), "the environment")

    @property
    def names(self) -> list[str]:
        return [e.caller.name for e in self._entries]

    def _signature(self) -> tuple[int, int, int]:
        assert self.path is not None
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _load(self) -> None:
        assert self.path is not None
        seen = self._signature()
        entries = parse_token_file(self.path) + self.env_entries
        self._set(entries, str(self.path))
        self._seen = seen
        self.reloads += 1

    def _set(self, entries: list[TokenEntry], where: str) -> None:
        _check_unique(entries, where)
        self._entries = tuple(entries)  # replaced whole: a call in flight sees the old or the new set
        log.info("authentication: %d token(s) in force (%s)", len(entries), ", ".join(self.names) or "none")

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the file if it changed since it was last read (or `force`); True if new tokens are in
        force. A file that cannot be used is logged and refused: the tokens in force stay."""
        if self.path is None:
            return False
        try:
            if not force and self._signature() == self._seen:
                return False
            self._load()
            return True
        except (OSError, TokenFileError) as exc:
            try:
                self._seen = self._signature()  # log a bad file once, not every check
            except OSError:
                self._seen = None
            self.refusals += 1
            log.error(
                "authentication: token file refused, the %d token(s) loaded before stay: %s",
                len(self._entries),
                exc,
            )
            return False

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Caller:
        """The caller whose token the call's metadata carries; Unauthenticated (saying what is wrong,
        never echoing the token) otherwise."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            raise Unauthenticated(NO_TOKEN)
        value = values[0]
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(NOT_BEARER)
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Caller | None = None
        for entry in self._entries:  # every entry compared, in constant time: no early exit
            if hmac.compare_digest(entry.digest, digest):
                found = entry.caller
        if found is None:
            raise Unauthenticated(BAD_TOKEN)
        return found


def token_store(path: Path | None, environ: Mapping[str, str]) -> TokenStore | None:
    """The server's token store, or None (authentication off) when neither a file nor variables
    name a token."""
    env_entries = parse_env_tokens(environ)
    if path is None and not env_entries:
        return None
    return TokenStore(path, env_entries)


# -- the interceptor -------------------------------------------------------------------------------


class AuthInterceptor(aio.ServerInterceptor):
    """Sets `CALLER` for every call from its bearer token; refuses calls without a valid one
    (Unauthenticated, raised inside the handler, so the ErrorInterceptor around it maps and counts it).
    Health and reflection stay open."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._refused_log = LogLimiter(REFUSED_LOG_INTERVAL_S)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            service = method.lstrip("/").rpartition("/")[0]
            if handler is None or service in OPEN_SERVICES or method in OPEN_METHODS:
                return handler
            wrapped = self._handlers[method] = self._wrap(method, handler)
        return wrapped

    def _caller(self, method: str, context: aio.ServicerContext) -> Caller:
        try:
            caller = self.store.authenticate(context.invocation_metadata())
        except Unauthenticated as exc:
            held = self._refused_log.allow()
            if held is not None:
                log.warning(
                    "refused %s from %s: %s%s",
                    method,
                    context.peer(),
                    exc,
                    f" ({held:,} more refusals since the last such line)" if held else "",
                )
            raise
        CALLER.set(caller)  # the call's own task: the context ends with the call
        return caller

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        def unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def wrapper(request: Any, context: aio.ServicerContext) -> Any:
                self._caller(method, context)
                return await behavior(request, context)

            return wrapper

        def streaming(
            behavior: Callable[..., AsyncGenerator[Any, None]],
        ) -> Callable[..., AsyncIterator[Any]]:
            async def wrapper(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                self._caller(method, context)
                async with aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

            return wrapper

        if handler.unary_unary:
            return handler._replace(unary_unary=unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=streaming(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=streaming(handler.stream_stream))
        return handler
