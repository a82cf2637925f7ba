"""Generation reuses its KV cache through every path users take: after the prompt, each step feeds the
model exactly one new token per row, at the GLM position a full recomputation would give it."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

from chatglm_6b.configuration_chatglm import ChatGLMConfig
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration
from conftest import ROOT


@contextlib.contextmanager
def model_calls(model):
    """Records (input_ids, position_ids) of every call of the base model."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((kwargs["input_ids"].clone(), kwargs["position_ids"]))

    handle = model.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def assert_one_token_per_step(calls, prompt_length, new_tokens=None):
    lengths = [ids.shape[1] for ids, _ in calls]
    assert lengths[0] == prompt_length, lengths
    assert lengths[1:] and all(length == 1 for length in lengths[1:]), lengths
    if new_tokens is not None:  # the last token needs no forward pass
        assert len(calls) == new_tokens, (len(calls), new_tokens)


def assert_positions_as_recomputed(model, calls, sequences, padding_mask=None):
    """Each decoding step's positions equal those of the whole sequence so far, computed from scratch."""
    prompt_length = calls[0][0].shape[1]
    for step, (_, position_ids) in enumerate(calls[1:]):
        length = prompt_length + step + 1
        mask = None if padding_mask is None else torch.nn.functional.pad(padding_mask, (0, step + 1), value=1)
        expected = model.get_position_ids(sequences[:, :length], mask)[..., -1:]
        assert torch.equal(position_ids, expected), step


def test_chat_feeds_one_token_per_step(tiny):
    model, tokenizer = tiny
    prompt_length = len(tokenizer.encode("你好"))
    with model_calls(model) as calls:
        response, _ = model.chat(tokenizer, "你好", history=[], do_sample=False, max_length=prompt_length + 20)
    assert_one_token_per_step(calls, prompt_length)


def test_stream_chat_feeds_one_token_per_step(tiny):
    model, tokenizer = tiny
    history = [("你好", "你好，我是一个用于测试的小模型。")]
    from chatglm_6b.modeling_chatglm import build_prompt

    prompt_length = len(tokenizer.encode(build_prompt("晚上睡不着应该怎么办？", history)))
    with model_calls(model) as calls:
        yields = list(model.stream_chat(tokenizer, "晚上睡不着应该怎么办？", history, max_length=prompt_length + 16,
                                        do_sample=True, top_p=0.7, temperature=0.95))
    assert_one_token_per_step(calls, prompt_length, new_tokens=len(yields))


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(do_sample=True, top_p=0.7, temperature=0.95)])
def test_generate_feeds_one_token_per_step_at_the_right_positions(tiny, sampling):
    model, tokenizer = tiny
    inputs = tokenizer(["北京是[MASK]的首都"], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    with model_calls(model) as calls:
        sequences = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, **sampling)
    assert_one_token_per_step(calls, prompt_length, new_tokens=12)
    assert_positions_as_recomputed(model, calls, sequences)


def test_beam_search_feeds_one_token_per_beam(tiny):
    model, tokenizer = tiny
    inputs = tokenizer(["你好"], return_tensors="pt")
    with model_calls(model) as calls:
        model.generate(**inputs, num_beams=3, do_sample=False, max_new_tokens=10, min_new_tokens=10)
    assert all(ids.shape[0] == 3 for ids, _ in calls)
    assert_one_token_per_step(calls, inputs["input_ids"].shape[1])


def test_left_padded_batch_feeds_one_token_per_row(tiny):
    model, tokenizer = tiny
    batch = tokenizer(["你好", "Hello, world! How are you today?", "北京是[MASK]的首都"], padding=True,
                      return_tensors="pt")
    with model_calls(model) as calls:
        sequences = model.generate(**batch, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert_one_token_per_step(calls, batch["input_ids"].shape[1], new_tokens=8)
    padding_mask = (batch["input_ids"] != tokenizer.pad_token_id).long()
    assert_positions_as_recomputed(model, calls, sequences, padding_mask)


def test_cached_and_uncached_generation_agree_on_a_batch(tiny):
    model, tokenizer = tiny
    batch = tokenizer(["你好", "Hello, world! How are you today?"], padding=True, return_tensors="pt")
    cached = model.generate(**batch, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    uncached = model.generate(**batch, do_sample=False, max_new_tokens=8, min_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)


def test_ptuning_model_feeds_one_token_per_step(tiny_dir):
    config = ChatGLMConfig.from_pretrained(tiny_dir)
    config.pre_seq_len = 4
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, config=config, dtype=torch.float32).eval()
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    prompt_length = len(tokenizer.encode("你好"))
    with model_calls(model) as calls:
        model.chat(tokenizer, "你好", do_sample=False, max_length=prompt_length + 10)
    assert_one_token_per_step(calls, prompt_length)


def test_quantized_model_feeds_one_token_per_step(tiny_dir):
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval().quantize(8)
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    inputs = tokenizer(["你好"], return_tensors="pt")
    with model_calls(model) as calls:
        model.generate(**inputs, do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert_one_token_per_step(calls, inputs["input_ids"].shape[1], new_tokens=8)


def test_the_original_cache_name_still_works(tiny):
    """Code written for the original passes and reads `past_key_values`."""
    model, tokenizer = tiny
    ids = tokenizer(["你好"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        cache = first.past_key_values
        position_ids = model.get_position_ids(torch.cat([ids, ids[:, -1:]], dim=1))[..., -1:]
        by_old_name = model(input_ids=ids[:, -1:], position_ids=position_ids, past_key_values=cache).logits
    assert cache.get_seq_length() == ids.shape[1] + 1
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids[:, -1:], cache=cache, past_key_values=cache)
    assert torch.isfinite(by_old_name).all()


def test_chat_prints_no_deprecation_warning():
    """A fresh process (transformers warns once per process) chatting on the demo checkpoint."""
    code = ("from utils import load_model_and_tokenizer\n"
            "model, tokenizer = load_model_and_tokenizer()\n"
            "print(model.chat(tokenizer, '你好', history=[], do_sample=False)[0])\n"
            "for _ in model.stream_chat(tokenizer, '你好', history=[], max_length=40): pass\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "deprecat" not in (result.stdout + result.stderr).lower(), result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beams", [1, 3])
def test_the_cache_grows_in_place_and_generates_as_concatenation_does(tiny_dir, monkeypatch, dtype, beams):
    """generate()'s DynamicCache gets layers that write each token into a buffer with room, taken into a new one
    when full or when beam search reorders the cache: the tokens equal those of transformers' concatenating
    DynamicLayer, for a left-padded batch."""
    from chatglm_6b import modeling_chatglm
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=dtype).eval()
    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    batch = tokenizer(["你好", "Hello, world! How are you today?"], padding=True, return_tensors="pt")
    caches = []
    handle = model.transformer.register_forward_pre_hook(lambda m, args, kwargs: caches.append(kwargs["cache"]),
                                                         with_kwargs=True)
    options = dict(num_beams=beams, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    try:
        monkeypatch.setattr(modeling_chatglm.GrowingLayer, "GROWTH", 3)  # a new buffer every few tokens
        grown = model.generate(**batch, **options)
        assert all(type(layer) is modeling_chatglm.GrowingLayer for layer in caches[-1].layers)
        monkeypatch.setattr(modeling_chatglm, "growing", lambda cache: cache)
        concatenated = model.generate(**batch, **options)
        assert not any(type(layer) is modeling_chatglm.GrowingLayer for layer in caches[-1].layers)
    finally:
        handle.remove()
    assert torch.equal(grown, concatenated)
