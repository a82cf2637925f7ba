import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from chatglm_6b.configuration_chatglm import ChatGLMConfig  # noqa: E402
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration  # noqa: E402
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer  # noqa: E402
from tools.ice_tokenizer import train_ice_tokenizer  # noqa: E402

REFERENCE = os.path.join(ROOT, "tests", "fixtures", "reference")

TOKENIZER_TEXTS = [
    "你好，我是一个用于测试的小模型。", "晚上睡不着应该怎么办？可以试试规律作息。", "Hello, world! How are you today?",
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n\tprint(i)", "1. 列表\n2. 第二项\n- 无序",
    "数学公式 $E = mc^2$ 和 $$a^2 + b^2 = c^2$$", "ChatGLM-6B 是一个开源的、支持中英双语的对话语言模型。",
    "The quick brown fox jumps over the lazy dog.", "北京是中国的首都，上海是一座国际化大都市。",
]


@pytest.fixture(scope="session")
def reference():
    with open(os.path.join(REFERENCE, "expected.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def reference_tokenizer():
    return ChatGLMTokenizer.from_pretrained(os.path.join(REFERENCE, "tiny-chatglm"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random checkpoint: an ice-style SentencePiece model trained on the fly and a 2-layer GLM."""
    out = str(tmp_path_factory.mktemp("tiny"))
    ids = train_ice_tokenizer(TOKENIZER_TEXTS * 20, os.path.join(out, "ice_text.model"), vocab_size=500)
    ChatGLMTokenizer(os.path.join(out, "ice_text.model"), num_image_tokens=0).save_pretrained(out)
    config = ChatGLMConfig(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=128,
                           max_sequence_length=512, initializer_range=0.3, **ids)
    torch.manual_seed(0)
    ChatGLMForConditionalGeneration(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return model, ChatGLMTokenizer.from_pretrained(tiny_dir)


def write_sharded_bin(model, tiny_dir, out):
    """`model` saved in fp16 in the original's layout: two `pytorch_model-0000x-of-00002.bin` shards and their
    index, beside the tokenizer and config of `tiny_dir`. Returns (the directory, the fp16 state dict)."""
    import shutil

    os.makedirs(out)
    state = {k: v.half() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({k: state[k] for k in shard}, os.path.join(out, filename))
        weight_map.update({k: filename for k in shard})
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    for name in ("config.json", "ice_text.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_dir, name), os.path.join(out, name))
    return out, state
