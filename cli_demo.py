r"""Chat with ChatGLM-6B in the terminal; the reply streams in token by token.

    python cli_demo.py                                  # the demo checkpoint in demo_model/
    python cli_demo.py --model-path THUDM/chatglm-6b --quantize 4
    printf '你好\nstop\n' | python cli_demo.py --greedy   # works in a pipe too

Type `clear` to forget the conversation, `stop` (or Ctrl-D) to quit; Ctrl-C stops the current reply.
"""
import argparse
import os
import signal
import sys

# Ctrl-C interrupts a reply, so it must reach the main thread, which may be waiting at the prompt.
if __name__ == "__main__":
    # Python keeps ignoring SIGINT when its parent ignored it (e.g. a script's background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Threads started by the imports and the model loading below inherit this blocked SIGINT.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

import torch  # noqa: E402

from chatglm_6b.modeling_chatglm import encode_chat  # noqa: E402
from runtime.engine import GenerationEngine  # noqa: E402
from runtime.generation import STOPPED_MARK  # noqa: E402
from runtime.options import add_model_args, add_sampling_args, load_from_args, sampling  # noqa: E402

WELCOME = "欢迎使用 ChatGLM-6B 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"
PROMPT = "\n用户："
LABEL = "\nChatGLM："


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def reply(engine, tokenizer, query, history, args):
    """Streams one reply to stdout as the engine makes its text, and returns the new history; Ctrl-C stops the
    reply and keeps what was said so far."""
    try:
        answer = engine.submit(encode_chat(tokenizer, query, history), max_length=args.max_length,
                               **sampling(args.temperature, args.top_p, args.greedy))
    except ValueError as error:  # e.g. the conversation no longer fits in --max-length: keep the history
        write(f"{LABEL}\n（出错：{error} 输入 clear 可清空对话历史）\n")
        return history
    said, interrupted = "", False
    deltas = iter(answer)
    write(LABEL)
    try:
        for delta in deltas:
            write(delta.text)
            said += delta.text
    except KeyboardInterrupt:
        interrupted = True
    finally:
        deltas.close()  # a reply left early is cancelled: the engine drops it at its next step
    write(f"\n{STOPPED_MARK}\n" if interrupted else "\n")
    return history + [(query, said)] if said else history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_sampling_args(parser)
    args = parser.parse_args()

    model, tokenizer = load_from_args(args)
    engine = GenerationEngine(model, tokenizer, max_batch_size=1, max_queue=0).start()  # its thread: SIGINT blocked
    (torch.ones(256, 256) @ torch.ones(256, 256)).sum()  # start torch's worker threads now, SIGINT blocked
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and input history for input())
        except ImportError:  # Windows
            pass
    # Bytes that are not UTF-8 arrive as lone surrogates, so that one bad line is refused, not the session.
    sys.stdin.reconfigure(errors="surrogateescape")
    print(WELCOME)
    history = []
    while True:
        try:
            query = input(PROMPT).strip()
            if not sys.stdin.isatty():  # a terminal echoes what was typed; a pipe does not, so do it here
                print(query.encode("utf-8", "replace").decode("utf-8"))
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the conversation
            print("\n（输入 stop 或按 Ctrl-D 退出）")
            continue
        except EOFError:
            print()
            return
        if any("\udc80" <= char <= "\udcff" for char in query):
            print("（这一行不是有效的 UTF-8 文本，已忽略；请检查终端的编码）")
            continue
        if query == "stop":
            return
        if query == "clear":
            history = []
            if sys.stdout.isatty():
                write("\033[2J\033[H")
            print(WELCOME)
        elif query:
            history = reply(engine, tokenizer, query, history, args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # while the model loads
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
