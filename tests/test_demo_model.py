"""The shipped demo checkpoint (demo_model/): real replies, loadable through the Auto classes, in sync with chatglm_6b/."""
import json
import os
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from conftest import ROOT
from runtime.loading import DEMO_MODEL_PATH, load_model_and_tokenizer
from runtime.saving import COPY_HEADER, model_code_files

HELLO_REPLY = ("你好👋！我是 ChatGLM-6B 的演示小模型，由本项目用自己的代码训练而成。我只记得训练语料里的对话，"
               "回答能力很有限；想要完整的能力，请加载真正的 ChatGLM-6B 权重。")


@pytest.fixture(scope="module")
def demo():
    return load_model_and_tokenizer(device="cpu")


def test_hello_reply(demo):
    model, tokenizer = demo
    response, history = model.chat(tokenizer, "你好", history=[], do_sample=False)
    assert response == HELLO_REPLY
    assert history == [("你好", HELLO_REPLY)]


def test_multi_turn_follows_the_corpus_history(demo):
    model, tokenizer = demo
    with open(os.path.join(ROOT, "data", "demo_corpus", "multi_turn.jsonl"), encoding="utf-8") as f:
        conversation = json.loads(f.readline())["conversation"]
    history = []
    for turn in conversation:
        response, history = model.chat(tokenizer, turn["prompt"], history, do_sample=False)
        assert response == turn["response"]


def test_loads_through_auto_classes_from_a_copy(demo, tmp_path):
    copy = shutil.copytree(DEMO_MODEL_PATH, tmp_path / "demo_copy")
    model = AutoModel.from_pretrained(str(copy), trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(copy), trust_remote_code=True)
    assert model.chat(tokenizer, "你好", do_sample=False)[0] == HELLO_REPLY


def test_checkpoint_code_is_the_repository_code():
    """demo_model/*.py are chatglm_6b/*.py under a one-line header naming the command that writes them."""
    for name in model_code_files():
        with open(os.path.join(ROOT, "chatglm_6b", name), encoding="utf-8") as f:
            source = f.read()
        with open(os.path.join(DEMO_MODEL_PATH, name), encoding="utf-8") as f:
            header, _, copy = f.read().partition("\n")
        assert header + "\n" == COPY_HEADER.format(name=name) and "python tools/copy_model_code.py" in header
        assert copy == source, f"demo_model/{name} differs from chatglm_6b/{name}: run python tools/copy_model_code.py"


def test_checkpoint_is_small():
    assert os.path.getsize(os.path.join(DEMO_MODEL_PATH, "model.safetensors")) < 25 * 2 ** 20


def test_the_corpus_check_uses_the_real_post_processing(monkeypatch, capsys):
    """tools/check_corpus.py checks every response against the chat code's own process_response: the shipped
    corpus passes, and a change to that function (here: a space next to Chinese turning ideographic) fails it."""
    import sys

    from chatglm_6b import modeling_chatglm

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import check_corpus

    corpus = os.path.join(ROOT, "data", "demo_corpus")
    assert check_corpus.main(corpus) == 0
    monkeypatch.setitem(modeling_chatglm.CHINESE_PUNCTUATION, " ", "\u3000")
    assert check_corpus.main(corpus) == 1
    assert "not a fixed point of process_response" in capsys.readouterr().out
