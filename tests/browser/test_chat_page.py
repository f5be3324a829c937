"""The chat page at `/` of `xgen serve`, in headless Debian Chromium driven by Playwright.

Each test starts the release binary on the tiny fixture model on a free loopback port. Run by
`tests/run` after the cargo tests (it builds the binary and the virtual environment).
"""
import json
import os
import time
import urllib.request

import pytest
from conftest import start_xgen
from playwright.sync_api import sync_playwright, expect

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("XGEN_SCREENSHOTS")


def metric(base, name):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    return float(next(l.split()[1] for l in text.splitlines() if l.startswith(name + " ")))


@pytest.fixture
def server(request):
    proc, base = start_xgen(*getattr(request, "param", []))
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def open_page(browser, base, width=1280, height=800):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(base + "/")
    return page


def set_max_tokens(page, n):
    """Opens the settings and sets the reply length (stored as on a user's change)."""
    page.click("#toggle-settings")
    page.fill("#max_tokens", str(n))
    page.dispatch_event("#max_tokens", "change")


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_a_message_streams_a_reply_with_its_numbers(browser, server):
    page = open_page(browser, server)
    page.click("#toggle-settings")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    page.dispatch_event("#max_tokens", "change")
    send(page, "Hello there")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".stats")).to_contain_text("tokens", timeout=30000)
    assert reply.locator(".text").inner_text().strip(), "a streamed reply"
    stats = reply.locator(".stats").inner_text()
    assert stats.startswith("24 tokens") and "tok/s" in stats and "first token" in stats, stats
    # Shift+Enter breaks the line instead of sending.
    page.fill("#input", "a")
    page.press("#input", "Shift+Enter")
    assert page.locator(".msg.user").count() == 1
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, "desktop.png"))
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=os.path.join(SHOTS, "phone.png"))


def test_stop_aborts_the_stream_and_frees_the_slot(browser, server):
    page = open_page(browser, server)
    set_max_tokens(page, 4000)
    send(page, "Tell me a long story")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".text")).not_to_be_empty(timeout=30000)
    page.click("#stop")
    expect(reply.locator(".stats")).to_contain_text("stopped", timeout=10000)
    deadline = time.time() + 10
    while metric(server, "xgen_running_sequences") > 0:
        assert time.time() < deadline, "the server kept the stopped stream"
        time.sleep(0.1)


def test_the_conversation_survives_a_reload_and_new_clears_it(browser, server):
    page = open_page(browser, server)
    set_max_tokens(page, 8)
    send(page, "Remember me")
    expect(page.locator(".msg.assistant .stats")).to_contain_text("tokens", timeout=30000)
    page.reload()
    assert page.locator(".msg.user .text").inner_text() == "Remember me"
    assert page.locator(".msg.assistant").count() == 1
    assert page.input_value("#max_tokens") == "8", "settings kept too"
    page.click("#new")
    assert page.locator(".msg").count() == 0
    page.reload()
    assert page.locator(".msg").count() == 0


def test_model_output_is_text_never_html(browser, server):
    page = open_page(browser, server)
    evil = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"><b>bold</b>\n```py\nprint('<b>')\n```"
    chunks = [{"choices": [{"index": 0, "delta": {"content": evil[i:i + 7]}, "finish_reason": None}]}
              for i in range(0, len(evil), 7)]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=body))
    send(page, "Say something dangerous")
    reply = page.locator(".msg.assistant").last
    expect(reply.locator(".stats")).to_contain_text("tokens", timeout=10000)
    assert page.evaluate("window.pwned") is None
    assert reply.locator("script, img, b").count() == 0
    assert "<script>window.pwned = 1</script>" in reply.locator(".text").inner_text()
    code = reply.locator("pre code")
    assert code.inner_text() == "print('<b>')\n"
    assert reply.locator("pre button.copy").count() == 1


@pytest.mark.parametrize("server", [["--api-key", "sesame"]], indirect=True)
def test_an_api_key_is_asked_once_and_sent(browser, server):
    page = open_page(browser, server)
    set_max_tokens(page, 6)
    # Refused without the key: the prompt is dismissed.
    page.once("dialog", lambda d: d.dismiss())
    send(page, "hi")
    expect(page.locator(".msg.assistant.error")).to_contain_text("Error", timeout=10000)
    # With it: asked once, then remembered.
    page.click("#new")
    page.once("dialog", lambda d: d.accept("sesame"))
    send(page, "hi")
    expect(page.locator(".msg.assistant .stats").last).to_contain_text("6 tokens", timeout=30000)
    send(page, "again")
    expect(page.locator(".msg.assistant .stats").nth(1)).to_contain_text("6 tokens", timeout=30000)
    assert page.locator(".msg.error").count() == 0


def test_raw_mode_continues_the_text_through_completions(browser, server):
    page = open_page(browser, server)
    seen = []
    page.on("request", lambda r: seen.append(r.url))
    page.click("#toggle-settings")
    page.select_option("#mode", "raw")
    page.fill("#max_tokens", "5")
    page.dispatch_event("#max_tokens", "change")
    send(page, "Once upon a time")
    expect(page.locator(".msg.assistant .stats")).to_contain_text("5 tokens", timeout=30000)
    assert any(u.endswith("/v1/completions") for u in seen), seen
    page.reload()
    assert page.input_value("#mode") == "raw"


@pytest.mark.parametrize("server", [["--prefill-chunk", "16"]], indirect=True)
def test_a_long_prompt_shows_how_far_it_has_been_read(browser, server):
    page = open_page(browser, server)
    set_max_tokens(page, 4)
    # Every text the answer's stats line shows, in order (a chunk may replace the last at once).
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver((records) => {
            for (const r of records) for (const n of r.addedNodes) window.seen.push(n.textContent);
        }).observe(document.getElementById("messages"), { subtree: true, childList: true });
    }""")
    send(page, "word " * 600)
    expect(page.locator(".msg.assistant .stats")).to_contain_text("4 tokens", timeout=60000)
    shown = [s for s in page.evaluate("window.seen") if s.startswith("reading the prompt")]
    read = [int(s.split()[3]) for s in shown]
    total = int(shown[0].split()[5])
    assert total > 600 and len(read) >= total // 16 - 1, shown[:3]
    assert read == sorted(read) and read[-1] == total, read
