"""cli_demo.py run as the real program, through a pipe and in a pseudo-terminal; its streaming rules in-process."""
import argparse
import os
import subprocess
import sys

import pexpect
import pytest

import cli_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "cli_demo.py")
TINY = os.path.join(ROOT, "tests", "fixtures", "reference", "tiny-chatglm")
DEMO_REPLY = ("你好👋！我是 ChatGLM-6B 的演示小模型，由本项目用自己的代码训练而成。我只记得训练语料里的对话，"
              "回答能力很有限；想要完整的能力，请加载真正的 ChatGLM-6B 权重。")
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
needs_demo_model = pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "demo_model")),
                                      reason="demo_model/ is not built: python tools/train_demo_model.py")


def run_piped(stdin, *args, cwd=ROOT, script="cli_demo.py"):
    return subprocess.run([sys.executable, script, *args], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", cwd=cwd, env=ENV, timeout=120)


@needs_demo_model
def test_pipe_replies_and_stops():
    result = run_piped("你好\nstop\n", "--greedy")
    assert result.returncode == 0, result.stderr
    assert cli_demo.WELCOME in result.stdout
    assert f"用户：你好\n\nChatGLM：{DEMO_REPLY}\n" in result.stdout


@needs_demo_model
def test_pipe_from_another_directory(tmp_path):
    # Called by absolute path from elsewhere; the empty line is skipped and the end of input quits.
    result = run_piped("\n你好\n", "--greedy", cwd=tmp_path, script=SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ChatGLM：") == 1 and DEMO_REPLY in result.stdout


def test_bad_model_path_is_one_line_error(tmp_path):
    result = run_piped("你好\n", "--model-path", str(tmp_path / "missing"))
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")


def spawn(*args):
    return pexpect.spawn(sys.executable, [SCRIPT, *args], cwd=ROOT, env=ENV, encoding="utf-8", timeout=60)


@needs_demo_model
def test_terminal_chat_clear_and_ctrl_d():
    child = spawn("--greedy")
    child.expect_exact("用户：")
    child.sendline("你好")
    child.expect_exact(f"ChatGLM：{DEMO_REPLY}")
    child.expect_exact("用户：")
    child.sendline("clear")
    child.expect_exact("\033[2J")  # the screen is cleared in a terminal
    child.expect_exact(cli_demo.WELCOME)
    child.sendline("你好")  # the history is gone: the same first-turn reply again
    child.expect_exact(f"ChatGLM：{DEMO_REPLY}")
    child.expect_exact("用户：")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_terminal_ctrl_c_stops_the_reply_not_the_program():
    # The random tiny checkpoint talks until --max-length 2048: a reply long enough to interrupt.
    child = spawn("--model-path", TINY, "--greedy")
    child.expect_exact("用户：")
    child.sendintr()  # at the prompt: a hint, the program goes on
    child.expect_exact("Ctrl-D")
    child.sendline("你好")
    child.expect(r"ChatGLM：\S")
    child.sendintr()
    child.expect_exact("（回答已中断）")
    child.expect_exact("用户：")
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


class ScriptedReply:
    """Stands in for an engine's reply: the given pieces of text, then maybe a Ctrl-C; remembers being closed."""

    def __init__(self, pieces, interrupt):
        self.pieces, self.interrupt, self.cancelled = pieces, interrupt, False

    def __iter__(self):
        from runtime.engine import Delta

        try:
            for i, piece in enumerate(self.pieces):
                yield Delta(i, piece)
            if self.interrupt:
                raise KeyboardInterrupt
        finally:
            self.cancelled = True


class ScriptedEngine:
    def __init__(self, pieces, interrupt=False):
        self.answer = ScriptedReply(pieces, interrupt)

    def submit(self, prompt_ids, **kwargs):
        return self.answer


def stream(capsys, reference_tokenizer, pieces, interrupt=False):
    args = argparse.Namespace(max_length=2048, top_p=0.7, temperature=0.95, greedy=True)
    engine = ScriptedEngine(pieces, interrupt)
    history = cli_demo.reply(engine, reference_tokenizer, "问", [], args)
    return capsys.readouterr().out, history, engine.answer


def test_the_reply_streams_as_the_engine_makes_its_text(capsys, reference_tokenizer):
    """The text comes as the engine settles it (runtime/generation.py): printed once, piece by piece."""
    out, history, answer = stream(capsys, reference_tokenizer, ["你好", "", "👋！", "我"])
    assert out == "\nChatGLM：你好👋！我\n" and history == [("问", "你好👋！我")] and answer.cancelled


def test_ctrl_c_keeps_what_was_said(capsys, reference_tokenizer):
    out, history, answer = stream(capsys, reference_tokenizer, ["Hi", ","], interrupt=True)
    assert out == "\nChatGLM：Hi,\n（回答已中断）\n" and history == [("问", "Hi,")] and answer.cancelled


def run_bytes(stdin: bytes, *args):
    return subprocess.run([sys.executable, SCRIPT, *args], input=stdin, capture_output=True, cwd=ROOT, env=ENV,
                          timeout=180)


@needs_demo_model
def test_bad_input_loses_neither_the_line_after_nor_the_conversation():
    """A line that is not UTF-8 is refused; a 1 MB line is told it does not fit; the next line is answered."""
    result = run_bytes(b"\xff\xfe\n" + "长".encode() * 1_000_000 + b"\n\xe4\xbd\xa0\xe5\xa5\xbd\nstop\n", "--greedy")
    out = result.stdout.decode("utf-8")
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert "不是有效的 UTF-8" in out and "leaves no room" in out
    assert f"ChatGLM：{DEMO_REPLY}" in out


def test_a_reader_that_goes_away_ends_the_program_quietly():
    command = f"printf '你好\\n你好\\nstop\\n' | {sys.executable} {SCRIPT} --model-path {TINY} --greedy | head -c 100"
    result = subprocess.run(["bash", "-c", command], capture_output=True, encoding="utf-8", errors="replace",
                            cwd=ROOT, env=ENV, timeout=180)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr


def test_help_shows_the_pipe_example_on_one_line():
    result = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, cwd=ROOT, env=ENV,
                            timeout=120)
    assert r"printf '你好\nstop\n' | python cli_demo.py --greedy" in result.stdout
