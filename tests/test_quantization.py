"""Model-level INT8/INT4: accuracy on the demo checkpoint, quantize-while-loading, saved and pre-quantized checkpoints."""
import json
import os

import pytest
import torch

from benchmarks.bench_accuracy import argmax_agreement
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration
from chatglm_6b.quantization import QuantizedEmbedding, QuantizedLinear
from conftest import ROOT, write_sharded_bin
from test_demo_model import HELLO_REPLY
from tools.train_demo_model import load_corpus
from runtime.loading import WeightFile, load_model_and_tokenizer
from runtime.saving import save_checkpoint


@pytest.fixture(scope="module")
def fp32_demo():
    return load_model_and_tokenizer(device="cpu")


@pytest.mark.parametrize("bits,embeddings,target", [(8, False, 0.99), (4, False, 0.95), (8, True, 0.99), (4, True, 0.95)])
def test_accuracy_on_the_demo_corpus(fp32_demo, bits, embeddings, target):
    """Within the issue's bounds, with and without --quantize-embeddings (benchmarks/bench_accuracy.py measures
    every path on the whole corpus)."""
    reference, tokenizer = fp32_demo
    quantized, _ = load_model_and_tokenizer(device="cpu", quantize=bits, quantize_embeddings=embeddings)
    assert all(isinstance(layer.attention.query_key_value, QuantizedLinear) for layer in quantized.transformer.layers)
    assert isinstance(quantized.transformer.word_embeddings, QuantizedEmbedding) == embeddings
    if embeddings:  # one quantized table for both ends, as the original -qe model
        assert quantized.lm_head.weight is quantized.transformer.word_embeddings.weight
        assert quantized.lm_head.weight_scale is quantized.transformer.word_embeddings.weight_scale
    examples = load_corpus()[::4]  # every 4th example keeps the test quick; the benchmark covers them all
    assert argmax_agreement(reference, quantized, tokenizer, examples) >= target
    if bits == 8:
        assert quantized.chat(tokenizer, "你好", do_sample=False)[0] == HELLO_REPLY


def test_quantize_while_loading_equals_quantize_after_loading(fp32_demo):
    model, tokenizer = fp32_demo
    streamed, _ = load_model_and_tokenizer(device="cpu", quantize=4)
    after = ChatGLMForConditionalGeneration.from_pretrained(os.path.join(ROOT, "demo_model"), dtype=torch.float32)
    after.quantize(4)
    for (name, a), (_, b) in zip(streamed.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a, b), name


def test_quantized_checkpoint_reloads_without_quantizing_again(tmp_path):
    model, tokenizer = load_model_and_tokenizer(device="cpu", quantize=4)
    save_checkpoint(model, tokenizer, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["quantization_bit"] == 4
    reloaded, _ = load_model_and_tokenizer(str(tmp_path), device="cpu")
    assert reloaded.transformer.layers[0].mlp.dense_h_to_4h.weight.dtype == torch.int8
    inputs = tokenizer(["你好"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def original_int4_checkpoint(tiny, tiny_dir, directory):
    """A THUDM/chatglm-6b-int4-style directory: config quantization_bit 4, pytorch_model.bin with int8 `weight`
    [out, in/2] and fp16 `weight_scale` per quantized linear, fp16 everything else. Returns the model it came from."""
    model, tokenizer = tiny
    quantized = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).quantize(4)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in quantized.state_dict().items()}
    assert state["transformer.layers.0.attention.dense.weight"].dtype == torch.int8
    torch.save(state, directory / "pytorch_model.bin")
    config = json.load(open(os.path.join(tiny_dir, "config.json")))
    config["quantization_bit"] = 4
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(directory))
    return quantized


def test_original_int4_layout_loads(tiny, tiny_dir, tmp_path, monkeypatch):
    from chatglm_6b import kernels

    # fp32 activations: rounding them to int8 would turn the fp16 rounding of the other weights into whole steps
    monkeypatch.setattr(kernels.settings, "activations", "fp32")
    quantized = original_int4_checkpoint(tiny, tiny_dir, tmp_path)
    loaded, tokenizer = load_model_and_tokenizer(str(tmp_path), device="cpu")
    assert isinstance(loaded.transformer.layers[1].mlp.dense_4h_to_h, QuantizedLinear)
    inputs = tokenizer(["你好"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, quantized(**inputs).logits, atol=2e-2, rtol=2e-2)


def test_fp32_activations_compute_as_the_original_cpu_code_on_an_int4_checkpoint(tiny, tiny_dir, tmp_path,
                                                                                 monkeypatch):
    """The original's CPU path for a quantized linear decodes the weight to fp32 (q * scale) and multiplies in fp32:
    with activations "fp32", a pre-quantized -int4 checkpoint gives those logits within 1e-5, whatever the number of
    rows (the kernel's few-row and many-row paths)."""
    import copy

    from chatglm_6b import kernels
    from chatglm_6b.quantization import dequantize_weight

    monkeypatch.setattr(kernels.settings, "activations", "fp32")
    original_int4_checkpoint(tiny, tiny_dir, tmp_path)
    loaded, tokenizer = load_model_and_tokenizer(str(tmp_path), device="cpu", dtype=torch.float32)
    decoded = copy.deepcopy(loaded)
    for layer in decoded.transformer.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, QuantizedLinear):
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                linear.weight.data = dequantize_weight(module.weight, module.weight_scale.float(), module.bits)
                if module.bias is not None:
                    linear.bias.data = module.bias.float()
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], linear)
    for text in ("你好", "晚上睡不着应该怎么办？请给我一些建议，越详细越好。"):
        inputs = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, decoded(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_front_end_options_reach_the_loader():
    """`--device cpu --dtype bf16 --quantize 8`, as the README's CPU deployment command gives them."""
    import argparse

    from runtime.options import add_model_args, load_from_args

    args = add_model_args(argparse.ArgumentParser()).parse_args(["--device", "cpu", "--dtype", "bf16", "--quantize", "8"])
    model, tokenizer = load_from_args(args)
    qkv = model.transformer.layers[0].attention.query_key_value
    assert isinstance(qkv, QuantizedLinear) and qkv.weight.dtype == torch.int8 and qkv.weight_scale.dtype == torch.bfloat16
    assert model.transformer.word_embeddings.weight.dtype == torch.bfloat16
    response, _ = model.chat(tokenizer, "你好", history=[], do_sample=False)
    assert response


def test_activations_option_chooses_the_kernels_passes(monkeypatch):
    """`--activations int8`: the quantized layers take one int8 pass (the kernel's one-pass result, which differs
    from two passes'), as CHATGLM_ACTIVATIONS=int8 does; an unknown value is refused by the parser."""
    import argparse

    from chatglm_6b import kernels
    from runtime.options import add_model_args, load_from_args

    built = kernels.cpu_kernels()
    if built is None or not built.integer_path:
        pytest.skip("this build has no integer path")
    monkeypatch.setattr(kernels.settings, "activations", kernels.settings.activations)  # restored afterwards
    parser = add_model_args(argparse.ArgumentParser())
    args = parser.parse_args(["--device", "cpu", "--dtype", "bf16", "--quantize", "4", "--activations", "int8"])
    model, tokenizer = load_from_args(args)
    assert kernels.settings.activations == "int8"
    qkv = model.transformer.layers[0].attention.query_key_value
    x = torch.randn(3, qkv.in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    one, two = (built.ops.linear(x, qkv.weight, qkv.weight_scale, qkv.bias, 4, passes) for passes in (1, 2))
    assert not torch.equal(one, two)
    with torch.no_grad():
        assert torch.equal(qkv(x), one)
    response, _ = model.chat(tokenizer, "你好", history=[], do_sample=False)
    assert response
    with pytest.raises(SystemExit):
        parser.parse_args(["--activations", "int4"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [8, 4])
def test_cuda_chain_matches_the_cpu_model(fp32_demo, bits):
    """The original's chain `.quantize(bits).half().cuda()`: on the GPU the reply equals the CPU model's
    quantized reply, and the logits stay close to it."""
    model, tokenizer = fp32_demo
    cpu = ChatGLMForConditionalGeneration.from_pretrained(os.path.join(ROOT, "demo_model"), dtype=torch.float32).quantize(bits)
    gpu = ChatGLMForConditionalGeneration.from_pretrained(os.path.join(ROOT, "demo_model"), dtype=torch.float32)
    gpu = gpu.quantize(bits).half().cuda().eval()
    ids = tokenizer(["你好"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = cpu(input_ids=ids).logits
        got = gpu(input_ids=ids.cuda()).logits.float().cpu()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert gpu.chat(tokenizer, "你好", history=[], do_sample=False)[0] == HELLO_REPLY


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_while_loading_the_original_bin_layout(tiny, tiny_dir, tmp_path, bits):
    """Sharded fp16 .bin files, read memory-mapped with each tensor's pages dropped after use, give exactly
    the model that quantizing the fp16 model after a plain load gives (the loaded one keeps fp32 scales)."""
    out, _ = write_sharded_bin(tiny[0], tiny_dir, str(tmp_path / "sharded"))
    expected = ChatGLMForConditionalGeneration.from_pretrained(out, dtype=torch.float16).quantize(bits).state_dict()
    loaded, _ = load_model_and_tokenizer(out, device="cpu", quantize=bits)
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert state["transformer.layers.0.mlp.dense_4h_to_h.weight"].dtype == torch.int8
    for name, value in expected.items():
        assert torch.equal(state[name].float(), value.float()), name


def test_weights_read_again_after_their_pages_were_dropped(tiny, tiny_dir, tmp_path):
    out, state = write_sharded_bin(tiny[0], tiny_dir, str(tmp_path / "sharded"))
    read = {}
    for file in sorted(os.listdir(out)):
        if file.endswith(".bin"):
            read.update(WeightFile(os.path.join(out, file)).tensors())  # every tensor's pages dropped as it goes
    assert read.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(read[name], value), name


def test_one_quantization_rule_whatever_the_dtype_the_weights_come_in():
    """The original's `model.half().quantize(bits)` arithmetic (fp16 scale, fp16 quotient) for fp16 and fp32
    copies of the same weights alike (a fp32 division put a few weights per thousand one step off)."""
    from chatglm_6b.quantization import quantize_weight, unpack_int4

    torch.manual_seed(0)
    w16 = (torch.randn(96, 512) * 0.02).half()
    for bits in (8, 4):
        qmax = 2 ** (bits - 1) - 1
        scale = (w16.abs().amax(dim=-1) / qmax).half()
        expected = torch.round(w16 / scale[:, None]).clamp(-qmax - 1, qmax).to(torch.int8)
        for weight in (w16, w16.float()):
            q, got_scale = quantize_weight(weight, bits)
            assert torch.equal(got_scale, scale)
            assert torch.equal(unpack_int4(q) if bits == 4 else q, expected), (bits, weight.dtype)


def test_a_qe_checkpoint_without_lm_head_reloads(fp32_demo, tmp_path):
    """-qe: the word embeddings are quantized too and lm_head shares their int4 table and scales, so the
    saved checkpoint holds no lm_head.* (as the original's -qe checkpoints); it reloads, here and through
    transformers' remote code, and chats as before."""
    from transformers import AutoModel

    from safetensors import safe_open

    model, tokenizer = load_model_and_tokenizer(device="cpu")
    model.quantize(4, quantize_embeddings=True)
    save_checkpoint(model, tokenizer, str(tmp_path / "qe"))
    with safe_open(str(tmp_path / "qe" / "model.safetensors"), framework="pt") as f:
        assert not [name for name in f.keys() if name.startswith("lm_head.")]
    expected = model.chat(tokenizer, "你好", do_sample=False)[0]
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "qe"), device="cpu")
    assert reloaded.lm_head.weight_scale is reloaded.transformer.word_embeddings.weight_scale
    assert reloaded.chat(tokenizer, "你好", do_sample=False)[0] == expected
    remote = AutoModel.from_pretrained(str(tmp_path / "qe"), trust_remote_code=True, dtype=torch.float32).eval()
    assert remote.chat(tokenizer, "你好", do_sample=False)[0] == expected


def test_bf16_on_the_cpu_kernel_answers_as_torch_does(monkeypatch):
    """A bf16 CPU model runs its few-row products on the CPU kernel (loaded while loading): on the demo corpus
    its next-token argmax agrees with torch's bf16 matmul, and it greets as the fp32 model does."""
    from chatglm_6b import kernels

    model, tokenizer = load_model_and_tokenizer(device="cpu", dtype=torch.bfloat16)
    loaded = kernels.loaded_cpu_kernels()
    assert loaded, "loading a bf16 model on the CPU readies the kernel"
    calls, ops = [], loaded.ops
    monkeypatch.setattr(loaded, "ops", type("Counting", (), {
        "bf16_linear": staticmethod(lambda *a: calls.append("linear") or ops.bf16_linear(*a)),
        "decode_attention": staticmethod(lambda *a: calls.append("attention") or ops.decode_attention(*a))})())

    def torch_matmul(**inputs):
        with monkeypatch.context() as m:
            m.setattr(kernels.settings, "torch_only", True)
            return model(**inputs)

    assert argmax_agreement(torch_matmul, model, tokenizer, load_corpus()[::4]) >= 0.99
    assert "linear" in calls, "the kernel ran"
    assert model.chat(tokenizer, "你好", do_sample=False)[0] == HELLO_REPLY
    assert "attention" in calls, "decoding steps took the kernel's attention"


def test_quantization_embeddings_on_a_float_checkpoint_waits_for_quantize(tmp_path):
    """The original -qe code's way: from_pretrained(<float checkpoint>, quantization_embeddings=True) loads the
    float model (it raised AttributeError while tying lm_head's weight_scale), and quantize(4) then quantizes the
    embeddings with the rest, as the -qe checkpoints are."""
    model = ChatGLMForConditionalGeneration.from_pretrained(os.path.join(ROOT, "demo_model"),
                                                            quantization_embeddings=True)
    assert not model.quantized and model.lm_head.weight is model.transformer.word_embeddings.weight
    model.quantize(4)
    assert isinstance(model.transformer.word_embeddings, QuantizedEmbedding)
    assert model.lm_head.weight_scale is model.transformer.word_embeddings.weight_scale
    expected, tokenizer = load_model_and_tokenizer(device="cpu")
    expected.quantize(4, quantize_embeddings=True)
    assert model.chat(tokenizer, "你好", do_sample=False)[0] == expected.chat(tokenizer, "你好", do_sample=False)[0]


def test_quantize_embeddings_option_reaches_the_loader_and_is_refused_alone(tmp_path):
    """`--quantize 4 --quantize-embeddings` quantizes while loading exactly as `model.quantize(4,
    quantize_embeddings=True)` (the original -qe model's way); without --quantize it stops with one line; a
    checkpoint quantized without its embeddings is refused with the reason."""
    import argparse
    import subprocess
    import sys

    from runtime.loading import CheckpointError
    from runtime.options import add_model_args, load_from_args

    args = add_model_args(argparse.ArgumentParser()).parse_args(["--device", "cpu", "--quantize", "4",
                                                                 "--quantize-embeddings"])
    model, tokenizer = load_from_args(args)
    expected, _ = load_model_and_tokenizer(device="cpu")
    expected.quantize(4, quantize_embeddings=True)
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.config.quantization_embeddings
    save_checkpoint(model, tokenizer, str(tmp_path / "qe"))
    int4, _ = load_model_and_tokenizer(device="cpu", quantize=4)
    save_checkpoint(int4, tokenizer, str(tmp_path / "int4"))
    with pytest.raises(CheckpointError, match="without its embeddings"):
        load_model_and_tokenizer(str(tmp_path / "int4"), device="cpu", quantize=4, quantize_embeddings=True)
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "qe"), device="cpu", quantize=4, quantize_embeddings=True)
    assert isinstance(reloaded.transformer.word_embeddings, QuantizedEmbedding)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "cli_demo.py"), "--quantize-embeddings"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "--quantize-embeddings needs --quantize" in r.stderr


def test_the_outlier_model_computes_the_same_function_with_outlier_channels():
    """bench_accuracy --outliers: scaling value rows of query_key_value and dividing dense's columns leaves the
    logits as they were, while the dense inputs gain channels OUTLIER_RATIO times the median channel."""
    from benchmarks.bench_accuracy import OUTLIER_RATIO, dense_inputs, logits_over, with_outlier_channels

    model, tokenizer = load_model_and_tokenizer(device="cpu")
    examples = load_corpus()[:12]
    before = logits_over(model, tokenizer, examples)
    typical = [x.abs().mean(0).max() / x.abs().mean(0).median() for x in dense_inputs(model, tokenizer, examples)]
    ratios = with_outlier_channels(model, tokenizer, examples)
    after = logits_over(model, tokenizer, examples)
    assert all(torch.allclose(a, b, atol=2e-3, rtol=1e-4) for a, b in zip(before, after))
    assert all(r == pytest.approx(OUTLIER_RATIO, rel=0.05) for r in ratios) and max(typical) < OUTLIER_RATIO / 4


def test_activation_schemes_quantize_as_the_kernel_does():
    from benchmarks.bench_accuracy import outliers_in_bf16, quantized_groups

    torch.manual_seed(0)
    x = torch.randn(3, 256)
    x[1, 7] = 50.0
    per_128 = quantized_groups(x, 128)
    block = x[1, :128]
    step = block.abs().max() / 127
    assert torch.allclose(per_128[1, :128], torch.round(block / step) * step)
    assert (per_128 - x).abs().max() <= x.abs().max() / 127 / 2 + 1e-6
    assert torch.equal(quantized_groups(x, 0)[0], quantized_groups(x[:1], 256)[0])  # per token = one group a row
    two_passes = quantized_groups(x, 128, passes=2)  # the default int8x2: the residual at 1/256 of the step
    assert (two_passes - x).abs().max() <= x.abs().max() / 127 / 256 / 2 + 1e-6
    kept = outliers_in_bf16(x)
    assert kept[1, 7] == torch.tensor(50.0).bfloat16().float()  # the outlier channel is not quantized
    assert (kept - x)[1].abs().max() < (per_128 - x)[1].abs().max() / 4  # and no longer widens its block's step
