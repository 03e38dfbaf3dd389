"""The chat page (GET / of ``m2r2 serve``) in a real headless Chromium, against the real server in a subprocess.

Driver: Playwright's Python package, launching the system Chromium (Debian's ``chromium``) through
``executable_path`` -- never ``playwright install``, which downloads browsers from a CDN. Playwright rather than
raw Chrome DevTools Protocol because it does what a hand-written CDP client would have to get right itself:
it starts and tears down the browser (temp profile, pipe transport instead of a debugging port that can clash
or leak), waits for navigation and selectors without sleeps, types with real key events, delivers console
messages and uncaught page errors as events, and keeps up with CDP changes across Chromium releases. Its only
cost is one pip package (in the ``test`` extra); it is checked here against Chromium 150.

Checked: a prompt typed into the textarea and sent with Enter streams into the assistant bubble (its text is
seen growing at least twice before ``data-state`` becomes "done"), the final text equals the server's
non-streamed answer to the same request (greedy: temperature 0 is the page's default), the tokens/s stats line
is shown, and the page logs no JavaScript error. With ``--api-key`` and the key field empty, the bubble shows
the server's error (class "err"), and after entering the key the next message gets a normal answer.

Skips (never fails) when Chromium or Playwright is missing: ``apt-get install chromium``, ``pip install
playwright`` (or ``pip install -e ".[test]"``); ``M2R2_CHROMIUM`` names another Chromium/Chrome binary."""

import os
import shutil

import pytest
from conftest import ServerProcess

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
PROMPT = "Write one sentence about the sea."
FOLLOW_UP = "Now one about the sky."


def _chromium() -> str | None:
    for name in (os.environ.get("M2R2_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and (path := shutil.which(name)):
            return path
    return None


class Server(ServerProcess):
    def reference(self, messages: str | list[dict], key: str | None = None) -> str:
        """The server's non-streamed answer to the conversation the page sends (a str: one user message)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(self.url + "/v1/chat/completions", headers=headers, timeout=120,
                       json={"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed: apt-get install chromium (or set M2R2_CHROMIUM to a Chromium binary)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip('playwright not installed: pip install playwright (or pip install -e ".[test]"); '
                    "do not run `playwright install`, the system chromium is used")
    with sync_playwright() as p:
        try:
            # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
            b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        except Exception as e:  # a broken or incompatible install is an environment problem, not a page bug
            pytest.skip(f"cannot launch {exe} with playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


class Page:
    """One tab on the chat page; records console errors, uncaught exceptions and every text the newest
    assistant bubble shows (a MutationObserver, so no state between two polls is missed)."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.error: {m.text} ({m.location.get('url')})")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url + "/", wait_until="load")
        self.page.evaluate("""() => {
            window.__texts = [];
            new MutationObserver(() => {
                const a = document.querySelectorAll("#log .msg.assistant");
                if (!a.length) return;
                const t = a[a.length - 1].textContent, s = window.__texts;
                if (s[s.length - 1] !== t) s.push(t);
            }).observe(document.getElementById("log"), {childList: true, characterData: true, subtree: true});
        }""")

    def wait_done(self, n: int):
        """Waits until the n-th assistant bubble (from 0) exists and is done; returns it and the texts it showed."""
        self.page.wait_for_function(f"""() => {{
            const b = document.querySelectorAll("#log .msg.assistant")[{n}];
            return b && b.dataset.state === "done";
        }}""", timeout=60_000)
        return self.page.locator("#log .msg.assistant").nth(n), self.page.evaluate("() => window.__texts")

    def send(self, prompt: str, *, key: str | None = None):
        """Types ``prompt`` (and the API key, when given), presses Enter, waits for the new bubble to be done.
        Returns the bubble's locator and the texts it showed on the way."""
        p = self.page
        n = p.locator("#log .msg.assistant").count()
        if key is not None:
            p.fill("#key", key)
        p.fill("#max", str(MAX_TOKENS))
        p.evaluate("() => { window.__texts = []; }")
        p.fill("#prompt", prompt)
        p.press("#prompt", "Enter")
        return self.wait_done(n)

    def close(self):
        self.page.close()


def _streamed(texts: list[str], final: str) -> list[str]:
    """The non-empty texts the bubble showed before its final one, each a prefix of the next."""
    grown = [t for t in texts if t]
    for a, b in zip(grown, grown[1:]):
        assert b.startswith(a), f"the bubble's text did not grow by appending: {a!r} -> {b!r}"
    assert grown and grown[-1] == final, (grown, final)
    return grown[:-1]


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def test_chat_page_streams_the_servers_answer(browser, server):
    want = server.reference(PROMPT)
    assert want.strip()
    page = Page(browser, server.url)
    try:
        p = page.page
        assert p.title() == "m2r2 chat"
        assert p.input_value("#temp") == "0"  # the page's default is greedy, like the reference request
        bubble, texts = page.send(PROMPT)
        final = bubble.text_content()
        assert "err" not in (bubble.get_attribute("class") or "").split(), final
        assert final.strip() and final == want
        partial = _streamed(texts, final)
        assert len(partial) >= 2, f"the bubble did not grow at least twice before done: {texts!r}"
        assert p.locator("#log .msg.user").last.text_content() == PROMPT
        assert p.input_value("#prompt") == ""  # sent and cleared
        stats = p.locator("#log .stats").last.text_content()
        assert "tokens/s" in stats and stats.split()[0].isdigit() and int(stats.split()[0]) > 0, stats
        assert "tokens/s" in p.text_content("#speed")
        assert page.errors == []

        # a second turn carries the first in its history; a message submitted while the reply streams is
        # refused (the Send button is disabled and the text stays in the box), not sent out of turn
        conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": final},
                        {"role": "user", "content": FOLLOW_UP}]
        want2 = server.reference(conversation)
        p.evaluate("""(texts) => {
            window.__texts = [];
            const box = document.getElementById("prompt"), form = document.getElementById("form");
            box.value = texts[0]; form.requestSubmit();
            box.value = texts[1]; form.requestSubmit();
        }""", [FOLLOW_UP, "out of turn"])
        assert p.is_disabled("#send")
        bubble2, texts2 = page.wait_done(1)
        assert bubble2.text_content() == want2 and want2.strip()
        assert _streamed(texts2, want2)
        assert p.locator("#log .msg.assistant").count() == 2
        assert p.input_value("#prompt") == "out of turn"
        p.wait_for_function("() => !document.getElementById('send').disabled", timeout=5_000)
        assert page.errors == []
    finally:
        page.close()


def test_chat_page_api_key_error_then_key(browser):
    key = "sekrit-key"
    s = Server("--api-key", key)
    try:
        page = Page(browser, s.url)
        try:
            p = page.page
            bubble, _ = page.send(PROMPT)  # key field left empty
            assert "err" in (bubble.get_attribute("class") or "").split()
            assert "API key" in bubble.text_content(), bubble.text_content()
            # the only error logged is the browser's note on the 401 response itself
            assert all("401" in e for e in page.errors), page.errors
            page.errors.clear()

            want = s.reference(PROMPT, key)
            bubble, texts = page.send(PROMPT, key=key)
            final = bubble.text_content()
            assert "err" not in (bubble.get_attribute("class") or "").split(), final
            # the failed turn left no trace in the conversation: the reference is the prompt as first message
            assert final.strip() and final == want
            assert len(_streamed(texts, final)) >= 2, texts
            assert "tokens/s" in p.locator("#log .stats").last.text_content()
            assert page.errors == []
        finally:
            page.close()
    finally:
        s.stop()
