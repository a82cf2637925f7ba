"""Every input handled right in the model core and the loader: what a careful read or a hostile user sends
gets the meaning it has, or a clear error; nothing is silently misread."""
import json
import logging
import shutil

import pytest
import torch

from chatglm_6b.configuration_chatglm import ChatGLMConfig
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration, process_response
from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer
from conftest import write_sharded_bin
from runtime import loading
from runtime.finetunes import load_finetuned
from runtime.loading import CheckpointError, load_model_and_tokenizer
from runtime.saving import save_checkpoint


def prefill_ids(model, run):
    """The token ids of the first call of the base model while `run()` runs."""
    seen = []
    handle = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


# ---- user text is text ------------------------------------------------------------------------------

@pytest.mark.parametrize("spelled", ["<sop>", "<eop>", "[MASK]", "[gMASK]", "<pad>", "<unk>"])
def test_control_tokens_in_user_text_are_text(tiny, spelled):
    model, tokenizer = tiny
    query = f"讲讲 {spelled} 是什么"
    ids = prefill_ids(model, lambda: model.chat(tokenizer, query, [(f"a {spelled}", f"b {spelled}")],
                                                 do_sample=False, max_length=200, max_new_tokens=2))
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id, tokenizer.gmask_token_id,
                tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert [i for i in ids if i in specials] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]


def test_tokenizer_matches_the_original_interface(tiny):
    _, tokenizer = tiny
    assert list(tokenizer("你好").keys()) == ["input_ids"]  # the original built the GLM mask only when padding
    assert tokenizer.all_special_tokens == ["<sop>", "<eop>", "<unk>", "<pad>", "[MASK]"]
    assert tokenizer.gmask_token == "[gMASK]" and tokenizer.end_token == "</s>"
    batch = tokenizer(["你好", "Hello, world!"], padding=True)
    assert set(batch.keys()) == {"input_ids", "attention_mask", "position_ids"}
    # the original's _pad built them whenever it was given a max_length: truncating to one gives them too, the
    # same as padding to it would
    text = "Hello, world! 你好世界"
    truncated = tokenizer(text, truncation=True, max_length=5)
    padded = tokenizer(text, truncation=True, max_length=5, padding="max_length")
    assert set(truncated.keys()) == {"input_ids", "attention_mask", "position_ids"}
    assert truncated["input_ids"][-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    assert truncated["input_ids"] == padded["input_ids"] and truncated["attention_mask"].shape == (1, 5, 5)
    assert (truncated["attention_mask"] == padded["attention_mask"]).all()
    assert (truncated["position_ids"] == padded["position_ids"]).all()
    assert set(tokenizer([text, "hi"], truncation=True, max_length=5).keys()) == set(truncated.keys())
    assert list(tokenizer(text, max_length=500, truncation=True).keys()) == list(truncated.keys())


def test_a_huge_prompt_is_refused_before_anything_quadratic(tiny):
    """One 1 MB line: chat() must say it does not fit, in bounded memory (the GLM mask of 10^6 tokens
    alone would be 10^12 entries)."""
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="leaves no room"):
        model.chat(tokenizer, "长" * 300_000, [], max_length=512)


# ---- masks and positions ----------------------------------------------------------------------------

def test_padding_masks_mean_what_hugging_face_means(tiny):
    model, tokenizer = tiny
    batch = tokenizer(["你好", "Hello, world! How are you today?"], padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    padding = (ids != tokenizer.pad_token_id).long()
    with torch.no_grad():
        glm = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        as_int = model(input_ids=ids, attention_mask=padding).logits
        as_bool = model(input_ids=ids, attention_mask=padding.bool()).logits  # True = keep, as in transformers
    real = padding.bool()
    torch.testing.assert_close(as_int[real], glm[real])
    torch.testing.assert_close(as_bool[real], glm[real])
    right_padded = torch.cat([ids[:1, padding[0].bool()], ids.new_full((1, int((padding[0] == 0).sum())), 3)], 1)
    with pytest.raises(ValueError, match="left padding"):
        model(input_ids=right_padded, attention_mask=padding[:1].flip(-1))
    with pytest.raises(ValueError, match="padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, ids.shape[1], ids.shape[1]))  # float 4-D: meaningless


def test_decoding_with_a_cache_needs_positions(tiny):
    model, tokenizer = tiny
    ids = tokenizer(["你好"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="position_ids are required"):
            model(input_ids=ids[:, -1:], cache=cache)


def test_rotary_frequencies_stay_fp32_in_every_dtype(tiny_dir):
    reference = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    expected = reference.transformer.layers[0].attention.rotary_emb.inv_freq.clone()
    assert expected.dtype == torch.float32
    for model in (reference.bfloat16(), reference.half(),
                  ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.bfloat16)):
        inv_freq = model.transformer.layers[0].attention.rotary_emb.inv_freq
        assert inv_freq.dtype == torch.float32 and torch.equal(inv_freq, expected)


# ---- the original's interface -----------------------------------------------------------------------

def test_process_response_is_a_method_and_attentions_have_the_original_layout(tiny):
    model, tokenizer = tiny
    assert model.process_response("你好,世界") == process_response("你好,世界") == "你好，世界"
    ids = tokenizer(["你好"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    heads = model.config.num_attention_heads
    assert attentions[0].shape == (heads, ids.shape[1], ids.shape[1])  # [batch * heads, q, k]


def test_quantize_follows_the_original_signatures(tiny_dir):
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    model.quantize(4, True)  # the -qe checkpoints' second argument: quantize_embeddings
    assert model.config.quantization_embeddings
    assert type(model.transformer.word_embeddings).__name__ == "QuantizedEmbedding"
    assert model.quantize(4) is model  # the same again: nothing to do
    with pytest.raises(ValueError, match="already quantized to 4 bits"):
        model.quantize(8)
    fresh = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32)
    fresh.quantize(8, quantize_embeddings=False, use_quantization_cache=True)
    assert fresh.transformer.layers[0].attention.query_key_value.weight.abs().sum() > 0  # filled, not empty


# ---- the loader -------------------------------------------------------------------------------------

def test_quantize_while_loading_checks_shapes(tiny_dir, tmp_path):
    wrong = shutil.copytree(tiny_dir, tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["inner_hidden_size"] *= 2  # the weights do not have these rows
    (wrong / "config.json").write_text(json.dumps(config))
    for quantize in (None, 8):
        with pytest.raises(CheckpointError) as error:
            load_model_and_tokenizer(str(wrong), quantize=quantize)
        assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match=r"mlp\.dense_\w+\.weight is \[\d+, \d+\] in the checkpoint"):
        load_model_and_tokenizer(str(wrong), quantize=8)


def test_unused_weights_are_reported(tiny, tiny_dir, tmp_path, caplog):
    model, _ = tiny
    out, _ = write_sharded_bin(model, tiny_dir, tmp_path / "extra")
    extra = torch.load(out / "pytorch_model-00001-of-00002.bin")
    extra["transformer.no_such_layer.weight"] = torch.zeros(2)
    torch.save(extra, out / "pytorch_model-00001-of-00002.bin")
    with caplog.at_level(logging.WARNING, logger="runtime.loading"):
        load_model_and_tokenizer(str(out), quantize=8)
    assert "no_such_layer" in caplog.text


def test_program_errors_keep_their_traceback(tiny_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a bug in our own code")

    monkeypatch.setattr(ChatGLMForConditionalGeneration, "tie_weights", broken)
    with pytest.raises(TypeError, match="a bug"):
        load_model_and_tokenizer(tiny_dir)


def test_an_already_quantized_checkpoint_is_not_requantized(tiny, tmp_path):
    model, tokenizer = tiny
    int4 = ChatGLMForConditionalGeneration.from_pretrained(tiny[0].config._name_or_path, dtype=torch.float32)
    int4.quantize(4)
    save_checkpoint(int4, tokenizer, str(tmp_path / "int4"))
    with pytest.raises(CheckpointError, match="already quantized to 4 bits"):
        load_model_and_tokenizer(str(tmp_path / "int4"), quantize=8)


def test_a_model_too_big_for_memory_loads_in_bf16_or_stops_with_the_options(tiny_dir, monkeypatch, caplog):
    fp32_bytes = loading.parameter_count(ChatGLMConfig.from_pretrained(tiny_dir)) * 4
    monkeypatch.setattr(loading, "available_memory", lambda: int(fp32_bytes * 0.8))
    with caplog.at_level(logging.WARNING, logger="runtime.loading"):
        model, _ = load_model_and_tokenizer(tiny_dir, device="cpu")
    assert model.dtype == torch.bfloat16 and "loading in bf16" in caplog.text
    monkeypatch.setattr(loading, "available_memory", lambda: int(fp32_bytes * 0.3))
    with pytest.raises(CheckpointError, match="--quantize 4"):
        load_model_and_tokenizer(tiny_dir, device="cpu")
    model, _ = load_model_and_tokenizer(tiny_dir, device="cpu", quantize=4)  # fits: quantized while loading
    assert model.config.quantization_bit == 4


def test_a_ptuning_checkpoint_with_the_wrong_prefix_length_says_so(tiny_dir, tmp_path, capfd):
    config = ChatGLMConfig.from_pretrained(tiny_dir)
    config.pre_seq_len = 4
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, config=config, dtype=torch.float32)
    checkpoint = tmp_path / "prefix"
    checkpoint.mkdir()
    from safetensors.torch import save_file

    save_file({name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad},
              str(checkpoint / "model.safetensors"))
    loaded, _ = load_finetuned(str(checkpoint), tiny_dir)  # no config.json: the length is read off the weights
    assert loaded.config.pre_seq_len == 4
    assert "MISSING" not in capfd.readouterr().out + capfd.readouterr().err  # no load report for the prefix
    with pytest.raises(CheckpointError, match="pass --pre-seq-len 4"):
        load_finetuned(str(checkpoint), tiny_dir, pre_seq_len=8)


def test_tokenizer_keeps_custom_gmask_token(tiny_dir, tmp_path):
    copy = shutil.copytree(tiny_dir, tmp_path / "tok")
    ChatGLMTokenizer.from_pretrained(str(copy)).save_pretrained(str(copy))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    assert config["gmask_token"] == "[gMASK]"
    assert ChatGLMTokenizer.from_pretrained(str(copy)).gmask_token == "[gMASK]"
