"""The HTTP side (server/http.py) on a real server: the playground's JSON and server-sent-event endpoints
through aiohttp's client, bearer tokens on them, and the page itself in headless Chromium (Playwright
driving Debian's `chromium`; skipped with a reason where either is missing, failed under CI)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the HTTP server needs aiohttp (the serve extra)")

CHROMIUM = os.environ.get("RNNSERVE_CHROMIUM", "/usr/bin/chromium")
REVIEW = "the movie was great and wonderful and brilliant but the plot was dull"


@pytest.fixture(scope="module")
def http_url(lm_repo: Path, classifier_checkpoints: dict[str, Path]) -> Iterator[str]:
    """A real server with HTTP on a free port: `tiny` (LM), `live` (streaming classifier), `bi`."""
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig

    config = ServerConfig(repo=lm_repo, host="127.0.0.1", port=0, http_port=0)
    with background_server(config) as server:
        assert server.http_port > 0
        yield f"http://127.0.0.1:{server.http_port}"


async def _call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def call(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """(status, JSON answer) of one request."""
    return asyncio.run(_call(method, url, body, headers))


async def _events(url: str, body: dict[str, Any]) -> tuple[int, str, list[tuple[str, dict[str, Any]]]]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as response:
        events = []
        if response.content_type == "text/event-stream":
            text = (await response.read()).decode()
            for block in text.split("\n\n"):
                if block.strip():
                    lines = dict(line.split(": ", 1) for line in block.splitlines())
                    events.append((lines["event"], json.loads(lines["data"])))
        return response.status, response.content_type, events


def generate_events(base: str, body: dict[str, Any]) -> tuple[int, str, list[tuple[str, dict[str, Any]]]]:
    return asyncio.run(_events(f"{base}/api/generate", body))


def test_page_and_models(http_url: str) -> None:
    async def page() -> tuple[int, str, str]:
        async with aiohttp.ClientSession() as http, http.get(http_url + "/") as response:
            return response.status, response.content_type, await response.text()

    status, kind, text = asyncio.run(page())
    assert status == 200 and kind == "text/html" and "rnnserve playground" in text
    status, answer = call("GET", f"{http_url}/api/models")
    assert status == 200
    models = {m["name"]: m for m in answer["models"]}
    assert models["tiny"]["task"] == "lm" and models["tiny"]["streams"]
    assert models["live"]["task"] == "classifier" and models["live"]["streams"]
    assert len(models["live"]["labels"]) == 2
    assert not models["bi"]["streams"]


def test_generate_streams_token_events(http_url: str) -> None:
    status, session = call("POST", f"{http_url}/api/sessions", {"model": "tiny"})
    assert status == 201 and session["task"] == "lm"
    sid = session["session_id"]
    body = {"session_id": sid, "prompt": "def ", "max_tokens": 24, "temperature": 0, "top_k": 0, "top_p": 1}
    status, kind, events = generate_events(http_url, body)
    assert status == 200 and kind == "text/event-stream"
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"tokens"}
    batches = [data for name, data in events if name == "tokens"]
    made = sum(len(b["token_ids"]) for b in batches)
    assert 1 <= made <= 24
    assert events[-1][1]["position"] == batches[-1]["position"] == 4 + made  # "def " is 4 characters
    assert events[-1][1]["finish_reason"] in ("length", "eos", "stop")
    # Greedy from the same state is the same text: a fresh session says so; the first one continues.
    status, again = call("POST", f"{http_url}/api/sessions", {"model": "tiny"})
    _, _, events2 = generate_events(http_url, {**body, "session_id": again["session_id"]})
    assert "".join(d["text"] for n, d in events2 if n == "tokens") == "".join(b["text"] for b in batches)
    _, _, more = generate_events(http_url, {"session_id": sid, "max_tokens": 3})
    assert more[-1] == ("done", more[-1][1]) and more[-1][1]["position"] > events[-1][1]["position"]
    for s in (sid, again["session_id"]):
        assert call("DELETE", f"{http_url}/api/sessions/{s}")[0] == 200


def test_errors_are_json_with_http_statuses(http_url: str) -> None:
    _, session = call("POST", f"{http_url}/api/sessions", {"model": "tiny"})
    sid = session["session_id"]
    status, kind, _ = generate_events(http_url, {"session_id": sid, "temperature": -1, "max_tokens": 4})
    assert (status, kind) == (400, "application/json")
    status, answer = call("POST", f"{http_url}/api/generate", {"session_id": sid, "temperature": -1})
    assert status == 400 and answer["error"]["code"] == "INVALID_ARGUMENT"
    assert "temperature" in answer["error"]["message"]
    status, answer = call("POST", f"{http_url}/api/generate", {"session_id": "nope", "max_tokens": 4})
    assert status == 404 and answer["error"]["code"] == "NOT_FOUND"
    status, answer = call("POST", f"{http_url}/api/sessions", {"model": "missing"})
    assert status == 404
    status, answer = call("POST", f"{http_url}/api/generate", {"session_id": sid, "max_tokens": "ten"})
    assert status == 400 and "max_tokens" in answer["error"]["message"]
    status, answer = call("POST", f"{http_url}/api/sessions", ["not", "an", "object"])
    assert status == 400
    _, live = call("POST", f"{http_url}/api/sessions", {"model": "live"})
    status, answer = call("POST", f"{http_url}/api/generate", {"session_id": live["session_id"]})
    assert status == 400 and answer["error"]["code"] == "FAILED_PRECONDITION"
    status, answer = call("POST", f"{http_url}/api/sessions", {"model": "bi"})  # whole-text: no sessions
    assert status == 400
    for s in (sid, live["session_id"]):
        call("DELETE", f"{http_url}/api/sessions/{s}")


def test_feed_word_by_word_equals_classify_of_each_prefix(http_url: str) -> None:
    _, session = call("POST", f"{http_url}/api/sessions", {"model": "live"})
    words = REVIEW.split()
    running = []
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        status, answer = call(
            "POST", f"{http_url}/api/feed", {"session_id": session["session_id"], "text": text}
        )
        assert status == 200
        running.append(answer["probs"])
    for i, probs in enumerate(running):
        status, whole = call(
            "POST", f"{http_url}/api/classify", {"model": "live", "text": " ".join(words[: i + 1])}
        )
        assert status == 200
        np.testing.assert_allclose(probs, whole["probs"], atol=1e-5)
    assert len({round(p[0], 6) for p in running}) > 1  # the sentiment moves
    call("DELETE", f"{http_url}/api/sessions/{session['session_id']}")


def test_bearer_tokens_guard_the_api(lm_repo: Path, classifier_checkpoints: dict[str, Path]) -> None:
    from rnnserve.server.app import background_server
    from rnnserve.server.config import ServerConfig

    token = "rns_playground_test_token"
    digest = hashlib.sha256(token.encode()).hexdigest()
    config = ServerConfig(
        repo=lm_repo,
        port=0,
        http_port=0,
        auth_env=(("RNNSERVE_AUTH_TOKEN_PAGE", f"sha256:{digest};models=live"),),
    )
    with background_server(config) as server:
        base = f"http://127.0.0.1:{server.http_port}"
        status, answer = call("GET", f"{base}/api/models")
        assert status == 401 and answer["error"]["code"] == "UNAUTHENTICATED"
        status, _ = call("GET", f"{base}/api/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        good = {"Authorization": f"Bearer {token}"}
        status, answer = call("GET", f"{base}/api/models", headers=good)
        assert status == 200 and [m["name"] for m in answer["models"]] == ["live"]
        status, answer = call("POST", f"{base}/api/sessions", {"model": "tiny"}, headers=good)
        assert status == 403 and answer["error"]["code"] == "PERMISSION_DENIED"

        async def page() -> int:
            async with aiohttp.ClientSession() as http, http.get(base + "/") as response:
                return response.status

        assert asyncio.run(page()) == 200  # the page itself is open


# -- the page in a real browser ------------------------------------------------------------------------


def _browser_or_skip() -> Any:
    """Playwright's sync API, or a skip (a failure under CI, whose .ci/run installs both)."""
    why = ""
    try:
        from playwright import sync_api
    except ImportError:
        why = "needs Playwright for Python (pip install playwright; the dev extra has it)"
    if not why and not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        why = f"needs Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"under CI the browser test must run: it {why}")
        pytest.skip(f"the playground's browser test {why}")
    return sync_api


def _wait_for(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_playground_in_headless_chromium(http_url: str) -> None:
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(http_url + "/")
            _wait_for(lambda: page.locator("#model option").count() >= 3, "the model list")

            # A language model: type a prompt, generate, watch tokens arrive.
            page.select_option("#model", "tiny")
            assert page.locator("#lm-panel").is_visible()
            page.fill("#prompt", "def ")
            page.fill("#max-tokens", "40")
            page.fill("#temperature", "0")
            page.click("#generate")
            text = _wait_for(lambda: page.locator("#output-text").text_content(), "generated text")
            assert text
            _wait_for(lambda: "Done" in (page.locator("#lm-status").text_content() or ""), "the end")
            assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
            assert page.locator("#continue").is_enabled()

            # A streaming classifier: type a review word by word, watch the bars move.
            page.select_option("#model", "live")
            _wait_for(lambda: page.locator("#clf-panel").is_visible(), "the classifier's panel")
            assert page.locator("#lm-panel").is_hidden()
            bars = page.locator("#bars .bar")
            assert bars.count() == 2
            seen: list[tuple[str, ...]] = []
            review = page.locator("#review")
            review.click()
            words = REVIEW.split()
            for i, word in enumerate(words):
                review.press_sequentially(word + " ")
                _wait_for(
                    lambda n=i + 1: (page.locator("#clf-status").text_content() or "").startswith(
                        f"{n} word(s)"
                    ),
                    f"word {i + 1} read",
                )
                seen.append(tuple(bars.nth(k).get_attribute("data-prob") or "" for k in range(2)))
            assert all(all(v for v in values) for values in seen)
            assert len(set(seen)) > 1, f"the bars never moved: {seen}"
            probs = [float(v) for v in seen[-1]]
            assert abs(sum(probs) - 1) < 1e-4
            assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
            assert not errors, errors
        finally:
            browser.close()
