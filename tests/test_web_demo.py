"""web_demo.py end to end: the real script as a server, driven in headless Debian Chromium by Playwright.

The exact-reply test needs the demo checkpoint (demo_model/); Stop and HTML injection run on the tiny
random checkpoint, whose gibberish replies run to the maximum length and so are long enough to stop."""
import os
import time

import pytest
from playwright.sync_api import expect, sync_playwright

from tools.local_server import LocalServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEB_DEMO = os.path.join(ROOT, "web_demo.py")
TINY = os.path.join(ROOT, "tests", "fixtures", "reference", "tiny-chatglm")
DEMO_MODEL = os.path.join(ROOT, "demo_model")
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
HELLO_REPLY = ("你好👋！我是 ChatGLM-6B 的演示小模型，由本项目用自己的代码训练而成。我只记得训练语料里的对话，"
               "回答能力很有限；想要完整的能力，请加载真正的 ChatGLM-6B 权重。")
INJECTION = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'

# A busy 2-core machine renders a streaming page slowly; every wait allows a minute.
expect.set_options(timeout=60_000)
browser_only = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                  reason=f"{CHROMIUM} is missing: run .ci/install-browser (Debian's chromium)")


def test_to_markdown_escapes_html_outside_code_only():
    from web_demo import to_markdown, to_messages

    assert to_markdown('<img src=x onerror="1"> a & b') == '&lt;img src=x onerror="1"> a &amp; b'
    # Markdown shows code literally by itself; an entity there would show up as "&lt;".
    assert to_markdown("`a<b` and\n```html\n<p>\n```\n<p>") == "`a<b` and\n```html\n<p>\n```\n&lt;p>"
    assert to_markdown("streaming\n```\n<p>") == "streaming\n```\n<p>"  # a fence still open
    assert to_messages([("q", "r"), ("<q>", "")]) == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}, {"role": "user", "content": "&lt;q>"}]


class DemoServer(LocalServer):
    """`python web_demo.py --greedy` on a free port, started from outside the repository."""

    def __init__(self, log_dir, *model_args):
        port_log = os.path.join(log_dir, f"web_demo_{len(os.listdir(log_dir))}.log")
        super().__init__(WEB_DEMO, ["--greedy", *model_args], log_path=port_log, cwd=log_dir)

    def wait(self, timeout=120):
        return super().wait("/", timeout)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers start at once (they load in parallel); each test waits for the one it uses."""
    log_dir = str(tmp_path_factory.mktemp("web_demo"))
    started = {"tiny": DemoServer(log_dir, "--model-path", TINY)}
    if os.path.isdir(DEMO_MODEL):
        started["demo"] = DemoServer(log_dir)  # the default checkpoint, no --model-path
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def send(page, text):
    page.get_by_placeholder("Input...").fill(text)
    page.get_by_role("button", name="Submit").click()


# Clicks Stop from inside the page the moment reply number `count` shows `length` characters, and
# resolves to the lengths it went through: a busy browser can fall seconds behind the fast tiny model,
# and a Stop sent from the test would then arrive after the reply had ended.
STOP_AT = """([count, length]) => { window.__stopped = new Promise(resolve => {
    const seen = [];
    const observer = new MutationObserver(() => {
        const replies = document.querySelectorAll('[data-testid="bot"]');
        if (replies.length < count) return;
        const shown = replies[count - 1].innerText.length;
        if (shown !== seen[seen.length - 1]) seen.push(shown);
        if (shown < length) return;
        observer.disconnect();
        [...document.querySelectorAll("button")].find(button => button.innerText.trim() === "Stop").click();
        resolve(seen);
    });
    observer.observe(document.body, {childList: true, subtree: true, characterData: true});
}); }"""


def send_and_stop(page, text, count=1):
    """Sends text and stops reply number `count` early; returns the lengths it streamed through and its
    text once that has stopped changing (tokens already on their way still land)."""
    page.evaluate(STOP_AT, [count, 20])
    send(page, text)
    lengths = page.evaluate("window.__stopped")
    reply = page.get_by_test_id("bot").nth(count - 1)
    shown = reply.inner_text()
    while True:
        time.sleep(0.7)
        if reply.inner_text() == shown:
            return lengths, shown
        shown = reply.inner_text()


@browser_only
def test_demo_model_replies_then_clear_history(servers, page):
    if "demo" not in servers:
        pytest.skip("demo_model/ is missing: build it with tools/train_demo_model.py")
    page.goto(servers["demo"].wait())
    send(page, "你好")
    user, bot = page.get_by_test_id("user"), page.get_by_test_id("bot")
    expect(bot).to_have_text([HELLO_REPLY])
    expect(user).to_have_text(["你好"])
    expect(page.get_by_placeholder("Input...")).to_have_value("")
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(path=os.path.join(ARTIFACTS, "web_demo.png"))

    page.get_by_role("button", name="Clear History").click()
    expect(user).to_have_count(0)
    expect(bot).to_have_count(0)


@browser_only
def test_demo_model_reply_renders_code_and_latex(servers, page):
    """The demo model's corpus answers for these two: a Python code block with `<`, inline and display
    LaTeX with `<` inside the formula, which must reach KaTeX as `<`, not as an entity."""
    if "demo" not in servers:
        pytest.skip("demo_model/ is missing: build it with tools/train_demo_model.py")
    page.goto(servers["demo"].wait())
    bot = page.get_by_test_id("bot")
    send(page, "用 Python 实现快速排序")
    expect(bot.locator("pre code")).to_contain_text("if len(arr) <= 1:")
    expect(bot.locator("annotation")).to_have_text(["O(n \\log n)"])

    page.get_by_role("button", name="Clear History").click()
    expect(bot).to_have_count(0)
    send(page, "一元二次方程的求根公式是什么")
    expect(bot.locator(".katex-display annotation")).to_have_text(["x = \\frac{-b \\pm \\sqrt{b^2 - 4ac}}{2a}"])
    expect(bot.locator("annotation").last).to_have_text("\\Delta < 0")
    assert "$" not in bot.locator("p").first.inner_text() and "&lt;" not in bot.inner_text()
    page.screenshot(path=os.path.join(ARTIFACTS, "web_demo_latex.png"))


@browser_only
def test_html_in_a_message_shows_as_text_and_never_runs(servers, page):
    page.goto(servers["tiny"].wait())
    send_and_stop(page, INJECTION)
    user = page.get_by_test_id("user")
    expect(user).to_have_text([INJECTION])
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert user.locator("script, img").count() == 0


@browser_only
def test_stop_keeps_the_partial_reply_and_history_matches_the_page(servers, page):
    page.goto(servers["tiny"].wait())
    lengths, stopped = send_and_stop(page, "你好")
    assert len(lengths) > 1, "the reply did not stream in token by token"
    assert stopped.endswith("（回答已中断）"), stopped[-40:]  # marked as cut short, as the CLI marks it
    # Greedy, the tiny checkpoint fills the whole 2048-token budget: about 2800 characters on the page.
    assert len(stopped) < 2000, f"the reply ran on to {len(stopped)} characters after Stop"
    time.sleep(1.5)  # a reply that ran on would have grown by hundreds of characters by now
    user, bot = page.get_by_test_id("user"), page.get_by_test_id("bot")
    assert bot.inner_text() == stopped

    # The page is drawn from the server-side history: the next turn still shows the stopped reply.
    send_and_stop(page, "再说一遍", count=2)
    expect(user).to_have_count(2)
    assert bot.first.inner_text() == stopped

    # A history cleared only on the page would come back with the next reply. Both Clear History and
    # the chatbot's own trash icon must clear the server-side history too.
    for clear_button in ("Clear History", "Clear"):  # "Clear": the trash icon
        page.get_by_role("button", name=clear_button, exact=True).click()
        expect(user).to_have_count(0)
        send_and_stop(page, "你好")
        expect(user).to_have_count(1)
        expect(bot).to_have_count(1)


@browser_only
def test_two_tabs_chat_at_once(servers, browser):
    """The second tab's reply streams while the first tab's is still growing: both run in the engine's batch
    (one at a time, the second would only start once the first had filled its 2048 tokens)."""
    url = servers["tiny"].wait()
    contexts = [browser.new_context(viewport={"width": 1280, "height": 900}) for _ in range(2)]
    try:
        first, second = [context.new_page() for context in contexts]
        for tab in (first, second):
            tab.goto(url)
        send(first, "long")
        expect(first.get_by_test_id("bot")).to_have_count(1)
        send(second, "long")
        expect(second.get_by_test_id("bot")).not_to_have_text([""])
        shown = len(first.get_by_test_id("bot").inner_text())
        time.sleep(1.0)
        assert len(first.get_by_test_id("bot").inner_text()) > shown, "the first tab's reply had already ended"
    finally:
        for context in contexts:
            context.close()


def tiny_engine(monkeypatch, slow_step=None):
    """The real engine on the tiny checkpoint; each of its steps through the model calls slow_step(n) first (n
    counts them)."""
    from runtime.engine import GenerationEngine
    from runtime.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(TINY)
    engine = GenerationEngine(model, tokenizer)
    run, calls = engine.runner.run, []

    def watched(step):
        calls.append(1)
        if slow_step is not None:
            slow_step(len(calls))
        return run(step)

    monkeypatch.setattr(engine.runner, "run", watched)
    return engine.start(), tokenizer


def test_a_failed_reply_leaves_the_conversation_as_it_was(monkeypatch):
    import gradio as gr

    from web_demo import make_predict, to_messages

    def fail_second_step(n):
        if n >= 2:  # the second step, and the engine's retries of its row
            raise RuntimeError("out of memory in the second step")

    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message: warnings.append(message))
    engine, tokenizer = tiny_engine(monkeypatch, fail_second_step)
    predict = make_predict(engine, tokenizer)
    earlier = [("你好", "你好！")]
    outputs = list(predict("再说一遍", 200, 0.7, 0.0, earlier))
    assert len(outputs) == 3 and outputs[1][1][-1][0] == "再说一遍"  # the question, one token, then the failure
    assert outputs[-1] == (to_messages(earlier), earlier)  # the failed turn is gone: the next question works
    assert warnings == ["出错 / Error: out of memory in the second step"]
    assert list(predict("再说一遍", 1, 0.7, 0.0, earlier))[-1] == (to_messages(earlier), earlier)  # no room
    assert "leaves no room" in warnings[-1]
    engine.stop()


def test_stop_does_not_wait_for_the_model(monkeypatch):
    """Closing a reply (the page's Stop) returns while the model is still in its forward pass; the engine
    drops the reply after that step and serves the next one."""
    import threading

    from web_demo import make_predict

    in_forward_pass, release = threading.Event(), threading.Event()

    def slow_third_step(n):
        if n == 3:
            in_forward_pass.set()
            release.wait(30)  # a long forward pass

    engine, tokenizer = tiny_engine(monkeypatch, slow_third_step)
    reply = make_predict(engine, tokenizer, greedy=True)("long", 500, 0.7, 0.95, [])
    next(reply), next(reply)  # the question, the first token
    assert in_forward_pass.wait(10)
    closer = threading.Thread(target=reply.close)
    closer.start()
    closer.join(5)
    assert not closer.is_alive(), "closing waited for the forward pass"
    assert engine.batch_size == 1  # still in its step
    release.set()
    deadline = time.time() + 10
    while engine.batch_size:
        assert time.time() < deadline, "the stopped reply kept its row"
        time.sleep(0.05)
    assert len(list(make_predict(engine, tokenizer, greedy=True)("hi", 12, 0.7, 0.95, []))) > 1
    engine.stop()
