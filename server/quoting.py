"""Quoting client input in error messages, cut to a readable length.

A status message travels in gRPC trailing metadata, which clients refuse above 16 KiB
("received metadata size exceeds hard limit"): a message that repeats a 20 kB session id or a list of
5,000 bad token ids would turn a clear NOT_FOUND into an unreadable RESOURCE_EXHAUSTED. Every quote of
user input in an error goes through these helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

QUOTE_CHARS = 64  # characters of a quoted string kept in a message
QUOTE_ITEMS = 8  # items of a quoted list kept in a message
# The most a status message may carry (the interceptor cuts longer ones): far below the 16 KiB limit.
MAX_STATUS_MESSAGE = 2048


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """repr() of `text`, cut after `limit` characters with the count of the rest, e.g.
    'zzzz…' (+19,936 more characters)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… (+{len(text) - limit:,} more characters)"


def quote_items(items: Sequence[object], limit: int = QUOTE_ITEMS) -> str:
    """The first `limit` items of a list as `[a, b, …] (+N more)`."""
    shown = ", ".join(str(i) for i in items[:limit])
    if len(items) <= limit:
        return f"[{shown}]"
    return f"[{shown}, …] (+{len(items) - limit:,} more)"


def cap_message(message: str, limit: int = MAX_STATUS_MESSAGE) -> str:
    """A status message cut to `limit` characters (a backstop: quotes are cut where they are made)."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}… (message cut: {len(message) - limit:,} more characters)"
