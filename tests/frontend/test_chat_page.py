"""The chat page at / in headless Chromium (Debian's, driven by playwright), against a real
server on the tiny chat model: what a person typing into it sees."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import running_server, serve_command

sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)"
)
# Chromium as root in a container, and quiet: with no network, its background services fail.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHAT = "/v1/chat/completions"
QUESTION = "Write a Python function that adds two numbers."
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page; it fails the test if the page's script throws, or if its own policy
    blocks something of the page's."""
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
    )
    yield page
    context.close()
    assert not errors


@pytest.fixture(scope="module")
def smollm2_url(smollm2_folder: Path) -> Iterator[str]:
    """The default model, for answers slow enough to stop and worth a screenshot."""
    with running_server(serve_command(smollm2_folder)) as url:
        yield url


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots are kept: $MLC_ARTIFACTS_DIR, else pytest's temporary folder."""
    folder = os.environ.get("MLC_ARTIFACTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)
    return tmp_path_factory.mktemp("artifacts")


def open_page(page: Any, url: str, **settings: str) -> None:
    """Open the chat page, wait for the model list, and fill in settings by field id."""
    page.goto(url + "/")
    page.locator("#model option").first.wait_for(state="attached")
    for field, value in settings.items():
        page.fill(f"#{field}", value)


def ask(page: Any, text: str) -> Any:
    """Type a message and send it with Enter; the locator of the answer."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    return page.locator(".message.assistant").last


def wait_done(answer: Any) -> str:
    answer.locator("xpath=self::*[@data-done]").wait_for()
    return str(answer.get_attribute("data-done"))


def running(url: str, headers: dict[str, str] | None = None) -> int:
    stats = httpx.get(f"{url}/verbose_stats", headers=headers, timeout=30).json()
    return sum(engine["num_running"] for engine in stats["engines"])


def regex_for(text: str) -> str:
    """A regex (Rust's syntax) matching exactly `text`."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$" else "\\n" if c == "\n" else c for c in text)


def test_the_page_is_served_from_the_package_with_a_strict_policy(tiny_server_url: str) -> None:
    page = httpx.get(tiny_server_url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("chat.js", "markdown.js", "chat.css"):
        static = httpx.get(f"{tiny_server_url}/static/{name}", timeout=30)
        assert static.status_code == 200 and static.text
        assert "http://" not in static.text and "//cdn" not in static.text
    assert 'src="/static/chat.js"' in page.text


@pytest.mark.slow
def test_typed_message_streams_an_answer_and_the_conversation_is_kept(
    smollm2_url: str, page: Any, artifacts: Path
) -> None:
    open_page(page, smollm2_url, temperature="0", max_tokens="48")
    sent: list[dict[str, Any]] = []
    page.on(
        "request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith(CHAT) else 0
    )
    answer = ask(page, QUESTION)
    # Text shows while the answer is still running: it arrives as it is generated.
    page.locator("body.busy .message.assistant .content:not(:empty)").wait_for()
    assert wait_done(answer) in ("stop", "cut at max tokens")
    expected = httpx.post(
        smollm2_url + CHAT,
        json={"messages": [{"role": "user", "content": QUESTION}],
              "temperature": 0, "max_tokens": 48},
        timeout=60,
    ).json()  # fmt: skip
    reply = expected["choices"][0]["message"]["content"]
    # SmolLM2's greedy answer writes its code in a fence, which shows as a code block.
    code_blocks = answer.locator(".code-block").count()
    assert code_blocks == (reply.count("```") + 1) // 2
    stats = answer.locator(".stats").inner_text()
    tokens = expected["usage"]["completion_tokens"]
    assert stats.startswith("TTFT ") and " tok/s · " in stats and f"· {tokens} tokens" in stats
    ask(page, "Now for three numbers.")
    wait_done(page.locator(".message.assistant").last)
    first, second = sent
    assert first["stream"] is True and first["temperature"] == 0 and first["max_tokens"] == 48
    assert second["messages"] == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Now for three numbers."},
    ]
    shot = artifacts / "chat-page.png"
    page.screenshot(path=str(shot))
    print(f"chat page screenshot: {shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stop_ends_a_long_answer_and_the_engine_frees_it(smollm2_url: str, page: Any) -> None:
    open_page(page, smollm2_url, temperature="0", max_tokens="900")
    answer = ask(page, "Write a long story about a dragon.")
    page.locator("body.busy .message.assistant .content:not(:empty)").wait_for()
    assert running(smollm2_url) == 1
    page.click("#stop")
    assert wait_done(answer) == "stopped"
    assert "stopped" in answer.locator(".stats").inner_text()
    deadline = time.monotonic() + 10
    while running(smollm2_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(smollm2_url) == 0
    assert answer.locator(".content").inner_text()  # what came before the stop stays
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()


@pytest.mark.slow
def test_markup_in_a_model_answer_is_shown_as_text(
    tiny_server_url: str, page: Any, artifacts: Path
) -> None:
    """The model's own output, held by a regex to a reply full of markup: the page renders
    its Markdown and shows every tag as text, and no script of it runs."""
    reply = (
        "**Bold** and `<b>code</b>` <script>window.pwned = 1</script>\n"
        '```html\n<img src=x onerror="window.pwned = 2">\n```\n'
        "- one [link](javascript:window.pwned=3)"
    )
    open_page(page, tiny_server_url, regex=regex_for(reply))
    answer = ask(page, "Show me some HTML")
    assert wait_done(answer) == "stop"
    content = answer.locator(".content")
    text = content.inner_text()
    assert "<script>window.pwned = 1</script>" in text
    assert '<img src=x onerror="window.pwned = 2">' in text
    assert content.locator("strong").inner_text() == "Bold"
    assert content.locator("p code").inner_text() == "<b>code</b>"
    assert content.locator(".code-block pre code").inner_text().startswith("<img src=x")
    assert content.locator("li").inner_text() == "one [link](javascript:window.pwned=3)"
    for tag in ("script", "img", "b", "a"):
        assert content.locator(tag).count() == 0, tag
    assert page.evaluate("window.pwned") is None
    shot = artifacts / "chat-page-markup.png"
    page.screenshot(path=str(shot))
    print(f"chat page screenshot: {shot}")


@pytest.mark.slow
def test_the_page_asks_for_the_api_key_and_explains_a_429(guarded_server: str, page: Any) -> None:
    assert httpx.get(guarded_server + "/", timeout=30).status_code == 200
    page.goto(guarded_server + "/")
    page.locator("#key-dialog[open]").wait_for()
    page.fill("#key", "nope")
    page.click("#key-submit")
    page.locator("#key-reason", has_text="refused").wait_for()
    page.fill("#key", "sesame")
    page.click("#key-submit")
    page.locator("#model option").first.wait_for(state="attached")
    assert not page.locator("#key-dialog").is_visible()
    page.fill("#max_tokens", "4")
    # Two other clients keep the one sequence the server runs busy, so the page gets a 429.
    headers = {"Authorization": "Bearer sesame"}
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 900}
    body["ignore_eos"] = True
    done = threading.Event()

    def hold() -> None:
        while not done.is_set():
            httpx.post(guarded_server + CHAT, json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(2) as pool:
        holders = [pool.submit(hold) for _ in range(2)]
        try:
            error = page.locator(".message.error")
            for _ in range(10):  # each try lands while one of them runs, but for a rare gap
                page.click("#new-chat")
                ask(page, "Are you there?")
                page.locator(".message.error, .message.assistant[data-done]").first.wait_for()
                if error.count():
                    break
        finally:
            done.set()
        for holder in holders:
            holder.result()
    assert "The server is busy (429)" in error.inner_text()
    assert page.input_value("#prompt") == "Are you there?"  # kept, to send again
    page.click("#send")
    answer = page.locator(".message.assistant").last
    assert wait_done(answer) in ("stop", "cut at max tokens")
    assert answer.locator(".content").inner_text()
