"""The playground in headless Chromium (Playwright) against a live stella."""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.fakes.openai import REASONING, FakeOpenAI
from tests.fakes.server import serve
from tests.live import ROOT, LiveServer, in_ci, install_plugin, merge, run_stella

pytestmark = pytest.mark.browser
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "sk-browser-test-1"
CONFIG = {
    "backends": {
        "slow": {"kind": "echo", "delay_s": 0.08},
        "brisk": {"kind": "echo", "delay_s": 0.002},  # some hundreds of tokens a second
        "broken": {"kind": "echo", "fail_after": 1},
        "mute": {"kind": "echo", "stall_after": 0},  # no first token until stopped
        "lazy": {"kind": "lazy"},
    },
    "models": {
        "routes": {
            "echo-slow": {"backend": "slow"},
            "echo-brisk": {"backend": "brisk"},
            "echo-broken": {"backend": "broken"},
            "echo-mute": {"backend": "mute", "retries": 0},
            "echo-limited": {"backend": "echo"},
            "lazy": {"backend": "lazy"},
        }
    },
    "limits": {"models": {"echo-limited": {"requests_per_minute": 1}}},
}
# A backend whose model is not loaded until its first call, as the in-process engine's.
LAZY_PLUGIN = """
from stella.backends.echo import EchoBackend


class LazyBackend(EchoBackend):
    kind = "lazy"

    def loaded(self, upstream_model):
        return self.started > 0
"""
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # The system's Chromium (Debian's package); else the build `playwright install chromium`
        # fetched, as .ci/run does where apt has no chromium (Ubuntu: a snap stub).
        if Path(CHROMIUM).exists():
            path: str | None = CHROMIUM
        elif Path(p.chromium.executable_path).exists():
            path = None
        elif in_ci():
            pytest.fail("no chromium: apt-get install chromium, or playwright install chromium")
        else:
            pytest.skip("chromium is not installed")
        b = p.chromium.launch(executable_path=path, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = install_plugin(
        tmp_path_factory.mktemp("plugin"), "stella_lazy", LAZY_PLUGIN, {"lazy": "LazyBackend"}
    )
    with serve(FakeOpenAI(words=8).app) as upstream:
        # An upstream that answers 429 with Retry-After: 30 (stella's error line says so).
        limited = {
            "backends": {"up-429": {"kind": "openai", "base_url": upstream + "/v1"}},
            "models": {
                "routes": {
                    "up-429": {
                        "backend": "up-429",
                        "upstream_model": "status-429-30",
                        "retries": 0,
                    }
                }
            },
        }
        # A reasoning model's upstream: its thinking streamed before the answer, or alone.
        thinkers = {
            "backends": {"thinker": {"kind": "openai", "base_url": upstream + "/v1"}},
            "models": {
                "routes": {
                    "thinks": {"backend": "thinker", "upstream_model": "thinks-apart"},
                    "thinks-only": {"backend": "thinker", "upstream_model": "thinks-only"},
                }
            },
        }
        with run_stella(merge(merge(CONFIG, limited), thinkers), env=env) as s:
            yield s


def playground(browser, url: str, model: str, **page_options: object):  # type: ignore[no-untyped-def]
    """A page on the playground, its model list loaded and `model` chosen."""
    page = browser.new_page(**page_options)
    page.goto(url + "/playground")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    page.select_option("#model", model)
    return page


def send(page, text: str) -> None:  # type: ignore[no-untyped-def]
    page.fill("#prompt", text)
    page.click("#send")


# wait_for_function() predicates here are functions ("() => ..."): Playwright polls a bare
# expression with eval(), which the playground's Content-Security-Policy forbids.


def answer_has(page, text: str) -> None:  # type: ignore[no-untyped-def]
    """Wait until the first answer's text holds `text`."""
    page.wait_for_function(
        "t => document.querySelector('.msg.assistant .text').textContent.includes(t)", arg=text
    )


@pytest.fixture(scope="module")
def keyed() -> Iterator[LiveServer]:
    with run_stella(env={"STELLA_API_KEYS": KEY}) as s:
        yield s


def keyed_playground(browser, url: str):  # type: ignore[no-untyped-def]
    """A page on a keyed server's playground with its key saved and the echo model chosen."""
    page = browser.new_page()
    page.goto(url + "/playground")
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    page.select_option("#model", "echo")
    return page


def test_prompt_streams_into_the_page(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo-slow", viewport={"width": 1200, "height": 800})
    send(page, "the quick brown fox jumps over the lazy dog")
    # While it streams, part of the text is already there.
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant .text').textContent.length > 3"
    )
    partial = page.inner_text(".msg.assistant .text")
    assert partial and partial != "the quick brown fox jumps over the lazy dog"
    page.wait_for_selector(".msg.assistant .stats")
    assert page.inner_text(".msg.assistant .text") == "the quick brown fox jumps over the lazy dog"
    stats = page.inner_text(".msg.assistant .stats")
    assert "TTFT" in stats and "tok/s" in stats and "9 out" in stats
    assert "via slow" in stats  # the backend that answered, from the done line
    send(page, "second turn")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .stats').length == 2")
    assert page.locator(".msg.assistant .text").nth(1).inner_text() == "second turn"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    page.close()


def test_stop_cancels_on_the_server(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo-slow")
    with page.expect_response(lambda r: "/api/v1/chat" in r.url) as info:
        send(page, " ".join(f"word{i}" for i in range(200)))
    rid = info.value.headers["x-request-id"]
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant .text').textContent.length > 10"
    )
    page.click("#stop")
    page.wait_for_selector("text=stopped")
    ev = server.wait_event(lambda e: e["request_id"] == rid)
    assert ev["finish_reason"] == "client_closed"
    assert ev["completion_tokens"] < 150
    page.close()


def test_model_output_is_text_never_html(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo")
    payload = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    send(page, payload)
    page.wait_for_selector(".msg.assistant .stats")
    assert page.inner_text(".msg.assistant .text") == payload
    assert page.evaluate("window.__xss") is None
    assert page.locator(".msg img").count() == 0
    page.close()


def test_401_asks_for_the_key_and_then_works(browser) -> None:  # type: ignore[no-untyped-def]
    with run_stella(env={"STELLA_API_KEYS": KEY}) as keyed:
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
        page.goto(keyed.url + "/playground")
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#api-key", KEY)
        page.click("#key-form button")
        page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
        page.select_option("#model", "echo")
        send(page, "hello with a key")
        page.wait_for_selector(".msg.assistant .stats")
        assert page.inner_text(".msg.assistant .text") == "hello with a key"
        assert page.evaluate("localStorage.getItem('stella.apiKey')") == KEY
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
        page.close()


def test_root_sends_browsers_to_the_playground(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.goto(server.url + "/")
    assert page.url.endswith("/playground")
    page.close()


def test_new_chat_mid_answer_and_a_failed_turn(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo-slow")
    sent: list[dict] = []
    page.on("request", lambda r: "/api/v1/chat" in r.url and sent.append(r.post_data_json))
    send(page, " ".join(f"old{i}" for i in range(100)))
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant .text').textContent.length > 5"
    )
    page.click("#new-chat")  # stops the answer: it is no part of the new chat
    page.wait_for_function("() => !document.querySelector('#send').disabled")
    assert page.evaluate("document.activeElement.id") == "prompt"  # for the new chat
    page.select_option("#model", "echo")
    send(page, "fresh start")
    page.wait_for_selector(".msg.assistant .stats")
    assert sent[-1]["messages"] == [{"role": "user", "content": "fresh start"}]
    # Text goes as typed (indented code keeps its indentation); a failed turn puts it
    # back in the prompt, to send again.
    page.select_option("#model", "echo-broken")
    send(page, "    indented code\n        more")
    page.wait_for_selector(".msg .error")
    assert sent[-1]["messages"][-1]["content"] == "    indented code\n        more"
    assert page.input_value("#prompt") == "    indented code\n        more"
    page.close()


def test_enter_while_composing_does_not_send_and_escape_stops(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo-slow")
    # Many words: the answer must still be streaming when Escape comes (one word at the
    # slow route's pace could end first, and nothing would be left to stop).
    text = "かな " + "word " * 40
    page.fill("#prompt", text)
    page.dispatch_event("#prompt", "keydown", {"key": "Enter", "isComposing": True})
    page.wait_for_timeout(200)
    assert page.locator(".msg").count() == 0 and page.input_value("#prompt") == text
    page.press("#prompt", "Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant .text')")
    assert page.evaluate("document.activeElement.id") == "stop"  # the focus stays usable
    page.keyboard.press("Escape")
    page.wait_for_selector("text=stopped")
    page.close()


def test_a_refused_saved_key_is_dropped_and_the_form_says_so(browser) -> None:  # type: ignore[no-untyped-def]
    with run_stella(env={"STELLA_API_KEYS": KEY}) as keyed:
        page = browser.new_page()
        page.goto(keyed.url + "/playground")
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#api-key", "wrong-key-xxxxxxxx")
        page.click("#key-form button")
        page.wait_for_selector("text=The saved key was refused")
        assert page.evaluate("localStorage.getItem('stella.apiKey')") is None
        assert page.evaluate("document.activeElement.id") == "api-key"
        page.close()


def test_stop_before_the_first_token_keeps_no_empty_answer(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # An empty assistant turn would go out with every later one (and Anthropic's API
    # refuses a chat holding one): the stopped question is left out and comes back.
    page = playground(browser, server.url, "echo-mute")
    sent: list[dict] = []
    page.on("request", lambda r: "/api/v1/chat" in r.url and sent.append(r.post_data_json))
    with page.expect_response(lambda r: "/api/v1/chat" in r.url):
        send(page, "are you there?")
    page.click("#stop")
    page.wait_for_selector("text=stopped")
    assert "your message is back in the prompt" in page.inner_text(".msg.assistant .stats")
    assert page.input_value("#prompt") == "are you there?"
    page.select_option("#model", "echo")
    send(page, "hello again")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .stats').length == 2")
    assert sent[-1]["messages"] == [{"role": "user", "content": "hello again"}]
    page.close()


def test_a_held_enter_does_not_stop_the_answer_it_sent(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # Sending moves the focus to Stop; the key's auto-repeat must not press it.
    page = playground(browser, server.url, "echo-slow")
    text = " ".join(f"w{i}" for i in range(20))
    page.fill("#prompt", text)
    page.focus("#prompt")
    page.keyboard.down("Enter")
    page.wait_for_timeout(500)
    assert page.evaluate("document.activeElement.id") == "stop"
    page.keyboard.down("Enter")  # a repeat, as a held key sends
    page.keyboard.up("Enter")
    page.wait_for_selector(".msg.assistant .stats")
    assert page.inner_text(".msg.assistant .text") == text
    assert "stopped" not in page.inner_text(".msg.assistant .stats")
    page.close()


def test_another_sites_page_cannot_drive_a_keyless_server(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # Without keys a loopback caller is an admin; a page on another origin sends
    # requests that need no preflight (no-cors) through the user's browser.
    attack = f"""<script>
    const S = {server.url!r};
    window.done = Promise.allSettled([
      fetch(S + "/api/v1/models/switch/echo-slow", {{method: "POST", mode: "no-cors"}}),
      fetch(S + "/api/v1/models", {{method: "POST", mode: "no-cors",
        body: JSON.stringify({{name: "planted", backend: "echo", aliases: ["gpt-4o"]}})}}),
    ]).then(() => "sent");
    </script>"""
    site = Starlette(routes=[Route("/", lambda r: HTMLResponse(attack))])
    with serve(site, health="/") as other:
        page = browser.new_page()
        page.goto(other.replace("127.0.0.1", "localhost") + "/")
        assert page.evaluate("window.done") == "sent"
        page.close()
    listing = httpx.get(server.url + "/api/v1/models").json()
    assert listing["default"] == "echo"
    assert "planted" not in [m["name"] for m in listing["models"]]


def test_a_key_a_header_cannot_carry_is_refused_or_cleaned(browser, keyed: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.goto(keyed.url + "/playground")
    page.wait_for_selector("#key-form:not([hidden])")
    # A character inside the key: refused, in the form, and nothing is saved.
    page.fill("#api-key", "sk-browser\u2011test-1")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("text=U+2011")
    assert page.evaluate("localStorage.getItem('stella.apiKey')") is None
    assert page.evaluate("document.activeElement.id") == "api-key"
    # Whitespace and zero-width characters around it (a paste's) are dropped.
    page.fill("#api-key", f" {KEY}\u200b\ufeff\t")
    page.click("#key-form button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    assert page.evaluate("localStorage.getItem('stella.apiKey')") == KEY
    page.close()
    # Saved before the check: the client says what is wrong, and the key is dropped.
    page = browser.new_page()
    page.add_init_script("localStorage.setItem('stella.apiKey', 'sk-x\\u200b')")
    page.goto(keyed.url + "/playground")
    page.wait_for_selector("text=The saved key was refused")
    assert "network_error" not in page.inner_text("body")
    assert "U+200B" in page.inner_text("#key-form")
    assert page.evaluate("localStorage.getItem('stella.apiKey')") is None
    page.close()


def test_a_key_refused_on_send_is_dropped(browser, keyed: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = keyed_playground(browser, keyed.url)
    # The key is revoked meanwhile (another one stands for it here).
    page.evaluate("localStorage.setItem('stella.apiKey', 'sk-revoked-xxxxxxxx')")
    send(page, "hello")
    page.wait_for_selector(".msg .error")
    page.wait_for_selector("text=The saved key was refused")
    assert page.evaluate("localStorage.getItem('stella.apiKey')") is None
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.close()


def test_the_focus_goes_back_to_the_prompt(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo")
    page.click("#key-button")  # the key form is open, and a message is sent all the same
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant .stats")
    assert page.evaluate("document.activeElement.id") == "prompt"
    # The form closes without saving: Cancel, or Esc in it.
    page.click("#key-button")
    page.fill("#api-key", "half-typed")
    page.click("#key-cancel")
    assert page.locator("#key-form").is_hidden()
    assert page.evaluate("document.activeElement.id") == "prompt"
    assert page.evaluate("localStorage.getItem('stella.apiKey')") is None
    page.click("#key-button")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.press("Escape")
    assert page.locator("#key-form").is_hidden()
    assert page.evaluate("document.activeElement.id") == "prompt"
    assert page.input_value("#api-key") == ""
    page.close()


def test_an_answer_ending_leaves_a_focus_elsewhere(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # Only a focus Stop held (it is disabled now) goes back to the prompt: a system prompt
    # being typed keeps it, and its text does not continue in the message box.
    page = playground(browser, server.url, "echo-slow")
    send(page, " ".join(f"w{i}" for i in range(15)))
    page.wait_for_function("() => document.querySelector('.msg.assistant .text').textContent")
    page.click("#system-box summary")
    page.click("#system")
    page.keyboard.type("You are a pir")
    assert page.evaluate("document.querySelector('#stop').disabled") is False  # still answering
    page.wait_for_selector(".msg.assistant .stats")
    page.keyboard.type("ate.")
    assert page.evaluate("document.activeElement.id") == "system"
    assert page.input_value("#system") == "You are a pirate."
    assert page.input_value("#prompt") == ""
    page.close()


def test_saving_a_key_keeps_the_chosen_model(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo-slow")
    page.eval_on_selector_all("#model option", "els => els.forEach(o => { o.dataset.old = 1; })")
    page.click("#key-button")
    page.press("#api-key", "Enter")  # an empty key: none is sent
    page.wait_for_function("() => !document.querySelector('#model option[data-old]')")
    assert page.input_value("#model") == "echo-slow"  # the listing again, and the choice kept
    page.close()


def test_a_key_allowed_no_models_is_told_so(browser) -> None:  # type: ignore[no-untyped-def]
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    with run_stella({"auth": {"keys": {"none": {"sha256": digest, "models": []}}}}) as s:
        page = browser.new_page()
        page.goto(s.url + "/playground")
        page.wait_for_selector("#key-form:not([hidden])")
        page.fill("#api-key", KEY)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#notice:not([hidden])")
        assert "no models" in page.inner_text("#notice")
        assert page.locator("#model option").count() == 0
        page.close()


def test_a_saved_key_leaves_the_focus_on_the_prompt(browser, keyed: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = keyed_playground(browser, keyed.url)
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.close()


# The answer's end is in view, and the view had to scroll for it.
AT_THE_END = """() => ((m, a) => m.scrollTop > 100
  && a.getBoundingClientRect().bottom <= m.getBoundingClientRect().bottom + 2
)(document.querySelector('main'), document.querySelector('.msg.assistant'))"""


def test_a_reader_who_scrolled_up_is_left_there(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo-slow", viewport={"width": 800, "height": 400})
    # Lines, for an answer taller than the view, then words that wrap now and then.
    send(page, "".join(f"line{i}\n" for i in range(20)) + " ".join(f"w{i}" for i in range(60)))
    # Taller than the view, and followed while the reader stays at the bottom.
    answer_has(page, "line12")
    page.wait_for_function(AT_THE_END)
    page.mouse.move(400, 200)
    page.mouse.wheel(0, -5000)  # the reader goes back up to read
    page.wait_for_function("() => document.querySelector('main').scrollTop === 0", timeout=5000)
    page.wait_for_timeout(400)  # five deltas
    assert page.evaluate("document.querySelector('main').scrollTop") == 0
    # Back down at the end, the answer is followed again.
    answer_has(page, "w5")
    page.mouse.wheel(0, 20000)
    answer_has(page, "w50")
    page.wait_for_function(AT_THE_END, timeout=2000)
    page.close()


def test_the_chat_scrolls_from_beside_its_column(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # On a wide window the margins beside the centred column scroll the chat too.
    page = playground(browser, server.url, "echo", viewport={"width": 1400, "height": 600})
    send(page, "".join(f"line {i}\n" for i in range(60)))
    page.wait_for_selector(".msg.assistant .stats")
    page.wait_for_function(AT_THE_END)
    top = page.evaluate("document.querySelector('main').scrollTop")
    page.mouse.move(60, 300)  # left of the column
    page.mouse.wheel(0, -400)
    page.wait_for_function(
        "t => document.querySelector('main').scrollTop < t", arg=top, timeout=5000
    )
    column = page.eval_on_selector("#conversation", "el => el.getBoundingClientRect().width")
    assert column <= 900
    page.close()
    for width in (360, 320):  # and a phone's window scrolls no way but down
        page = playground(browser, server.url, "echo", viewport={"width": width, "height": 640})
        send(page, "a message " * 30)
        page.wait_for_selector(".msg.assistant .stats")
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        assert page.evaluate("document.querySelector('main').scrollWidth") <= width
        page.close()


# WCAG 2 contrast ratio of an element's text colour on its own background colour.
CONTRAST = """el => {
  const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = (c) => {
    const [r, g, b] = rgb(c).map((v) => {
      v /= 255;
      return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const s = getComputedStyle(el);
  const [a, b] = [lum(s.color), lum(s.backgroundColor)].sort((x, y) => y - x);
  return (a + 0.05) / (b + 0.05);
}"""


def test_stop_is_readable(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo-slow")
    send(page, " ".join(f"w{i}" for i in range(50)))
    page.wait_for_function("() => !document.querySelector('#stop').disabled")
    assert page.eval_on_selector("#stop", CONTRAST) >= 4.5  # WCAG AA for its text
    page.click("#stop")
    page.close()


def test_a_streaming_answer_is_busy_for_screen_readers(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # The conversation is a live region: busy while an answer streams, so a screen
    # reader reads it once, whole, not a word at a time.
    page = playground(browser, server.url, "echo-slow")
    send(page, "one two three four five six")
    page.wait_for_function(
        "() => document.querySelector('.msg.assistant .text').textContent.length > 3"
    )
    assert page.get_attribute(".msg.assistant", "aria-busy") == "true"
    assert page.get_attribute("#conversation", "aria-busy") == "true"
    page.wait_for_selector(".msg.assistant .stats")
    assert page.get_attribute(".msg.assistant", "aria-busy") == "false"
    assert page.get_attribute("#conversation", "aria-busy") == "false"
    page.close()


def test_right_to_left_text_reads_right_to_left(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo")
    arabic = "مرحبا بالعالم"
    page.fill("#prompt", arabic)
    assert page.eval_on_selector("#prompt", "el => getComputedStyle(el).direction") == "rtl"
    page.click("#send")
    page.wait_for_selector(".msg.assistant .stats")
    for sel in (".msg.user .text", ".msg.assistant .text"):
        assert page.eval_on_selector(sel, "el => getComputedStyle(el).direction") == "rtl", sel
    send(page, "hello")  # and English still left to right
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .stats').length == 2")
    last = page.locator(".msg.assistant .text").nth(1)
    assert last.evaluate("el => getComputedStyle(el).direction") == "ltr"
    page.close()


def test_no_request_fails_and_the_page_works_under_its_csp(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    errors: list[str] = []
    failed: list[str] = []
    page.on("console", lambda m: m.type in ("error", "warning") and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    page.on("requestfailed", lambda r: failed.append(f"failed {r.url}"))
    response = page.goto(server.url + "/playground")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    page.select_option("#model", "echo")
    send(page, "under a content security policy")
    page.wait_for_selector(".msg.assistant .stats")
    assert page.inner_text(".msg.assistant .text") == "under a content security policy"
    page.wait_for_timeout(300)  # a favicon is fetched after the load
    # Headless Chromium fetches no icon, a headed one does: the page names one that is there.
    icon = page.evaluate("document.querySelector('link[rel=icon]')?.href")
    page.close()
    assert not errors and not failed, (errors, failed)
    assert icon and httpx.get(icon).status_code == 200


def test_the_docs_page_renders_under_its_csp(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # Its inline script and style run by their hashes; nothing else inline would.
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: m.type in ("error", "warning") and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    response = page.goto(server.url + "/docs")
    csp = response.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp and "'unsafe-inline'" not in csp
    page.wait_for_selector("details.op code")
    paths = page.eval_on_selector_all("details.op code", "els => els.map(e => e.textContent)")
    colour = page.eval_on_selector("summary .m", "el => getComputedStyle(el).color")
    blocked = page.evaluate(
        """() => new Promise(done => {
            document.addEventListener('securitypolicyviolation', () => done(true));
            const s = document.createElement('script');
            s.textContent = 'window.ran = true';
            document.body.append(s);
            setTimeout(() => done(false), 500);
        })"""
    )
    ran = page.evaluate("window.ran === true")
    page.close()
    assert "/api/v1/chat" in paths
    assert colour == "rgb(255, 255, 255)"  # the page's own style applies
    assert blocked and not ran  # an injected inline script does not
    assert [e for e in errors if "Content Security Policy" not in e] == []


def test_the_docs_page_fits_a_phone(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 360, "height": 640})
    page.goto(server.url + "/docs")
    page.wait_for_selector("details.op code")
    page.eval_on_selector_all("details.op", "els => els.forEach(d => { d.open = true; })")
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.close()


def test_native_controls_are_drawn_dark(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # The page is dark only: the browser's own parts (scrollbars, the model list's popup)
    # are drawn dark too, not light on a dark page.
    page = playground(browser, server.url, "echo")
    scheme = page.evaluate("getComputedStyle(document.documentElement).colorScheme")
    assert scheme == "dark"
    page.close()


def test_the_key_form_keeps_its_own_words(browser, keyed: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # A message sent with no key: the form asks for one in the reader's words, not in the
    # server's (which tell a developer which header to send).
    page = browser.new_page()
    page.goto(keyed.url + "/playground")
    page.wait_for_selector("#key-form:not([hidden])")
    page.click("#key-cancel")
    send(page, "hello")
    page.wait_for_selector(".msg .error")
    page.wait_for_selector("#key-form:not([hidden])")
    assert page.inner_text("#key-form label") == "This server needs an API key."
    page.close()


def error_after(page, model: str, text: str = "hello") -> str:  # type: ignore[no-untyped-def]
    """The error line of the answer to `text` sent to `model` (a turn of its own)."""
    count = page.locator(".msg .error").count()
    page.select_option("#model", model)
    send(page, text)
    page.wait_for_function("n => document.querySelectorAll('.msg .error').length > n", arg=count)
    return str(page.locator(".msg .error").nth(count).inner_text())


def test_an_error_says_when_to_try_again(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo")
    # An upstream's rate limit comes in the stream (HTTP 200), its wait in the error line.
    text = error_after(page, "up-429")
    assert text.startswith("upstream_rate_limited: ") and text.endswith(" Try again in 30 s."), text
    # stella's own 429 keeps its message, which names the limit hit.
    hello = {"role": "user", "content": "hello"}
    body = {"model": "echo-limited", "messages": [hello], "stream": False}
    assert httpx.post(server.url + "/api/v1/chat", json=body).status_code == 200  # the minute's one
    text = error_after(page, "echo-limited")
    assert text.startswith(
        "Rate limited: rate limit of 1 request per minute reached for model echo-limited."
    ), text
    assert "Try again in " in text and " s." in text, text
    # A 429 from something in front of stella (a proxy) with no Retry-After, or one whose
    # date is past, says no wait at all.
    refusal = {"error": {"code": "rate_limited", "message": "slow down"}}
    for retry_after in (None, "Wed, 21 Oct 2015 07:28:00 GMT"):
        headers = {"Retry-After": retry_after} if retry_after else {}
        page.route(
            "**/api/v1/chat",
            lambda route, _, h=headers: route.fulfill(status=429, headers=h, json=refusal),
        )
        assert error_after(page, "echo") == "Rate limited: slow down"
        page.unroute("**/api/v1/chat")
    page.close()


def test_a_lost_server_is_told_in_plain_words(browser) -> None:  # type: ignore[no-untyped-def]
    slow = {
        "backends": {"slow": CONFIG["backends"]["slow"]},
        "models": {"routes": {"echo-slow": {"backend": "slow"}}},
    }
    with run_stella(slow) as s:
        page = playground(browser, s.url, "echo-slow")
        send(page, " ".join(f"w{i}" for i in range(100)))
        answer_has(page, "w3")
        s.stop(signal.SIGKILL)  # gone mid-answer: the stream breaks
        page.wait_for_selector(".msg .error")
        box = page.locator(".msg .error").first
        assert box.inner_text().startswith("Lost the connection to the server — "), box.inner_text()
        raw = box.get_attribute("title")
        assert raw and raw in box.inner_text()  # fetch's own words are kept
        # Sent again: nothing is there to answer.
        page.click("#send")
        page.wait_for_function("() => document.querySelectorAll('.msg .error').length == 2")
        text = page.locator(".msg .error").nth(1).inner_text()
        assert text.startswith("Could not reach the server — "), text
        page.close()


def test_the_model_list_follows_loads_and_removals(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(server.url + "/api/v1/models", json={"name": "doomed", "backend": "echo"})
    assert r.status_code in (200, 201), r.text
    page = playground(browser, server.url, "lazy")
    option = "() => document.querySelector('#model option[value=lazy]').textContent"
    assert page.evaluate(option) == "lazy (not loaded)"
    send(page, "load it")
    page.wait_for_function(f"() => ({option})() === 'lazy'")  # loaded by that call
    assert page.input_value("#model") == "lazy"  # the choice kept
    # A route removed meanwhile: sending to it is refused, and it leaves the list.
    page.select_option("#model", "doomed")
    assert httpx.delete(server.url + "/api/v1/models/doomed").status_code in (200, 204)
    send(page, "anyone there?")
    page.wait_for_selector("text=model_not_found")
    page.wait_for_function("() => !document.querySelector('#model option[value=doomed]')")
    assert page.input_value("#model") == "echo"  # the default, the choice being gone
    page.close()


def test_the_rate_is_rounded_and_left_out_of_a_short_answer(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "echo")
    send(page, "an instant answer of some words")  # a few microseconds of generation
    page.wait_for_selector(".msg.assistant .stats")
    stats = page.inner_text(".msg.assistant .stats")
    assert "tok/s" not in stats and "6 out" in stats, stats

    def rate(n: int) -> str:
        line = page.locator(".msg.assistant .stats").nth(n).inner_text()
        found = re.search(r"(\S+) tok/s", line)
        assert found, line
        return found[1]

    for n, model in enumerate(("echo-slow", "echo-brisk"), start=1):
        page.select_option("#model", model)
        send(page, " ".join(f"w{i}" for i in range(40 if model == "echo-brisk" else 6)))
        page.wait_for_function(
            "n => document.querySelectorAll('.msg.assistant .stats').length > n", arg=n
        )
        # One decimal below 100, whole numbers above.
        figure = rate(n)
        assert (re.fullmatch(r"\d+\.\d", figure) and float(figure) <= 100) or (
            re.fullmatch(r"\d+", figure) and int(figure) >= 100
        ), figure
    assert "." in rate(1)  # echo-slow: about 12 a second
    page.close()


# Each change to the first answer's thinking block, as [open, its text, the answer's text].
WATCH_THINKING = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const box = document.querySelector('.msg.assistant .thinking');
    const text = document.querySelector('.msg.assistant .text');
    if (box) window.seen.push([box.open, box.querySelector('.reasoning').textContent, text.textContent]);
  }).observe($conversation, {subtree: true, childList: true, characterData: true, attributes: true});
}""".replace("$conversation", "document.getElementById('conversation')")


def test_a_models_thinking_streams_above_its_answer_and_is_not_sent_back(
    browser, server: LiveServer
) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "thinks")
    errors: list[str] = []
    page.on("console", lambda m: m.type in ("error", "warning") and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    sent: list[dict] = []
    page.on("request", lambda r: "/api/v1/chat" in r.url and sent.append(r.post_data_json))
    page.evaluate(WATCH_THINKING)
    send(page, "why is the sky blue?")
    page.wait_for_selector(".msg.assistant .stats")
    answer = " w0 w1 w2 w3 w4 w5 w6 w7"  # the fake upstream's, after its thinking
    assert page.text_content(".msg.assistant .text") == answer
    assert page.inner_text(".msg.assistant .thinking summary") == "Thinking"
    assert page.text_content(".msg.assistant .thinking .reasoning") == "".join(REASONING)
    # Above the answer, shown open while it streamed in, before any of the answer came,
    # and closed once the answer began.
    order = "() => [...document.querySelector('.msg.assistant').children].map(e => e.className)"
    assert page.evaluate(order)[:3] == ["role", "thinking", "text"]
    seen = page.evaluate("() => window.seen")
    assert [True, REASONING[0], ""] in seen, seen
    assert [True, "".join(REASONING), ""] in seen, seen
    assert page.eval_on_selector(".msg.assistant .thinking", "b => b.open") is False
    # Told apart from the answer at a glance.
    style = "el => [getComputedStyle(el).color, getComputedStyle(el).fontStyle]"
    thinking = page.eval_on_selector(".msg.assistant .thinking .reasoning", style)
    text = page.eval_on_selector(".msg.assistant .text", style)
    assert thinking[0] != text[0] and thinking[1] == "italic", (thinking, text)
    # A details element: the keyboard opens it again.
    page.focus(".msg.assistant .thinking summary")
    page.keyboard.press("Enter")
    assert page.eval_on_selector(".msg.assistant .thinking", "b => b.open") is True
    assert page.inner_text(".msg.assistant .thinking .reasoning") == "".join(REASONING).strip()
    # The next turn sends the answer, not the thinking.
    page.select_option("#model", "echo")
    send(page, "and at sunset?")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .stats').length == 2")
    assert sent[-1]["messages"] == [
        {"role": "user", "content": "why is the sky blue?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "and at sunset?"},
    ]
    assert page.locator(".thinking").count() == 1  # an answer without thinking has none
    page.close()
    assert not errors, errors  # and the page's CSP held


def test_an_answer_of_thinking_alone_is_shown_and_said_so(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    page = playground(browser, server.url, "thinks-only")
    sent: list[dict] = []
    page.on("request", lambda r: "/api/v1/chat" in r.url and sent.append(r.post_data_json))
    send(page, "think it over")
    page.wait_for_selector(".msg.assistant .stats")
    page.wait_for_function("() => !document.querySelector('#send').disabled")  # the turn ended
    # The thinking stays open (no answer began), and the line says there was no answer.
    assert page.eval_on_selector(".msg.assistant .thinking", "b => b.open") is True
    assert page.inner_text(".msg.assistant .thinking .reasoning") == "".join(REASONING).strip()
    assert page.text_content(".msg.assistant .text") == ""
    stats = "\n".join(page.locator(".msg.assistant .stats").all_inner_texts())
    assert "no answer after its thinking: your message is back in the prompt" in stats, stats
    assert "length" in stats, stats
    # As a turn with no answer: the question back in the prompt, and out of the chat.
    assert page.input_value("#prompt") == "think it over"
    page.select_option("#model", "echo")
    send(page, "hello again")
    page.wait_for_selector(".msg.assistant:nth-of-type(4) .stats")
    assert sent[-1]["messages"] == [{"role": "user", "content": "hello again"}]
    page.close()


def test_stella_js_embeds_from_a_page(browser, server: LiveServer) -> None:  # type: ignore[no-untyped-def]
    # A page's script embeds through stella.js as the Python client does: one vector per
    # input, in order, `dimensions` passed on; a refusal is a StellaError with its code.
    from stella.backends.echo import echo_vector

    page = browser.new_page()
    page.goto(server.url + "/playground")
    answer = page.evaluate(
        """async () => {
            const { embed } = await import("/static/stella.js");
            return await embed({ input: ["red apple", "green pear"], model: "echo", dimensions: 8 });
        }"""
    )
    assert answer["model"] == "echo" and answer["usage"]["prompt_tokens"] == 4, answer
    assert answer["embeddings"] == [echo_vector("red apple", 8), echo_vector("green pear", 8)]
    refused = page.evaluate(
        """async () => {
            const { embed, StellaError } = await import("/static/stella.js");
            try { await embed({ input: [], model: "echo" }); return null; }
            catch (err) { return [err instanceof StellaError, err.status, err.code, err.message]; }
        }"""
    )
    assert refused[:3] == [True, 400, "invalid_request"], refused
    assert "input" in refused[3], refused
    page.close()
