"""The chat page at `/` in headless Chromium (Debian's chromium + chromium-driver, driven by selenium)
against real `mygpt serve` processes on loopback: a keyed tiny-model server for the mechanics (keys,
models, streaming, stop, compare, errors, unsafe Markdown) and the default model for a readable answer
and the screenshot."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import ARTIFACTS, ServerProcess
from mygpt.lora.synthetic import make_adapter
from mygpt.tenancy.config import hash_key

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
KEY = "sk-test-acme-0123456789abcdef"
LIMITED = "sk-test-limited-0123456789abcdef"

# CI must run it: there, a missing browser is a failure, not a skip
pytestmark = pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="chromium and chromium-driver are not installed (make test installs them as root)",
)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or "/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    """A server that needs keys: tenant acme (the tiny base + its adapter `style`), tenant limited (1 rpm)."""
    root = tmp_path_factory.mktemp("chat-page")
    make_adapter(tiny_model_dir, root / "store" / "acme" / "style", 8, ["q_proj", "v_proj"], seed=31)
    tenants = {
        "acme": {"keys": [f"sha256:{hash_key(KEY)}"]},
        "limited": {"keys": [f"sha256:{hash_key(LIMITED)}"], "limits": {"requests_per_minute": 1}},
    }
    (root / "mygpt.yaml").write_text(json.dumps({"tenants": tenants}))
    server = ServerProcess(
        "--model", str(tiny_model_dir), "--served-model-name", "tiny", "--config", str(root / "mygpt.yaml"),
        "--adapter-dir", str(root / "store"), "--max-loras", "2", "--max-num-seqs", "4", name="chat-page",
    ).wait_ready()  # fmt: skip
    yield server
    server.stop()


def wait(driver, condition, timeout: float = 30, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(), what)


def open_page(driver, server, key: str | None = None, max_tokens: int = 8) -> None:
    """A fresh page (nothing left in localStorage), the key typed in, models listed when it is good."""
    driver.get(server.base_url + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(server.base_url + "/")
    wait(driver, lambda: driver.find_element(By.ID, "status").text or options(driver), what="first listing")
    if key:
        driver.find_element(By.ID, "api-key").send_keys(key)
        wait(driver, lambda: options(driver) or "401" in status(driver), what="listing with the key")
    set_value(driver, "max-tokens", max_tokens)
    set_value(driver, "temperature", 0)


def set_value(driver, element_id: str, value) -> None:
    box = driver.find_element(By.ID, element_id)
    box.clear()
    box.send_keys(str(value))


def options(driver, element_id: str = "model-a") -> list[str]:
    return [o.get_attribute("value") for o in Select(driver.find_element(By.ID, element_id)).options]


def status(driver) -> str:
    return driver.find_element(By.ID, "status").text


def ask(driver, prompt: str) -> None:
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    driver.find_element(By.ID, "send").click()


def answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def wait_answered(driver, count: int, timeout: float = 60) -> list:
    """The answers once `count` of them have finished (their stats line is written)."""
    wait(
        driver,
        lambda: len(answers(driver)) >= count and not driver.find_elements(By.CSS_SELECTOR, ".streaming"),
        timeout,
        f"{count} finished answers",
    )
    return answers(driver)


def stats(answer) -> str:
    return answer.find_element(By.CSS_SELECTOR, ".stats").text


# ----------------------------------------------------------------------------- keys and models


def test_no_key_on_a_keyed_server_lists_no_models_and_says_why(browser, keyed):
    open_page(browser, keyed)
    assert browser.title == "mygpt chat"
    assert options(browser) == []
    assert "needs an API key" in status(browser)
    assert not browser.find_element(By.ID, "send").is_enabled()


def test_a_wrong_key_shows_a_readable_401(browser, keyed):
    open_page(browser, keyed, key="sk-wrong-0123456789abcdef")
    assert options(browser) == []
    assert "Not authorized (401)" in status(browser)
    assert "Incorrect API key" in status(browser)  # the server's own message follows
    assert not browser.find_element(By.ID, "send").is_enabled()
    browser.save_screenshot(str(ARTIFACTS / "chat-page-401.png"))


def test_the_key_lists_the_tenants_models_and_stays_in_local_storage(browser, keyed):
    open_page(browser, keyed, key=KEY)
    assert options(browser) == ["tiny", "style"]
    assert browser.execute_script("return localStorage.getItem('mygpt.apiKey')") == KEY
    assert "adapter on tiny" in Select(browser.find_element(By.ID, "model-a")).options[1].text
    browser.refresh()  # the key survives a reload, from localStorage
    wait(browser, lambda: options(browser) == ["tiny", "style"], what="models after reload")
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY


# ----------------------------------------------------------------------------- chatting


WATCH_STREAMING = """
window.partialTexts = [];
new MutationObserver(() => {
  const c = document.querySelector(".msg.assistant.streaming .content");
  if (c && c.textContent) window.partialTexts.push(c.textContent);
}).observe(document.getElementById("columns"), {childList: true, subtree: true});
"""


def test_an_answer_streams_and_the_conversation_has_history(browser, keyed):
    open_page(browser, keyed, key=KEY, max_tokens=48)
    browser.execute_script(WATCH_STREAMING)
    ask(browser, "Hi")
    first = wait_answered(browser, 1)[0]
    final = first.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")
    partial = browser.execute_script("return window.partialTexts")
    assert any(0 < len(p) < len(final) for p in partial), partial  # painted before the answer was whole
    line = stats(first)
    for part in ("prompt +", "completion", "tokens", "TTFT", "tokens/s", "finish: length"):
        assert part in line, line
    prompt1, completion1 = (int(w) for w in line.split(" ")[0:4:3])

    ask(browser, "And again?")
    second = wait_answered(browser, 2)[1]
    prompt2 = int(stats(second).split(" ")[0])
    assert prompt2 >= prompt1 + completion1  # the first turn went along with the second
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == ["Hi", "And again?"]


def test_stop_aborts_the_generation_on_the_server(browser, keyed):
    open_page(browser, keyed, key=KEY, max_tokens=400)
    ask(browser, "Tell me a long story.")
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".streaming .content p"), what="first text")
    browser.find_element(By.ID, "stop").click()
    answer = wait_answered(browser, 1, timeout=10)[0]
    assert "stopped" in stats(answer)
    assert browser.find_element(By.ID, "send").is_enabled()
    deadline = time.monotonic() + 10
    while "aborted after" not in keyed.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "aborted after" in keyed.log()  # the engine dropped the row: "request <id> aborted after N ..."


def test_compare_mode_answers_with_two_models_side_by_side(browser, keyed):
    open_page(browser, keyed, key=KEY, max_tokens=6)
    browser.find_element(By.ID, "compare").click()
    Select(browser.find_element(By.ID, "model-b")).select_by_value("style")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#columns.compare .column")) == 2
    ask(browser, "Hello")
    left, right = wait_answered(browser, 2)
    assert [a.find_element(By.CSS_SELECTOR, ".model").text for a in (left, right)] == ["tiny", "style"]
    assert left.location["x"] < right.location["x"] and left.location["y"] == right.location["y"]
    for a in (left, right):
        assert "completion" in stats(a) and "TTFT" in stats(a)
    browser.save_screenshot(str(ARTIFACTS / "chat-page-compare.png"))


def test_api_errors_are_readable_messages(browser, keyed):
    # 404: a model the tenant cannot see (as when an adapter is unloaded after the listing)
    open_page(browser, keyed, key=KEY)
    browser.execute_script(
        "const s = document.getElementById('model-a'); s.add(new Option('gone', 'gone')); s.value = 'gone';"
    )
    ask(browser, "Hi")
    error = wait_answered(browser, 1)[0].find_element(By.CSS_SELECTOR, ".error").text
    assert error.startswith("Model not found (404).") and "'gone' does not exist" in error
    # 429: tenant `limited` may make one request a minute
    open_page(browser, keyed, key=LIMITED, max_tokens=2)
    ask(browser, "Hi")
    wait_answered(browser, 1)
    ask(browser, "Hi again")
    error = wait_answered(browser, 2)[1].find_element(By.CSS_SELECTOR, ".error").text
    assert error.startswith("Rate limited (429): retry in") and "1 requests per minute" in error, error
    browser.save_screenshot(str(ARTIFACTS / "chat-page-429.png"))


# ----------------------------------------------------------------------------- unsafe model output

STUB = """
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  if (!String(url).endsWith("/v1/chat/completions")) return realFetch(url, init);
  const pieces = %s;
  const enc = new TextEncoder();
  const body = new ReadableStream({ start(c) {
    for (const p of pieces)
      c.enqueue(enc.encode("data: " + JSON.stringify({choices: [{index: 0, delta: {content: p}}]}) + "\\n\\n"));
    c.enqueue(enc.encode("data: [DONE]\\n\\n"));
    c.close();
  } });
  return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
};
"""
EVIL = [  # split mid-tag, as a stream may split it
    "Look: <im",
    'g src=x onerror="window.__xss=1"> and <scr',
    "ipt>window.__xss=2</script> ",
    "**bold** [click](javascript:window.__xss=3) [ok](https://example.com/a_b)\n",
    "```html\n<svg onload=window.__xss=4></svg>\n```\n",
    '<a href="javascript:window.__xss=5">x</a> <iframe src="javascript:window.__xss=6"></iframe>',
]


def test_html_from_the_model_is_shown_never_executed(browser, keyed):
    """The model's answer (replaced in the page's fetch by a hostile one) renders as text."""
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": STUB % json.dumps(EVIL)}
    )
    try:
        open_page(browser, keyed, key=KEY)
        ask(browser, "Say something nasty")
        answer = wait_answered(browser, 1)[0]
        content = answer.find_element(By.CSS_SELECTOR, ".content")
        time.sleep(0.3)  # an onerror would fire once the broken image failed to load
        assert browser.execute_script("return window.__xss") is None
        for tag in ("img", "script", "svg", "iframe"):
            assert content.find_elements(By.TAG_NAME, tag) == [], tag
        links = [a.get_attribute("href") for a in content.find_elements(By.TAG_NAME, "a")]
        assert links == ["https://example.com/a_b"]  # javascript: links stay text
        text = content.text
        assert '<img src=x onerror="window.__xss=1">' in text and "<script>window.__xss=2</script>" in text
        assert "<svg onload=window.__xss=4></svg>" in content.find_element(By.CSS_SELECTOR, "pre code").text
        assert content.find_element(By.TAG_NAME, "strong").text == "bold"  # the safe subset still renders
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


DELTAS_STUB = """
const realFetch = window.fetch;
window.fetch = async (url, init) => {
  if (!String(url).endsWith("/v1/chat/completions")) return realFetch(url, init);
  (window.__bodies ??= []).push(JSON.parse(init.body));
  const deltas = %s;
  const enc = new TextEncoder();
  const body = new ReadableStream({ async start(c) {
    for (const d of deltas) {
      c.enqueue(enc.encode("data: " + JSON.stringify({choices: [{index: 0, delta: d}]}) + "\\n\\n"));
      await new Promise((r) => setTimeout(r, 150));  // the page paints each piece
    }
    c.enqueue(enc.encode("data: [DONE]\\n\\n"));
    c.close();
  } });
  return new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
};
"""
THINKING = [  # a reasoning model's stream: its thinking (both names, as the server sends), then the answer
    {"role": "assistant", "content": ""},
    {"reasoning": "The user asks <b>2+2</b>.", "reasoning_content": "The user asks <b>2+2</b>."},
    {"reasoning": " It is 4.", "reasoning_content": " It is 4."},
    {"content": "The answer is **4**."},
]


def test_a_reasoning_models_thinking_shows_apart_folded_once_it_answers(browser, keyed):
    """delta.reasoning goes into a "Thinking" box above the answer, as text (its HTML shown, not
    rendered), open while the model thinks and folded once the answer comes; the answer renders as
    Markdown; the conversation keeps the answer alone."""
    script = browser.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument", {"source": DELTAS_STUB % json.dumps(THINKING)}
    )
    try:
        open_page(browser, keyed, key=KEY)
        ask(browser, "What is 2+2?")
        wait(
            browser,
            lambda: browser.find_elements(By.CSS_SELECTOR, ".thinking[open] .thought"),
            what="thinking",
        )
        answer = wait_answered(browser, 1)[0]
        box = answer.find_element(By.CSS_SELECTOR, ".thinking")
        assert box.get_attribute("open") is None  # folded once the answer came
        thought = box.find_element(By.CSS_SELECTOR, ".thought")
        assert thought.get_attribute("textContent") == "The user asks <b>2+2</b>. It is 4."
        assert thought.find_elements(By.TAG_NAME, "b") == []
        content = answer.find_element(By.CSS_SELECTOR, ".content")
        assert content.text == "The answer is 4." and content.find_element(By.TAG_NAME, "strong").text == "4"
        ask(browser, "Sure?")
        wait_answered(browser, 2)
        sent = browser.execute_script("return window.__bodies")[-1]["messages"]
        assert sent[1] == {"role": "assistant", "content": "The answer is **4**."}
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


# ----------------------------------------------------------------------------- the default model


@pytest.mark.slow
def test_a_readable_answer_from_the_default_model_and_a_screenshot(browser, default_server):
    """An open server (no key needed): real answers, rendered; the screenshot the README shows."""
    open_page(browser, default_server, max_tokens=100)
    assert options(browser)[0] == "SmolLM2-135M-Instruct"  # the base first; adapters in ./adapters follow
    ask(browser, "What is the capital of France?")
    first = wait_answered(browser, 1, timeout=120)[0]
    assert "Paris" in first.find_element(By.CSS_SELECTOR, ".content").text
    assert "tokens/s" in stats(first)
    ask(browser, "Give me three tips for staying focused.")
    second = wait_answered(browser, 2, timeout=120)[1]
    assert second.find_element(By.CSS_SELECTOR, ".content").text.strip()
    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))
