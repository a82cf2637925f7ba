"""Web chat demo: a Gradio page that streams ChatGLM-6B's replies token by token. Every open tab chats at once:
the replies are generated together by one batching engine (runtime/engine.py, --max-batch-size at a time).

    python web_demo.py                                   # the demo checkpoint, on http://127.0.0.1:7860
    python web_demo.py --model-path THUDM/chatglm-6b --quantize 4 --share
    python web_demo.py --ptuning-checkpoint ptuning/output/.../checkpoint-3000 --pre-seq-len 128
"""
import argparse
import re

import gradio as gr

from chatglm_6b.modeling_chatglm import encode_chat
from runtime.engine import GenerationEngine
from runtime.generation import STOPPED_MARK
from runtime.options import (DEFAULT_MAX_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, add_model_args,
                             add_serving_args, engine_options, load_from_args, sampling)

LATEX_DELIMITERS = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]
# Fenced code (possibly still open while a reply streams in) and inline code spans.
CODE = re.compile(r"(```.*?(?:```|$)|`[^`\n]*`)", re.DOTALL)


def to_markdown(text: str) -> str:
    """Chat text -> Markdown that shows it literally: outside code, '&' and '<' become entities, so no
    tag the user or the model writes (<script>, <img onerror>, ...) reaches the page; Markdown escapes
    code itself. LaTeX still renders: KaTeX runs on the page's text, where the entities are decoded."""
    parts = CODE.split(text)
    return "".join(part if i % 2 else part.replace("&", "&amp;").replace("<", "&lt;") for i, part in enumerate(parts))


def to_messages(history, stopped=()):
    """The chatbot's messages, always derived from the model's history, so the two never disagree; the
    replies numbered in `stopped` were cut short by Stop and say so (on the page only: the model's
    history holds what it said)."""
    messages = []
    for turn, (query, response) in enumerate(history):
        messages.append({"role": "user", "content": to_markdown(query)})
        if response:
            mark = f"\n\n{STOPPED_MARK}" if turn in stopped else ""
            messages.append({"role": "assistant", "content": to_markdown(response) + mark})
    return messages


def mark_stopped(history, stopped):
    """Stop: the last reply is marked as cut short."""
    if not history:
        return gr.skip(), gr.skip()
    stopped = sorted(set(stopped) | {len(history) - 1})
    return to_messages(history, stopped), stopped


def make_predict(engine: GenerationEngine, tokenizer, greedy: bool = False):
    """The page's reply function: streams (chatbot messages, history). A failure shows its message and
    leaves the conversation as it was before the question, so the next question works."""

    def predict(query, max_length, top_p, temperature, history, stopped=()):
        if not query.strip():
            yield gr.skip(), gr.skip()
            return
        # Show the question before the first token; Stop keeps whatever has been yielded so far.
        yield to_messages(history + [(query, "")], stopped), history + [(query, "")]
        try:
            reply = engine.submit(encode_chat(tokenizer, query, history), max_length=max(1, int(max_length)),
                                  **sampling(temperature, top_p, greedy))
            # Stop closes this generator: that only marks the reply cancelled, and the engine drops it at the
            # end of its current step, so the page never waits for the model.
            response = ""
            for delta in reply:  # the engine detokenizes and post-processes: each delta is new visible text
                if delta.text:
                    response += delta.text
                    new_history = history + [(query, response)]
                    yield to_messages(new_history, stopped), new_history
        except Exception as error:  # noqa: BLE001 (any failure of one reply must not break the session)
            gr.Warning(f"出错 / Error: {error}")
            yield to_messages(history, stopped), history

    return predict


def build_demo(engine: GenerationEngine, tokenizer, greedy: bool = False) -> gr.Blocks:
    predict = make_predict(engine, tokenizer, greedy)
    context = engine.context

    with gr.Blocks(title="ChatGLM-6B", analytics_enabled=False) as demo:
        gr.Markdown("# ChatGLM-6B")
        chatbot = gr.Chatbot(show_label=False, height=480, latex_delimiters=LATEX_DELIMITERS, sanitize_html=True,
                             allow_tags=False, feedback_options=None, buttons=["copy", "copy_all"])
        history = gr.State([])  # [(query, response)] as the model sees it
        stopped = gr.State([])  # the turns whose reply Stop cut short
        query = gr.State("")
        with gr.Row():
            with gr.Column(scale=4):
                user_input = gr.Textbox(show_label=False, placeholder="Input... (Shift+Enter sends)", lines=4)
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary")
                    stop = gr.Button("Stop")
            with gr.Column(scale=1):
                clear = gr.Button("Clear History")
                max_length = gr.Slider(1, context, value=min(DEFAULT_MAX_LENGTH, context), step=1,
                                       label="Maximum length")
                top_p = gr.Slider(0, 1, value=DEFAULT_TOP_P, step=0.01, label="Top P")
                temperature = gr.Slider(0, 1, value=DEFAULT_TEMPERATURE, step=0.01, label="Temperature")

        # Empty the textbox at once (no queue), then stream the reply as a separate, cancellable step.
        submitted = gr.on([submit.click, user_input.submit], lambda text: ("", text), user_input, [user_input, query],
                          queue=False)
        reply = submitted.then(predict, [query, max_length, top_p, temperature, history, stopped], [chatbot, history],
                               concurrency_limit=engine.max_batch_size)  # the tabs' replies run in one batch
        # Marked once the cancel is through, so that no update of the stopped reply lands after the mark.
        stop.click(None, cancels=[reply]).then(mark_stopped, [history, stopped], [chatbot, stopped])
        clear.click(lambda: ([], [], []), None, [chatbot, history, stopped], cancels=[reply])
        chatbot.clear(lambda: ([], []), None, [history, stopped], cancels=[reply])  # the chatbot's own trash icon
    return demo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding: deterministic replies (for tests)")
    add_serving_args(parser)
    add_model_args(parser)
    args = parser.parse_args()
    model, tokenizer = load_from_args(args)
    engine = GenerationEngine(model, tokenizer, **engine_options(args)).start()
    demo = build_demo(engine, tokenizer, greedy=args.greedy)
    demo.queue(max_size=args.max_queue).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
