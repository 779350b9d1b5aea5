"""The chat page in a real browser: headless Chromium (Debian's, installed by
scripts/install_browser) driven by Selenium, against one `python -m chatglm3 serve` process on the
tiny checkpoint (fp32 CPU) with an API key, for the whole module.

The browser resolves no name but 127.0.0.1 (`--host-resolver-rules`), so the page must load with
every other address blocked. Answers the tiny model cannot give (HTML and script in the text, an
error mid-stream, a server that is gone) come from Chrome DevTools Protocol `Fetch` interception
on the page's own DevTools connection: the page's real fetch of /v1/chat/completions is answered
by the browser with a crafted server-sent event body, or failed as a refused connection; the page
code under test is unchanged. The run saves screenshots under test-artifacts/.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, TINY_CKPT
from helpers.openaiserver import serve

pytestmark = [pytest.mark.slow, pytest.mark.shared]

KEY = "test-key-22"
MODEL = "chatglm3-6b-32k"
ARTIFACTS = ROOT / "test-artifacts"
WAIT = 60  # seconds: a bound for the waits below, never a sleep


def _browser_installed() -> bool:
    return bool(shutil.which("chromium") and shutil.which("chromedriver"))


@pytest.fixture(scope="module")
def chromedriver() -> str:
    """Debian's chromium and chromedriver, installed by the project's script when missing."""
    if not _browser_installed() or not Path("/usr/share/fonts/truetype/wqy").is_dir():
        run = subprocess.run([ROOT / "scripts" / "install_browser"], capture_output=True,
                             text=True)
        if not _browser_installed():  # the fonts only make the screenshots readable
            why = f"scripts/install_browser failed:\n{run.stderr[-2000:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(why)
            pytest.skip(why)
    return shutil.which("chromedriver")


@pytest.fixture(scope="module")
def server():
    with serve("--api-key", KEY, "--max-batch", "4", weights=TINY_CKPT) as s:
        yield s


@pytest.fixture(scope="module")
def driver(chromedriver):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-background-networking", "--lang=en-US",
                # Every name but the loopback address fails to resolve: the page must need none.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    d = webdriver.Chrome(options=options, service=webdriver.ChromeService(chromedriver))
    desktop(d)
    yield d
    d.quit()


def desktop(d) -> None:
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})


def wait(d, condition, timeout: float = WAIT, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: condition(), message)


def by_id(d, name: str):
    from selenium.webdriver.common.by import By

    return d.find_element(By.ID, name)


def open_page(d, server, key: str | None = KEY) -> None:
    """Loads the page; enters the key if the page asks for one (it asks once per tab)."""
    d.get(server.url + "/")
    wait(d, lambda: d.execute_script("return document.body.dataset.ready === '1'"))
    if key is not None and by_id(d, "key-form").is_displayed():
        by_id(d, "key").send_keys(key)
        by_id(d, "key-form").submit()
        wait(d, lambda: not by_id(d, "key-form").is_displayed())


def set_controls(d, **values) -> None:
    from selenium.webdriver.common.by import By

    summary = d.find_element(By.CSS_SELECTOR, "#settings summary")
    if not by_id(d, "settings").get_attribute("open"):
        summary.click()
    for name, value in values.items():
        field = by_id(d, name)
        field.clear()
        field.send_keys(str(value))


def answers(d) -> list:
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def send(d, text: str, typed: bool = True) -> None:
    """Sends a message: typed key by key, or (long or non-BMP text, which chromedriver cannot
    type) set as the box's value, as a paste would."""
    box = by_id(d, "prompt")
    if typed:
        box.send_keys(text)
    else:
        d.execute_script("arguments[0].value = arguments[1]", box, text)
    by_id(d, "send").click()


def finished(d, count: int):
    """Waits for the count-th answer to end (its statistics line is written at its end)."""
    wait(d, lambda: len(answers(d)) >= count and
         d.execute_script("return !!arguments[0].querySelector('.stats')", answers(d)[count - 1]),
         message=f"answer {count} did not finish")
    return answers(d)[count - 1]


def raw(d, node) -> str:
    return d.execute_script("return arguments[0].answerText", node)


def api_text(server, messages: list[dict], **params) -> dict:
    """The same conversation asked of the API directly (stdlib HTTP)."""
    status, _, body = server.request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": messages, **params},
        headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200, body
    return body


def watch_growth(d) -> None:
    """Records the length of the last answer's text at each DOM mutation batch."""
    d.execute_script("""
        window.lengths = [];
        new MutationObserver(() => {
          const b = document.querySelector('#messages .msg.assistant:last-of-type .body');
          if (b) window.lengths.push(b.textContent.length);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});""")


class Interceptor:
    """CDP `Fetch` on the page's DevTools target, beside chromedriver's own connection:
    requests to /v1/chat/completions are paused and answered here (a crafted body, or a
    refused connection) until the block ends."""

    def __init__(self, d, body: str | None = None, fail: str | None = None) -> None:
        import websocket  # selenium's own dependency (websocket-client)

        address = d.capabilities["goog:chromeOptions"]["debuggerAddress"]
        with urllib.request.urlopen(f"http://{address}/json") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=WAIT,
                                              suppress_origin=True)
        self.body, self.fail, self.seen, self._id = body, fail, [], 0
        self._lock = threading.Lock()

    def _send(self, method: str, params: dict) -> None:
        with self._lock:
            self._id += 1
            self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))

    def _serve(self) -> None:
        while True:
            try:
                msg = json.loads(self.ws.recv())
            except Exception:  # noqa: BLE001 - the connection closed: the block ended
                return
            if msg.get("method") != "Fetch.requestPaused":
                continue
            p = msg["params"]
            self.seen.append(p["request"])
            if self.fail:
                self._send("Fetch.failRequest", {"requestId": p["requestId"],
                                                 "errorReason": self.fail})
            else:
                self._send("Fetch.fulfillRequest", {
                    "requestId": p["requestId"], "responseCode": 200,
                    "responseHeaders": [{"name": "Content-Type", "value": "text/event-stream"}],
                    "body": base64.b64encode(self.body.encode()).decode()})

    def __enter__(self) -> "Interceptor":
        self._send("Fetch.enable", {"patterns": [{"urlPattern": "*/v1/chat/completions",
                                                  "requestStage": "Request"}]})
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._send("Fetch.disable", {})
        self.ws.close()


def sse(*chunks: dict) -> str:
    return "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks)


def delta(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def screenshot(d, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    d.save_screenshot(str(ARTIFACTS / name))


# ---------------------------------------------------------------------------------------------

def test_an_answer_streams_in_pieces_and_equals_the_apis(driver, server) -> None:
    d = driver
    open_page(d, server)
    question = "你好，请介绍一下你自己。"
    set_controls(d, temperature=0, max_tokens=96)
    watch_growth(d)
    send(d, question)
    node = finished(d, 1)
    want = api_text(server, [{"role": "user", "content": question}], temperature=0,
                    top_p=0.8, max_tokens=96)
    text = want["choices"][0]["message"]["content"]
    assert raw(d, node) == text
    lengths = d.execute_script("return window.lengths")
    growth = sorted({n for n in lengths if n > 0})
    assert len(growth) > 2, f"the answer arrived in {len(growth)} piece(s): {lengths}"
    if not set(text) & set("*_`~#>|[]\\<"):  # no Markdown in it: shown as is
        shown = node.find_element("css selector", ".body").get_attribute("textContent")
        assert re.sub(r"\s+", "", shown) == re.sub(r"\s+", "", text)
    u = want["usage"]
    stats = node.find_element("css selector", ".stats").text
    assert f"{u['prompt_tokens']} prompt tokens" in stats
    assert f"{u['completion_tokens']} answer tokens" in stats
    assert re.search(r"first token \d+\.\d\d s · \d+\.\d tokens/s", stats), stats
    assert not by_id(d, "error").is_displayed()
    screenshot(d, "webchat.png")
    # The answer's Copy button puts its Markdown source on the clipboard.
    d.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": server.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
    button = node.find_element("css selector", ".stats button.copy")
    button.click()
    wait(d, lambda: button.text == "Copied", message=button.text)
    pasted = d.execute_async_script(
        "const done = arguments[0]; navigator.clipboard.readText().then(done, e => done('' + e))")
    assert pasted == text


def test_the_empty_page_says_what_to_do(driver, server) -> None:
    d = driver
    open_page(d, server)
    hint = "return getComputedStyle(document.getElementById('messages'), '::before').content"
    assert "Write a message below" in d.execute_script(hint)
    set_controls(d, temperature=0, max_tokens=4)
    send(d, "hi")
    finished(d, 1)
    assert d.execute_script(hint) == "none"  # gone once there is a conversation
    by_id(d, "new-chat").click()
    wait(d, lambda: "Write a message below" in d.execute_script(hint))


def test_history_system_prompt_regenerate_and_new_chat(driver, server) -> None:
    d = driver
    open_page(d, server)
    system = "你是一个乐于助人的助手。"
    set_controls(d, temperature=0, max_tokens=24)
    by_id(d, "system").send_keys(system)
    greedy = {"temperature": 0, "top_p": 0.8, "max_tokens": 24}
    first, second = "What is 2+2?", "再说一遍，用中文。"
    send(d, first)
    a1 = raw(d, finished(d, 1))
    conversation = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    assert a1 == api_text(server, conversation, **greedy)["choices"][0]["message"]["content"]
    send(d, second)
    a2 = raw(d, finished(d, 2))
    conversation += [{"role": "assistant", "content": a1}, {"role": "user", "content": second}]
    assert a2 == api_text(server, conversation, **greedy)["choices"][0]["message"]["content"]
    # Regenerate: the last answer again, for the same history (greedy: the same text), in place.
    old = answers(d)[1]
    by_id(d, "regenerate").click()
    from selenium.webdriver.support import expected_conditions

    wait(d, lambda: expected_conditions.staleness_of(old)(d))  # removed from the page
    assert raw(d, finished(d, 2)) == a2 and len(answers(d)) == 2
    # New chat forgets the history: the first question again gives the first answer.
    by_id(d, "new-chat").click()
    assert not answers(d)
    send(d, first)
    assert raw(d, finished(d, 1)) == a1


def test_stop_cancels_the_generation_on_the_server(driver, server) -> None:
    d = driver
    open_page(d, server)
    set_controls(d, temperature=0, max_tokens=20000)
    before = server.stats(KEY)
    watch_growth(d)
    send(d, "你好, write some code")
    wait(d, lambda: len(d.execute_script("return window.lengths")) > 5)
    by_id(d, "stop").click()
    node = finished(d, 1)
    s = server.wait_until(lambda s: s["finished"]["cancelled"] == before["finished"]["cancelled"]
                          + 1 and s["running"] == 0, key=KEY)
    assert s["decoded_tokens"] - before["decoded_tokens"] < 2000  # not run to 20,000 tokens
    assert s["recent"][-1]["finish"] == "cancelled"
    assert "stopped" in node.find_element("css selector", ".stats").text
    # its counts come from the page (the stream ended before its usage chunk): /tokenize
    wait(d, lambda: re.search(r"\d+ prompt tokens · \d+ answer tokens · first token "
                              r"\d+\.\d\d s · \d+\.\d tokens/s · stopped",
                              node.find_element("css selector", ".stats").text),
         message="a stopped answer's counts")
    shown = raw(d, node)
    assert shown and by_id(d, "send").is_displayed() and not by_id(d, "stop").is_displayed()
    assert s["recent"][-1]["completion_tokens"] < 2000
    # New chat in the middle of an answer: cancelled on the server too, and the new chat
    # starts empty (the cut-off answer does not land in it). Asked in a fresh chat: after the
    # cut-off answer the greedy continuation depends on where Stop landed (a timing), and some
    # cuts lead to a 15-token answer that ends before the click; alone it runs 282 tokens.
    by_id(d, "new-chat").click()
    wait(d, lambda: not answers(d))
    watch_growth(d)
    send(d, "你好, write some code")
    wait(d, lambda: len(d.execute_script("return window.lengths")) > 5)
    by_id(d, "new-chat").click()
    server.wait_until(lambda t: t["finished"]["cancelled"] == s["finished"]["cancelled"] + 1
                      and t["running"] == 0, key=KEY)
    wait(d, lambda: by_id(d, "send").is_displayed())
    assert not answers(d)
    set_controls(d, max_tokens=16)
    send(d, "What is 2+2?")
    want = api_text(server, [{"role": "user", "content": "What is 2+2?"}], temperature=0,
                    top_p=0.8, max_tokens=16)["choices"][0]["message"]["content"]
    assert raw(d, finished(d, 1)) == want and len(answers(d)) == 1


def test_model_output_shows_as_text_and_never_runs(driver, server) -> None:
    d = driver
    # The page's own rendering is on trial: with the CSP bypassed, HTML assigned as markup
    # would run its handlers (the CSP alone would block them and hide the bug).
    d.execute_cdp_cmd("Page.setBypassCSP", {"enabled": True})
    try:
        open_page(d, server)
        hostile = ('Look: <img src=x onerror="window.pwned=1"> and '
                   "<script>window.pwned=2</script> "
                   '<a href="javascript:window.pwned=3">x</a>\n\n'
                   "**粗体** 中文 😀👍🏽 [link](javascript:window.pwned=4)\n\n"
                   "```html\n<b onmouseover=\"window.pwned=5\">code</b>\n```\n")
        pieces = [hostile[i:i + 7] for i in range(0, len(hostile), 7)]
        body = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "finish_reason": None}]},
                   *[delta(p) for p in pieces],
                   {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + \
            "data: [DONE]\n\n"
        with Interceptor(d, body=body) as fetches:
            send(d, "say something hostile")
            node = finished(d, 1)
        assert fetches.seen and fetches.seen[0]["method"] == "POST"
        assert raw(d, node) == hostile
        found = d.execute_script("""
            const m = document.getElementById('messages');
            return [window.pwned, m.querySelectorAll('img, script, b, iframe, [onerror]').length,
                    [...m.querySelectorAll('a')].map(a => a.getAttribute('href')),
                    m.querySelector('pre code').textContent,
                    m.querySelector('strong').textContent];""")
        assert found == [None, 0, [], '<b onmouseover="window.pwned=5">code</b>', "粗体"]
        text = node.find_element("css selector", ".body").text
        assert '<img src=x onerror="window.pwned=1">' in text
        assert "<script>window.pwned=2</script>" in text and "中文 😀👍🏽" in text
    finally:
        d.execute_cdp_cmd("Page.setBypassCSP", {"enabled": False})


def test_errors_are_shown_in_words(driver, server) -> None:
    d = driver
    open_page(d, server)
    error = by_id(d, "error")
    # A prompt too long for the 32,768-token context: the server's error, both counts named.
    long = "你" * 40_000
    send(d, long, typed=False)
    wait(d, error.is_displayed)
    assert "too long for the model's context" in error.text and "32768 tokens" in error.text
    assert not answers(d) and by_id(d, "prompt").get_attribute("value") == long  # given back
    d.execute_script("arguments[0].value = ''", by_id(d, "prompt"))
    # A value out of range: named with its limits, before anything is sent.
    set_controls(d, temperature=9)
    send(d, "hi")
    wait(d, lambda: "temperature" in error.text)
    assert "from 0 to 5" in error.text
    set_controls(d, temperature=0, max_tokens=8)
    d.execute_script("arguments[0].value = ''", by_id(d, "prompt"))
    # The server gone (the connection refused) and an error in the middle of a stream.
    with Interceptor(d, fail="ConnectionRefused"):
        send(d, "hello?")
        wait(d, lambda: "Cannot reach the server" in error.text)
    d.execute_script("arguments[0].value = ''", by_id(d, "prompt"))
    body = sse(delta("part of an answer"), {"error": {
        "message": "the generation failed (internal error, logged on the server)",
        "type": "server_error", "param": None, "code": None}})
    with Interceptor(d, body=body):
        send(d, "hello again")
        node = finished(d, 1)
        wait(d, lambda: "the generation failed" in error.text)
    assert raw(d, node) == "part of an answer"
    assert "failed" in node.find_element("css selector", ".stats").text
    # A stream that ends without its [DONE]: the server went away mid-answer.
    d.execute_script("arguments[0].value = ''", by_id(d, "prompt"))
    with Interceptor(d, body=sse(delta("half an"))):
        send(d, "and again")
        finished(d, 2)
        wait(d, lambda: "cut off" in error.text)
    assert server.alive()


def test_the_page_asks_for_the_key_once_and_names_a_wrong_one(driver, server) -> None:
    d = driver
    open_page(d, server)
    d.execute_script("sessionStorage.clear()")
    open_page(d, server, key=None)
    assert by_id(d, "key-form").is_displayed() and not by_id(d, "send").is_enabled()
    by_id(d, "key").send_keys("wrong-key")
    by_id(d, "key-form").submit()
    set_controls(d, temperature=0, max_tokens=8)
    send(d, "hi")
    error = by_id(d, "error")
    wait(d, error.is_displayed)
    assert "Wrong or missing API key" in error.text and "wrong API key" in error.text
    assert by_id(d, "key-form").is_displayed() and not answers(d)
    by_id(d, "key").send_keys(KEY)
    by_id(d, "key-form").submit()
    by_id(d, "send").click()  # the message was given back to the box
    finished(d, 1)
    assert not error.is_displayed()
    open_page(d, server, key=None)  # reloaded: the key is kept for the tab, not asked again
    assert not by_id(d, "key-form").is_displayed()


def test_the_page_loads_with_every_other_address_blocked(driver, server) -> None:
    d = driver
    d.get_log("performance")  # drop what earlier tests logged
    d.get_log("browser")
    open_page(d, server)
    origin = server.url
    urls = []
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    paths = {u.removeprefix(origin) for u in urls}
    assert {"/", "/webchat/app.js", "/webchat/markdown.js", "/webchat/style.css",
            "/webchat/settings.json"} <= paths, urls
    assert all(u.startswith(origin + "/") for u in urls), urls
    resources = d.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(u.startswith(origin + "/") for u in resources), resources
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe  # no failed load, no CSP violation
    assert d.execute_script(  # the stylesheet applied
        "return getComputedStyle(document.getElementById('composer')).display") == "flex"
    # The blocking is real: an outside address cannot be reached from this browser.
    outcome = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('http://example.com/', {mode: 'no-cors'}).then(() => done('reached'),
                                                             e => done('blocked: ' + e));""")
    assert outcome.startswith("blocked"), outcome


def test_usable_at_a_phones_width(driver, server) -> None:
    d = driver
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    try:
        open_page(d, server)
        set_controls(d, temperature=0, max_tokens=48)
        by_id(d, "settings").find_element("css selector", "summary").click()  # fold it again
        send(d, "你好")
        finished(d, 1)
        layout = d.execute_script("""
            const r = (id) => document.getElementById(id).getBoundingClientRect();
            return {width: document.documentElement.scrollWidth, inner: innerWidth,
                    height: innerHeight, send: r('send'), prompt: r('prompt'),
                    newChat: r('new-chat'),
                    answer: document.querySelector('.msg.assistant').getBoundingClientRect()};""")
        assert layout["inner"] == 390 and layout["width"] <= 390, layout  # no sideways scroll
        for name in ("send", "prompt", "newChat", "answer"):
            box = layout[name]
            assert 0 <= box["left"] and box["right"] <= 390, (name, box)
        assert layout["send"]["bottom"] <= layout["height"], layout  # the composer on screen
        assert layout["prompt"]["width"] > 200, layout
        screenshot(d, "webchat-phone.png")
    finally:
        desktop(d)


MARKDOWN_CASES = [
    ("# Title\n\nSome **bold**, *it*, `a <b>`, ~~gone~~ and snake_case_name.",
     'h3("Title") p("Some " strong("bold") ", " em("it") ", " code("a <b>") ", " del("gone") '
     '" and snake_case_name.")'),
    ("- one\n- two\n  - nested\n\n1. first\n2. second",
     'ul(li(p("one")) li(p("two") ul(li(p("nested"))))) ol(li(p("first")) li(p("second")))'),
    ("3. three\n4. four", 'ol[start=3](li(p("three")) li(p("four")))'),
    ("| a | b |\n|:-|-:|\n| 1 | **2** |",
     'div(table(thead(tr(th("a") th.align-right("b"))) '
     'tbody(tr(td("1") td.align-right(strong("2"))))))'),
    ("```python\nprint('<hi>')\n\nx = 1\n```\nafter",
     'div(pre(code.language-python("print(\'<hi>\')\\n\\nx = 1"))) p("after")'),
    ("```\nstill streaming", 'div(pre(code("still streaming")))'),
    ("> quoted **text**\n> more", 'blockquote(p("quoted " strong("text") br "more"))'),
    ("[ok](https://example.com/a_b) [bad](javascript:alert(1)) <https://x.org> "
     "![pic](https://x.org/p.png)",
     'p(a[https://example.com/a_b]("ok") " [bad](javascript:alert(1)) " '
     'a[https://x.org]("https://x.org") " " a[https://x.org/p.png]("[image: pic]"))'),
    ("line one\nline two\n\n---\n\\*not em\\*",
     'p("line one" br "line two") hr p("*not em*")'),
]

SERIALIZE = """
const ser = (n) => {
  if (n.nodeType === 3) return JSON.stringify(n.data);
  if (n.classList.contains('code-bar')) return null;
  let tag = n.tagName.toLowerCase();
  if (n.className && n.className !== 'code' && n.className !== 'table') tag += '.' + n.className;
  if (tag === 'ol' && n.start !== 1) tag += '[start=' + n.start + ']';
  if (tag === 'a') tag += '[' + n.getAttribute('href') + ']';
  const kids = [...n.childNodes].map(ser).filter((k) => k !== null);
  return kids.length ? tag + '(' + kids.join(' ') + ')' : tag;
};"""


def test_markdown_is_built_as_dom_nodes(driver, server) -> None:
    d = driver
    open_page(d, server)
    got = d.execute_async_script(SERIALIZE + """
        const [cases, done] = [arguments[0], arguments[arguments.length - 1]];
        import('/webchat/markdown.js').then((md) => done(cases.map((text) => {
          const box = document.createElement('div');
          md.render(text, box);
          return [...box.childNodes].map(ser).join(' ');
        })), (e) => done('import failed: ' + e));""", [c[0] for c in MARKDOWN_CASES])
    for (text, want), have in zip(MARKDOWN_CASES, got, strict=True):
        assert have == want, (text, have)
    ends = d.execute_async_script("""
        const done = arguments[arguments.length - 1];
        import('/webchat/markdown.js').then((md) => done([
          md.stableEnd('a\\n\\nb'), md.stableEnd('a\\nb'), md.stableEnd('```\\nx\\n\\ny'),
          md.stableEnd('```\\nx\\n```\\n\\nz'), md.stableEnd('p\\n\\nq\\n\\nr', 3)]));""")
    assert ends == [3, 0, 0, 11, 6]
