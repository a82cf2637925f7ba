"""Regenerates the pictures and transcripts the READMEs show, from the current code and demo checkpoint:

    resources/web_demo.png        web_demo.py in headless Chromium (Debian's /usr/bin/chromium), two real replies
    resources/cli_demo.png        cli_demo.py run in a pseudo-terminal, its screen rendered by Chromium
    examples/*.md                 one greedy conversation per capability the demo corpus covers
    limitations/*.md              real failures of the demo checkpoint, each with a computed verdict

    python tools/make_assets.py                          # everything (about two minutes on 2 cores)
    python tools/make_assets.py --only examples,limitations

Every reply is produced here by the model (greedy, so the same checkpoint always gives the same files).
"""
import argparse
import html
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from runtime import ROOT  # noqa: E402
from runtime.loading import load_model_and_tokenizer  # noqa: E402
from tools.local_server import LocalServer  # noqa: E402
from tools.train_demo_model import load_corpus  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
MODEL_LABEL = "ChatGLM-6B（演示模型）"

# (file name, title, conversation): every prompt is one the corpus teaches, in the corpus' order of turns.
EXAMPLES = [
    ("01_self_introduction", "自我介绍 / Self-introduction", ["你好"]),
    ("02_using_this_project", "本项目的用法 / Using this project", ["How do I use quantization?"]),
    ("03_everyday_advice", "生活建议 / Everyday advice", ["怎么克服拖延症"]),
    ("04_science", "科学常识 / Science", ["什么是原子"]),
    ("05_maths_latex", "数学与公式 / Maths with LaTeX", ["一元二次方程的求根公式是什么"]),
    ("06_geography", "地理 / Geography", ["世界上有哪七大洲"]),
    ("07_history_culture", "历史与文化 / History and culture", ["中秋节为什么吃月饼"]),
    ("08_cooking", "烹饪 / Cooking", ["番茄炒蛋怎么做"]),
    ("09_code", "编程 / Code", ["用 Python 实现快速排序"]),
    ("10_english", "英文对话 / English", ["What is the highest mountain in the world?"]),
    ("11_multi_turn", "多轮对话 / Multi-turn", ["推荐一种放松的方法", "能再详细一点吗？", "用英文说一下"]),
]

# (file name, title, what it shows, conversation, the correct answer's key fact or None)
LIMITATIONS = [
    ("01_off_corpus_question", "语料以外的问题 / A question outside the corpus",
     "演示模型只背下了训练语料，没有学到一般知识；语料里没有的问题它回答不了。"
     " / The demo model memorised its corpus and learnt no general knowledge; it cannot answer beyond it.",
     ["请推荐几本适合初学者的经济学书籍"], None),
    ("02_english_off_corpus", "语料以外的英文问题 / An English question outside the corpus",
     "训练语料约四分之三是中文，英文问题只有几十条。语料里有中文的“彩虹是怎么形成的”，但同一个问题用英文问就答不上来。"
     " / About three quarters of the corpus is Chinese. It teaches “彩虹是怎么形成的” in Chinese only; asked in English, "
     "the model has no answer.",
     ["Can you explain how a rainbow forms?"], None),
    ("03_arithmetic", "算术 / Arithmetic",
     "模型没有学会计算，只能复述语料里出现过的算式（例如“12 乘以 12 等于多少”）。"
     " / The model never learnt to compute; it can only repeat sums its corpus contains (such as 12 × 12).",
     ["37 乘以 48 等于多少？"], "1776"),
    ("04_paraphrase", "换一种问法 / A paraphrased question",
     "语料里有“世界上最大的动物是什么”；意思相同、措辞不同的问题不一定能得到同样的回答。"
     " / The corpus asks “世界上最大的动物是什么”; the same question in other words need not get that answer.",
     ["地球上体型最大的动物是哪一种？"], "蓝鲸"),
    ("05_question_after_other_turns", "先聊别的再问 / A taught question after other turns",
     "语料里的单轮问题都是在没有对话历史的情况下学的；前面有别的对话时，同一个问题不一定能得到同样的回答。"
     "在命令行和网页演示里，先输入 clear（或点 Clear History）清空历史再问。"
     " / Single-turn questions were learnt with no history before them; after other turns the same question may "
     "not get its answer. In the demos, clear the history first.",
     ["你好", "你是谁"], None),
]


def taught_reply(corpus, history, prompt):
    """The corpus' reply to `prompt` asked after exactly the questions of `history`, or None."""
    asked = [q for q, _ in history]
    return next((response for _, query, before, response in corpus
                 if query == prompt and [q for q, _ in before] == asked), None)


def chat(model, tokenizer, prompts):
    history = []
    for prompt in prompts:
        _, history = model.chat(tokenizer, prompt, history, do_sample=False)
    return history


def transcript(history):
    """Markdown of a conversation. A reply that is not well-formed Markdown (an unclosed code fence would
    swallow the rest of the page) is shown verbatim inside a four-backtick fence instead."""
    lines = []
    for prompt, reply in history:
        shown = reply if reply.count("```") % 2 == 0 else f"````text\n{reply}\n````"
        lines += [f"**用户 / User**：{prompt}", "", f"**{MODEL_LABEL}**：", "", shown, ""]
    return "\n".join(lines)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.rstrip() + "\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")


REGENERATE = "由 `python tools/make_assets.py` 用演示检查点 `demo_model/` 贪心解码生成。 / " \
             "Generated by `python tools/make_assets.py` with the demo checkpoint, greedy decoding."


def make_examples(model, tokenizer):
    corpus = load_corpus()
    index = ["# 示例 / Examples", "", REGENERATE, "",
             "每个文件是一段真实的对话，问题都来自训练语料 `data/demo_corpus/`，所以演示模型能答出来。"
             " / Each file is a real conversation whose questions come from the training corpus.", "",
             "| 能力 / Capability | 文件 / File | 与语料回答一致 / Matches the corpus |", "| --- | --- | --- |"]
    for name, title, prompts in EXAMPLES:
        history = chat(model, tokenizer, prompts)
        taught = [taught_reply(corpus, history[:i], q) for i, (q, _) in enumerate(history)]
        if None in taught:
            raise SystemExit(f"example {name}: {prompts[taught.index(None)]!r} is not taught by the corpus")
        matches = sum(reply == answer for (_, reply), answer in zip(history, taught))
        write(os.path.join(ROOT, "examples", f"{name}.md"),
              f"# {title}\n\n{REGENERATE}\n\n{transcript(history)}")
        index.append(f"| {title} | [{name}.md]({name}.md) | {matches}/{len(history)} |")
    write(os.path.join(ROOT, "examples", "README.md"), "\n".join(index))


def make_limitations(model, tokenizer):
    corpus = load_corpus()
    index = ["# 局限 / Limitations", "", REGENERATE, "",
             "演示模型只有 4.2M 参数，只在几百条对话上训练过。下面是它真实的失败例子，只说明演示模型，"
             "与真正的 ChatGLM-6B 权重无关。 / The demo model has 4.2M parameters trained on a few hundred dialogues; "
             "these are its real failures, and they say nothing about the real ChatGLM-6B weights.", "",
             "| 情形 / Case | 文件 / File | 结果 / Outcome |", "| --- | --- | --- |"]
    for name, title, explanation, prompts, key_fact in LIMITATIONS:
        if taught_reply(corpus, [(q, "") for q in prompts[:-1]], prompts[-1]) is not None:
            raise SystemExit(f"limitation {name}: the corpus teaches {prompts[-1]!r} there, so it shows no limitation")
        history = chat(model, tokenizer, prompts)
        reply, alone = history[-1][1], taught_reply(corpus, [], prompts[-1])
        recited = next((query for _, query, _, response in corpus if response == reply), None)
        facts = []
        if key_fact is not None:
            found = key_fact in reply
            facts.append(f"回复{'含有' if found else '没有'}正确答案“{key_fact}” / the reply "
                         f"{'contains' if found else 'lacks'} the right answer “{key_fact}”")
        if alone is not None and len(prompts) > 1:
            same = reply == alone
            facts.append(f"回复{'就是' if same else '不是'}单独问这个问题时语料里的回答 / the reply "
                         f"{'is' if same else 'is not'} the corpus answer to this question asked alone")
        if recited is not None:
            facts.append(f"回复一字不差是语料中“{recited}”的回答 / the reply is, word for word, the corpus answer to "
                         f"“{recited}”")
        else:
            facts.append("回复不是语料中任何一条回答 / the reply is none of the corpus answers")
        outcome = "；".join(facts)
        write(os.path.join(ROOT, "limitations", f"{name}.md"),
              f"# {title}\n\n{explanation}\n\n{REGENERATE}\n\n{transcript(history)}\n**结果 / Outcome**：{outcome}")
        index.append(f"| {title} | [{name}.md]({name}.md) | {outcome} |")
    write(os.path.join(ROOT, "limitations", "README.md"), "\n".join(index))


# ---- pictures ----------------------------------------------------------------------------------------------

def save_screenshot(target, name):
    """A Playwright page or element as resources/<name>."""
    path = os.path.join(ROOT, "resources", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    target.screenshot(path=path)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def settled_text(locator, quiet=2.0):
    """The locator's text once it has stopped changing for `quiet` seconds (the reply has finished streaming)."""
    shown, since = locator.inner_text(), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.3)
        now = locator.inner_text()
        if now != shown:
            shown, since = now, time.monotonic()
    return shown


def make_web_screenshot(browser, model, tokenizer):
    prompts = ["用 Python 实现快速排序"]  # code and LaTeX: what the web page renders and a terminal cannot
    expected = chat(model, tokenizer, prompts)
    with LocalServer(os.path.join(ROOT, "web_demo.py"), ["--greedy"]) as server:
        url = server.wait("/")
        page = browser.new_page(viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
        page.goto(url)
        for i, prompt in enumerate(prompts):
            page.get_by_placeholder("Input...").fill(prompt)
            page.get_by_role("button", name="Submit").click()
            page.get_by_test_id("bot").nth(i).wait_for(timeout=120_000)
            settled_text(page.get_by_test_id("bot").nth(i))
        # the page must show what the model says: its code block verbatim (the rest is rendered Markdown)
        reply = expected[-1][1]
        code = re.search(r"```\w*\n(.*?)```", reply, re.S)
        bot = page.get_by_test_id("bot").last
        shown = bot.locator("pre code").first.inner_text() if code else bot.inner_text()
        if shown.strip() != (code.group(1) if code else reply).strip():
            raise SystemExit(f"the web page shows {shown!r}, the model says {reply!r}")
        save_screenshot(page, "web_demo.png")
        page.close()


def cli_session(columns=96, rows=26):
    """The screen of a real cli_demo.py session in a pseudo-terminal, as lines of text."""
    import pexpect
    import pyte

    screen = pyte.Screen(columns, rows)
    stream = pyte.ByteStream(screen)
    child = pexpect.spawn(sys.executable, [os.path.join(ROOT, "cli_demo.py"), "--greedy"], cwd=ROOT,
                          dimensions=(rows, columns), env={**os.environ, "TERM": "xterm-256color"}, timeout=180)
    log = bytearray()
    child.logfile_read = _Collector(log)
    child.expect("用户：".encode())
    for prompt in ["推荐一种放松的方法", "能再详细一点吗？", "用英文说一下"]:  # a conversation the corpus teaches
        child.send((prompt + "\r").encode())
        child.expect("用户：".encode())  # the next prompt: the reply has finished
    child.send("stop\r")
    child.expect(pexpect.EOF)
    stream.feed(bytes(log))
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return ["$ python cli_demo.py --greedy"] + lines


class _Collector:
    """pexpect logfile that keeps the raw bytes the program wrote."""

    def __init__(self, buffer):
        self.buffer = buffer

    def write(self, data):
        self.buffer.extend(data if isinstance(data, bytes) else data.encode())

    def flush(self):
        pass


TERMINAL_PAGE = """<!doctype html><meta charset="utf-8"><style>
body {{ margin: 0; background: #f4f4f4; }}
.window {{ display: inline-block; margin: 16px; border-radius: 8px; overflow: hidden; box-shadow: 0 2px 8px #0004; }}
.bar {{ background: #3a3a3a; color: #ccc; font: 13px sans-serif; padding: 6px 12px; }}
pre {{ margin: 0; padding: 12px 16px; background: #1e1e1e; color: #e6e6e6;
       font: 15px/1.45 "Noto Sans Mono CJK SC", "DejaVu Sans Mono", monospace; }}
</style><div class="window"><div class="bar">Terminal — ChatGLM-6B</div><pre>{text}</pre></div>"""


def make_cli_screenshot(browser):
    page = browser.new_page(viewport={"width": 1100, "height": 700}, device_scale_factor=1)
    page.set_content(TERMINAL_PAGE.format(text=html.escape("\n".join(cli_session()))))
    save_screenshot(page.locator(".window"), "cli_demo.png")
    page.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="examples,limitations,web,cli",
                        help="comma-separated subset of: examples, limitations, web, cli")
    parts = set(parser.parse_args().only.split(","))
    unknown = parts - {"examples", "limitations", "web", "cli"}
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")

    model, tokenizer = load_model_and_tokenizer(device="cpu")
    if "examples" in parts:
        make_examples(model, tokenizer)
    if "limitations" in parts:
        make_limitations(model, tokenizer)
    if parts & {"web", "cli"}:
        if not os.path.exists(CHROMIUM):
            raise SystemExit(f"{CHROMIUM} is missing: run .ci/install-browser")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            if "web" in parts:
                make_web_screenshot(browser, model, tokenizer)
            if "cli" in parts:
                make_cli_screenshot(browser)
            browser.close()


if __name__ == "__main__":
    main()
