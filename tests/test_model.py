"""The model core on tiny random checkpoints built by the tests (conftest.tiny)."""
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from chatglm_6b.configuration_chatglm import ChatGLMConfig
from chatglm_6b.modeling_chatglm import (ChatGLMForConditionalGeneration, InvalidScoreLogitsProcessor, build_prompt,
                                         process_response)
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
from conftest import write_sharded_bin
from runtime.devices import gpu_device_map
from runtime.loading import CheckpointError, load_model_and_tokenizer
from runtime.saving import save_checkpoint

# Exact round trip for text that SentencePiece's NFKC normaliser leaves as is (it maps full-width "，" to ",").
HARD_STRINGS = [
    "two  spaces, three   spaces and a tab\there", "line one\nline two\n\n\nline five", "emoji 😀👍🏽 and 中文混排 English",
    "def f(x):\n    if x:\n        return {'a': [1, 2]}\n    return None", "a" + " " * 80 + "b" + " " * 81 + "c",
    "数学: $x^2 + y^2 = z^2$, 以及 ```python\nprint('hi')\n```", "   leading and trailing spaces   ", "x = a .b , c ! d ?",
]


def greedy(model, input_ids, **kwargs):
    return model.generate(input_ids, do_sample=False, **kwargs)


def test_tokenizer_round_trips_hard_strings(tiny):
    _, tokenizer = tiny
    for text in HARD_STRINGS:
        ids = tokenizer.encode(text)
        assert ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
        assert tokenizer.decode(ids) == text, text


def test_full_forward_equals_cached_decoding(tiny):
    model, tokenizer = tiny
    inputs = tokenizer(["晚上睡不着应该怎么办？"], return_tensors="pt")
    sequence = greedy(model, inputs["input_ids"], max_new_tokens=12, min_new_tokens=12)
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        full = model(input_ids=sequence).logits[0]
        cache = None
        step_logits = []
        out = model(input_ids=sequence[:, :prompt_length], use_cache=True)
        cache = out.past_key_values
        step_logits.append(out.logits[0, -1])
        for t in range(prompt_length, sequence.shape[1]):
            position_ids = model.get_position_ids(sequence[:, :t + 1])[..., -1:]
            out = model(input_ids=sequence[:, t:t + 1], position_ids=position_ids, past_key_values=cache, use_cache=True)
            step_logits.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(step_logits), full[prompt_length - 1:], atol=1e-4, rtol=1e-4)


def test_left_padded_batch_equals_each_row_alone(tiny):
    model, tokenizer = tiny
    texts = ["你好", "Hello, world! How are you today?", "def add(a, b):\n    return a + b"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    batched = greedy(model, **batch, max_new_tokens=10)[:, batch["input_ids"].shape[1]:]
    for row, text in zip(batched.tolist(), texts):
        alone = tokenizer([text], return_tensors="pt")
        single = greedy(model, **alone, max_new_tokens=10)[0, alone["input_ids"].shape[1]:].tolist()
        assert row[:len(single)] == single


def test_chat_equals_greedy_generate_and_stream_chat(tiny):
    model, tokenizer = tiny
    history = [("你好", "你好，我是一个用于测试的小模型。")]
    response, new_history = model.chat(tokenizer, "晚上睡不着应该怎么办？", history, do_sample=False, max_length=96)
    prompt = build_prompt("晚上睡不着应该怎么办？", history)
    inputs = tokenizer([prompt], return_tensors="pt")
    output = greedy(model, **inputs, max_length=96)[0, inputs["input_ids"].shape[1]:]
    assert response == process_response(tokenizer.decode(output.tolist()))
    assert new_history == history + [("晚上睡不着应该怎么办？", response)]
    streamed = list(model.stream_chat(tokenizer, "晚上睡不着应该怎么办？", history, do_sample=False, max_length=96))
    assert len(streamed) > 1 and streamed[-1] == (response, new_history)


def test_stream_chat_stops_when_closed(tiny):
    model, tokenizer = tiny
    stream = model.stream_chat(tokenizer, "你好", [], do_sample=False, max_length=400)
    first = next(stream)
    stream.close()  # the worker thread must stop and be joined
    assert isinstance(first[0], str)


def test_build_prompt_and_process_response():
    assert build_prompt("你好", []) == "你好"
    assert build_prompt("它呢？", [("问一", "答一"), ("问二", "答二")]) == (
        "[Round 0]\n问：问一\n答：答一\n[Round 1]\n问：问二\n答：答二\n[Round 2]\n问：它呢？\n答：")
    assert process_response("  你好,世界!好的:是;吗? ok, fine!  ") == "你好，世界！好的：是；吗？ ok, fine!"
    assert process_response("[[训练时间]]发布") == "2023年发布"


def test_invalid_scores_are_replaced(tiny):
    for bad in (float("nan"), float("inf"), float("-inf")):
        scores = torch.tensor([[0.0, bad, 1.0, 2.0, 3.0, 4.0, 5.0]])
        fixed = InvalidScoreLogitsProcessor()(None, scores.clone())
        assert fixed.argmax().item() == 5 and torch.isfinite(fixed).all()
    # chat() puts the guard before transformers' top-p, whose -inf must not trigger it
    model, tokenizer = tiny
    seen = []
    original = InvalidScoreLogitsProcessor.__call__

    def spy(self, input_ids, scores):
        seen.append(bool(torch.isinf(scores).any()))
        return original(self, input_ids, scores)

    InvalidScoreLogitsProcessor.__call__ = spy
    try:
        torch.manual_seed(0)
        model.chat(tokenizer, "你好", max_length=24, top_p=0.5)
    finally:
        InvalidScoreLogitsProcessor.__call__ = original
    assert seen and not any(seen)


def test_sampling_is_seeded_and_beam_search_runs(tiny):
    model, tokenizer = tiny
    inputs = tokenizer(["你好"], return_tensors="pt")
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(**inputs, do_sample=True, top_p=0.7, temperature=0.95, max_new_tokens=16))
    assert torch.equal(runs[0], runs[1])
    beams = model.generate(**inputs, num_beams=3, do_sample=False, max_new_tokens=16, num_return_sequences=2,
                           output_scores=True, return_dict_in_generate=True)
    assert beams.sequences.shape[0] == 2
    one_beam = model.generate(**inputs, num_beams=1, do_sample=False, max_new_tokens=16)
    assert torch.equal(one_beam, greedy(model, inputs["input_ids"], max_new_tokens=16))
    response, _ = model.chat(tokenizer, "你好", num_beams=2, do_sample=False, max_length=64)
    assert isinstance(response, str)


def test_mask_prompt_positions(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode("北京是[MASK]的首都") + [5, 6]
    positions = model.get_position_ids(torch.tensor([ids]))[0]
    mask_index = ids.index(tokenizer.mask_token_id)
    assert tokenizer.gmask_token_id in ids  # appended [gMASK] wins, as in the original model
    gmask_index = ids.index(tokenizer.gmask_token_id)
    context = ids.index(tokenizer.bos_token_id)
    assert positions[0, context:].tolist() == [gmask_index] * (len(ids) - context)
    assert positions[1].tolist() == [0] * context + list(range(1, len(ids) - context + 1))
    only_mask = ids[:context - 1] + [tokenizer.bos_token_id]  # no [gMASK]: [MASK] is filled in place
    positions = model.get_position_ids(torch.tensor([only_mask]))[0]
    assert positions[0, -1].item() == mask_index
    output = greedy(model, torch.tensor([only_mask]), max_new_tokens=5)
    assert output.shape[1] > len(only_mask)


def test_one_dimensional_variant_is_consistent(tiny_dir):
    config = ChatGLMConfig.from_pretrained(tiny_dir)
    config.position_encoding_2d = False
    torch.manual_seed(1)
    model = ChatGLMForConditionalGeneration(config).eval()
    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    for text in ["你好", "北京是[MASK]的首都"]:
        input_ids = tokenizer([text], return_tensors="pt")["input_ids"]
        cached = greedy(model, input_ids, max_new_tokens=8, min_new_tokens=8)
        uncached = greedy(model, input_ids, max_new_tokens=8, min_new_tokens=8, use_cache=False)
        assert torch.equal(cached, uncached)


def test_ptuning_trains_only_the_prefix(tiny_dir):
    config = ChatGLMConfig.from_pretrained(tiny_dir)
    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    inputs = tokenizer(["你好"], return_tensors="pt")
    for projection in (False, True):
        config.pre_seq_len, config.prefix_projection = 4, projection
        model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, config=config, dtype=torch.float32)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
        model.eval()
        with torch.no_grad():
            assert not torch.allclose(model(**inputs).logits, base(**inputs).logits, atol=1e-3)
        model.train()
        labels = inputs["input_ids"].clone()
        model(input_ids=inputs["input_ids"], labels=labels).loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        # the cache path and the padded-batch path see the prefix too
        model.eval()
        output = greedy(model, **tokenizer(["你好", "Hello, world!"], padding=True, return_tensors="pt"), max_new_tokens=4)
        assert output.shape[0] == 2


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir):
    config = ChatGLMConfig.from_pretrained(tiny_dir)
    config.pre_seq_len = 4
    tokenizer = ChatGLMTokenizer.from_pretrained(tiny_dir)
    input_ids = tokenizer(["晚上睡不着应该怎么办？"], return_tensors="pt")["input_ids"]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, config=config, dtype=torch.float32)
        model.transformer.dropout.p = 0.0
        if checkpointing:
            # activation_checkpointing_enable is the newer name (and the old one warns there)
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append(model.transformer.prefix_encoder.embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_original_sharded_bin_layout_loads(tiny, tiny_dir, tmp_path):
    model, tokenizer = tiny
    out, state = write_sharded_bin(model, tiny_dir, tmp_path / "sharded")
    assert "lm_head.weight" in state and "transformer.layers.0.attention.rotary_emb.inv_freq" in state
    loaded, info = ChatGLMForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value.float(), state[name].float())


def test_saved_directory_loads_with_auto_classes(tiny, tmp_path):
    model, tokenizer = tiny
    save_checkpoint(model, tokenizer, str(tmp_path / "saved"))
    copy = shutil.copytree(tmp_path / "saved", tmp_path / "copy")
    auto_model = AutoModel.from_pretrained(str(copy), trust_remote_code=True, dtype=torch.float32).eval()
    auto_tokenizer = AutoTokenizer.from_pretrained(str(copy), trust_remote_code=True)
    assert type(auto_model).__name__ == "ChatGLMForConditionalGeneration"
    assert auto_tokenizer.encode("你好 world") == tokenizer.encode("你好 world")
    assert auto_model.chat(auto_tokenizer, "你好", do_sample=False, max_length=48) == \
        model.chat(tokenizer, "你好", do_sample=False, max_length=48)


def test_loader_reports_bad_checkpoints_in_one_line(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "missing"))
    corrupt = shutil.copytree(tiny_dir, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as error:
        load_model_and_tokenizer(str(corrupt))
    assert "\n" not in str(error.value) and "corrupt" in str(error.value)
    incomplete = shutil.copytree(tiny_dir, tmp_path / "incomplete")
    (incomplete / "ice_text.model").unlink()
    with pytest.raises(CheckpointError, match="no ice_text.model"):
        load_model_and_tokenizer(str(incomplete))


@pytest.mark.parametrize("num_gpus,layers_per_gpu", [(1, [28]), (2, [13, 15]), (3, [8, 10, 10]), (4, [6, 8, 8, 6])])
def test_gpu_device_map_splits_as_the_original(num_gpus, layers_per_gpu):
    """GPU 0 also holds the embeddings, final norm and lm_head (worth two layers); the counts per GPU are
    worked out by hand from the original's fill-each-GPU-in-turn rule for ChatGLM-6B's 28 layers."""
    device_map = gpu_device_map(28, num_gpus)
    assert [device_map[k] for k in ("transformer.word_embeddings", "transformer.final_layernorm", "lm_head")] == [0, 0, 0]
    layers = [device_map[f"transformer.layers.{i}"] for i in range(28)]
    assert layers == sorted(layers) and [layers.count(g) for g in range(num_gpus)] == layers_per_gpu
    assert len(device_map) == 31


def test_the_original_utils_helpers_keep_their_names_and_signatures():
    """`from utils import load_model_on_gpus, auto_configure_device_map` as in the original's scripts."""
    import inspect

    from utils import DeviceError, auto_configure_device_map, load_model_on_gpus

    assert list(inspect.signature(auto_configure_device_map).parameters) == ["num_gpus"]
    assert list(inspect.signature(load_model_on_gpus).parameters) == ["checkpoint_path", "num_gpus", "device_map",
                                                                      "kwargs"]
    assert inspect.signature(load_model_on_gpus).parameters["num_gpus"].default == 2
    assert auto_configure_device_map(2) == gpu_device_map(28, 2)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA"):
            load_model_on_gpus(None, num_gpus=1)
        with pytest.raises(DeviceError, match="CUDA"):
            load_model_on_gpus(None, num_gpus=2)
