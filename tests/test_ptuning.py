"""ptuning/: P-Tuning v2, LoRA and full fine-tuning runs of main.py on the tiny reference checkpoint, their
checkpoints, evaluation and metrics, and the shell scripts. About 20 s on 2 idle CPU cores."""
import json
import os
import shutil
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration, build_prompt
from conftest import ROOT
from ptuning import main as ptuning_main
from runtime.finetunes import checkpoint_kind, load_finetuned

TINY = os.path.join(ROOT, "tests", "fixtures", "reference", "tiny-chatglm")
ADGEN = os.path.join(ROOT, "ptuning", "data", "adgen_sample")
CHAT = os.path.join(ROOT, "ptuning", "data", "chat_sample")
PREFIX = "transformer.prefix_encoder."


def run_main(*args, data=ADGEN, columns=("content", "summary"), **options):
    """main.py in-process on the tiny checkpoint, CPU, no progress bars; options are --name value pairs."""
    argv = ["--model_name_or_path", TINY, "--prompt_column", columns[0], "--response_column", columns[1],
            "--max_source_length", "64", "--max_target_length", "64", "--use_cpu", "--disable_tqdm", "true",
            "--report_to", "none", "--seed", "0", *args]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    return ptuning_main.main(argv)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def predictions(output_dir):
    with open(os.path.join(output_dir, "generated_predictions.txt"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def ptuning_run(tmp_path_factory):
    """16 P-Tuning steps on 4 examples (a high learning rate: the tiny model is random), then generation on 6
    dev examples with the in-memory model."""
    out = str(tmp_path_factory.mktemp("pt"))
    trainer = run_main("--do_train", "--do_predict", "--predict_with_generate", train_file=f"{ADGEN}/train.json",
                       test_file=f"{ADGEN}/dev.json", output_dir=out, cache_dir=f"{out}/cache", pre_seq_len=8,
                       learning_rate=0.5, max_steps=16, save_steps=8, logging_steps=1, max_train_samples=4,
                       per_device_train_batch_size=4, max_predict_samples=6, per_device_eval_batch_size=3,
                       generation_max_length=96)
    return out, trainer


def test_ptuning_trains_only_the_prefix_encoder(ptuning_run):
    out, trainer = ptuning_run
    model = trainer.model
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(PREFIX) for name in trained)
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32
    base = ChatGLMForConditionalGeneration.from_pretrained(TINY, dtype=torch.float32).state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith(PREFIX):
            assert torch.equal(value, base[name]), name
    halfway = load_file(f"{out}/checkpoint-8/model.safetensors")
    final = load_file(f"{out}/checkpoint-16/model.safetensors")
    assert not torch.equal(halfway[PREFIX + "embedding.weight"], final[PREFIX + "embedding.weight"])
    assert torch.equal(final[PREFIX + "embedding.weight"], model.transformer.prefix_encoder.embedding.weight)


def test_ptuning_checkpoint_holds_prefix_and_trainer_state_only(ptuning_run):
    out, _ = ptuning_run
    checkpoint = f"{out}/checkpoint-16"
    assert set(os.listdir(checkpoint)) == {"model.safetensors", "config.json", "training_args.bin", "optimizer.pt",
                                           "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    with safe_open(f"{checkpoint}/model.safetensors", framework="pt") as f:
        assert list(f.keys()) == [PREFIX + "embedding.weight"]
        assert f.get_tensor(PREFIX + "embedding.weight").shape == (8, 3 * 2 * 48)
    assert os.path.getsize(f"{checkpoint}/model.safetensors") < 20_000
    assert read_json(f"{checkpoint}/config.json")["pre_seq_len"] == 8
    assert checkpoint_kind(checkpoint) == "ptuning"
    assert os.path.isfile(f"{out}/model.safetensors")  # the final model, saved at the end of training


def test_ptuning_loss_decreases(ptuning_run):
    out, _ = ptuning_run
    log = read_json(f"{out}/checkpoint-16/trainer_state.json")["log_history"]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5


def test_ptuning_resumes_from_a_checkpoint(ptuning_run, tmp_path):
    out, _ = ptuning_run
    shutil.copytree(f"{out}/checkpoint-8", tmp_path / "checkpoint-8")
    run_main("--do_train", train_file=f"{ADGEN}/train.json", output_dir=str(tmp_path), cache_dir=f"{tmp_path}/cache",
             resume_from_checkpoint=str(tmp_path / "checkpoint-8"), pre_seq_len=8, learning_rate=0.5, max_steps=16,
             save_steps=8, logging_steps=1, max_train_samples=4, per_device_train_batch_size=4)
    resumed = load_file(f"{tmp_path}/checkpoint-16/model.safetensors")
    assert torch.equal(resumed[PREFIX + "embedding.weight"],
                       load_file(f"{out}/checkpoint-16/model.safetensors")[PREFIX + "embedding.weight"])

    def curve(directory):  # step -> loss of the steps after the checkpoint
        log = read_json(f"{directory}/checkpoint-16/trainer_state.json")["log_history"]
        return {entry["step"]: entry["loss"] for entry in log if "loss" in entry and entry["step"] > 8}

    assert len(curve(tmp_path)) == 8 and curve(tmp_path) == curve(out)  # the same curve, step for step


def test_predict_writes_predictions_and_metrics(ptuning_run):
    out, _ = ptuning_run
    rows = predictions(out)
    assert len(rows) == 6 and all(set(row) == {"labels", "predict"} for row in rows)
    assert rows[0]["labels"].startswith("复古风格的水桶包")
    metrics = read_json(f"{out}/predict_results.json")
    for key in ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4"):
        assert 0 <= metrics[key] <= 100


def test_ptuning_checkpoint_reloads_to_the_same_predictions(ptuning_run, tmp_path):
    out, _ = ptuning_run
    run_main("--do_predict", "--predict_with_generate", test_file=f"{ADGEN}/dev.json", output_dir=str(tmp_path),
             cache_dir=f"{tmp_path}/cache", ptuning_checkpoint=f"{out}/checkpoint-16", max_predict_samples=6,
             per_device_eval_batch_size=3, generation_max_length=96)
    assert predictions(str(tmp_path)) == predictions(out)
    # The loader the front-ends use gives the same answer through chat().
    model, tokenizer = load_finetuned(f"{out}/checkpoint-16", TINY, device="cpu")
    trained = ptuning_run[1].model.eval()
    query = "类型#裙*颜色#白色"
    assert model.chat(tokenizer, query, do_sample=False, max_length=96)[0] == \
        trained.chat(tokenizer, query, do_sample=False, max_length=96)[0]


def test_history_column_builds_chat_prompts(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    from ptuning.arguments import DataTrainingArguments
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(TINY)
    data_args = DataTrainingArguments(train_file=f"{CHAT}/train.json", prompt_column="prompt",
                                      response_column="response", history_column="history",
                                      max_source_length=512, max_target_length=256)
    raw = ptuning_main.load_raw_datasets(data_args, cache_dir=str(tmp_path))
    encoded = ptuning_main.prepare(raw, "train", None,
                                   lambda e: ptuning_main.encode_for_loss(tokenizer, e, data_args, 256), data_args,
                                   Seq2SeqTrainingArguments(output_dir=str(tmp_path)))
    examples = list(raw["train"])
    assert any(len(e["history"]) >= 2 for e in examples) and any(not e["history"] for e in examples)
    for example, features in zip(examples, encoded):
        prompt = tokenizer.encode(build_prompt(example["prompt"], example["history"]), add_special_tokens=False)
        answer = tokenizer.encode(example["response"], add_special_tokens=False)
        assert features["input_ids"] == prompt + [tokenizer.gmask_token_id, tokenizer.bos_token_id] + answer + \
            [tokenizer.eos_token_id]
        assert features["labels"] == [-100] * (len(prompt) + 1) + features["input_ids"][len(prompt) + 1:]
    # A prompt too long for max_source_length loses its oldest turns, never the current question.
    data_args.max_source_length = 16
    example = next(e for e in examples if e["history"])
    ids = ptuning_main.prompt_ids(tokenizer, example, data_args)
    full = tokenizer.encode(build_prompt(example["prompt"], example["history"]), add_special_tokens=False)
    assert ids == full[-15:]


def test_lora_checkpoint_holds_adapters_only(tmp_path):
    out = str(tmp_path)
    run_main("--do_train", train_file=f"{ADGEN}/train.json", output_dir=out, cache_dir=f"{out}/cache", lora_rank=4,
             learning_rate=1e-2, max_steps=4, save_steps=4, max_train_samples=8, per_device_train_batch_size=4)
    checkpoint = f"{out}/checkpoint-4"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "ice_text.model"}
    adapters = load_file(f"{checkpoint}/adapter_model.safetensors")
    assert adapters and all("lora_" in name and "query_key_value" in name for name in adapters)
    assert checkpoint_kind(checkpoint) == "lora"
    merged, _ = load_finetuned(checkpoint, TINY, device="cpu")
    base = ChatGLMForConditionalGeneration.from_pretrained(TINY, dtype=torch.float32)
    assert type(merged) is ChatGLMForConditionalGeneration
    qkv = "transformer.layers.0.attention.query_key_value.weight"
    assert not torch.equal(merged.state_dict()[qkv], base.state_dict()[qkv])


def test_full_finetune_saves_a_whole_model(tmp_path):
    out = str(tmp_path)
    run_main("--do_train", train_file=f"{ADGEN}/train.json", output_dir=out, cache_dir=f"{out}/cache",
             learning_rate=1e-3, max_steps=2, save_steps=2, max_train_samples=4, per_device_train_batch_size=2)
    checkpoint = f"{out}/checkpoint-2"
    assert checkpoint_kind(checkpoint) == "full"
    model, _ = load_finetuned(checkpoint, device="cpu")
    assert model.config.use_cache  # saved ready for generation, though training ran without the cache
    base = ChatGLMForConditionalGeneration.from_pretrained(TINY, dtype=torch.float32)
    name = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    assert not torch.equal(model.state_dict()[name], base.state_dict()[name])


def test_ptuning_on_a_quantized_base(tmp_path):
    out = str(tmp_path)
    trainer = run_main("--do_train", train_file=f"{ADGEN}/train.json", output_dir=out, cache_dir=f"{out}/cache",
                       pre_seq_len=4, quantization_bit=4, learning_rate=0.5, max_steps=2, save_steps=2,
                       max_train_samples=4, per_device_train_batch_size=2)
    assert trainer.model.transformer.layers[0].attention.query_key_value.weight.dtype == torch.int8
    with safe_open(f"{out}/checkpoint-2/model.safetensors", framework="pt") as f:
        assert list(f.keys()) == [PREFIX + "embedding.weight"]


def test_score_matches_the_original_definition():
    perfect = ptuning_main.score(["这件衬衫非常宽松。"], ["这件衬衫非常宽松。"])
    assert perfect == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    empty = ptuning_main.score([""], ["这件衬衫非常宽松。"])
    assert empty == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    partial = ptuning_main.score(["这件衬衫很宽松", "白色的裙子"], ["这件衬衫非常宽松", "黑色的裙子"])
    assert all(0 < value < 100 for value in partial.values())


def test_train_sh_from_the_repository_root(tmp_path):
    env = dict(os.environ, MODEL=TINY, STEPS="2", BATCH="2", OUTPUT=str(tmp_path / "out"))
    result = subprocess.run(["bash", "ptuning/train.sh", "--max_train_samples", "4", "--use_cpu",
                             "--cache_dir", str(tmp_path / "cache")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint_kind(str(tmp_path / "out" / "checkpoint-2")) == "ptuning"


def test_ds_train_finetune_needs_deepspeed():
    # Debian's own python3 and a PATH without the deepspeed launcher: a machine without DeepSpeed.
    result = subprocess.run(["bash", "ptuning/ds_train_finetune.sh"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")})
    assert result.returncode != 0 and "needs DeepSpeed" in result.stderr


def test_gradient_accumulation_averages_the_loss(tmp_path):
    """4 examples as one batch or as 4 accumulated batches of 1: the same loss, not 4 times it."""
    losses = []
    for batch, accumulation in ((4, 1), (1, 4)):
        out = str(tmp_path / f"b{batch}")
        run_main("--do_train", train_file=f"{ADGEN}/train.json", output_dir=out, cache_dir=f"{out}/cache",
                 pre_seq_len=4, max_steps=1, logging_steps=1, save_steps=1, max_train_samples=4,
                 per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        log = read_json(f"{out}/trainer_state.json")["log_history"]
        losses.append(next(entry["loss"] for entry in log if "loss" in entry))
    assert abs(losses[0] - losses[1]) < 0.5, losses


# ---- the original's own command lines ---------------------------------------------------------------
# Each is the argument list of one of the original's ptuning/*.sh, adapted only in paths, model, sizes and
# step counts (and --use_cpu, since this machine has no GPU).

def original_train_sh(out):
    return ["--do_train", "--train_file", f"{ADGEN}/train.json", "--validation_file", f"{ADGEN}/dev.json",
            "--prompt_column", "content", "--response_column", "summary", "--overwrite_cache",
            "--model_name_or_path", TINY, "--output_dir", out, "--overwrite_output_dir", "--max_source_length", "64",
            "--max_target_length", "64", "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
            "--gradient_accumulation_steps", "2", "--predict_with_generate", "--max_steps", "2", "--logging_steps",
            "10", "--save_steps", "2", "--learning_rate", "2e-2", "--pre_seq_len", "8", "--quantization_bit", "4"]


def original_evaluate_sh(out, checkpoint):
    return ["--do_predict", "--validation_file", f"{ADGEN}/dev.json", "--test_file", f"{ADGEN}/dev.json",
            "--overwrite_cache", "--prompt_column", "content", "--response_column", "summary",
            "--model_name_or_path", TINY, "--ptuning_checkpoint", checkpoint, "--output_dir", out,
            "--overwrite_output_dir", "--max_source_length", "64", "--max_target_length", "64",
            "--per_device_eval_batch_size", "1", "--predict_with_generate", "--pre_seq_len", "8",
            "--quantization_bit", "4"]


def original_train_chat_sh(out):
    return ["--do_train", "--train_file", f"{CHAT}/train.json", "--validation_file", f"{CHAT}/dev.json",
            "--prompt_column", "prompt", "--response_column", "response", "--history_column", "history",
            "--overwrite_cache", "--model_name_or_path", TINY, "--output_dir", out, "--overwrite_output_dir",
            "--max_source_length", "256", "--max_target_length", "256", "--per_device_train_batch_size", "1",
            "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "2", "--predict_with_generate",
            "--max_steps", "2", "--logging_steps", "10", "--save_steps", "2", "--learning_rate", "2e-2",
            "--pre_seq_len", "8", "--quantization_bit", "4"]


def original_ds_train_finetune_sh(out):  # the arguments after `deepspeed ... main.py --deepspeed deepspeed.json`
    return ["--do_train", "--train_file", f"{ADGEN}/train.json", "--test_file", f"{ADGEN}/dev.json",
            "--prompt_column", "content", "--response_column", "summary", "--overwrite_cache",
            "--model_name_or_path", TINY, "--output_dir", out, "--overwrite_output_dir", "--max_source_length", "64",
            "--max_target_length", "64", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "1",
            "--gradient_accumulation_steps", "1", "--predict_with_generate", "--max_steps", "2", "--logging_steps",
            "10", "--save_steps", "2", "--learning_rate", "1e-4", "--fp16"]


def original_evaluate_finetune_sh(out, checkpoint):
    return ["--do_predict", "--validation_file", f"{ADGEN}/dev.json", "--test_file", f"{ADGEN}/dev.json",
            "--overwrite_cache", "--prompt_column", "content", "--response_column", "summary",
            "--model_name_or_path", checkpoint, "--output_dir", out, "--overwrite_output_dir",
            "--max_source_length", "64", "--max_target_length", "64", "--per_device_eval_batch_size", "1",
            "--predict_with_generate", "--fp16_full_eval"]


def run_original(argv, tmp_path, samples=("--max_train_samples", "4", "--max_predict_samples", "2")):
    return ptuning_main.main(argv + ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none",
                                     "--cache_dir", str(tmp_path / "cache"), *samples])


def test_the_original_scripts_argument_lists_run(tmp_path):
    pt, chat, ft = str(tmp_path / "pt"), str(tmp_path / "chat"), str(tmp_path / "ft")
    run_original(original_train_sh(pt), tmp_path)
    assert checkpoint_kind(f"{pt}/checkpoint-2") == "ptuning"
    run_original(original_train_sh(pt), tmp_path)  # again into the same directory, as --overwrite_output_dir says
    run_original(original_evaluate_sh(pt, f"{pt}/checkpoint-2"), tmp_path)
    assert len(predictions(pt)) == 2
    run_original(original_train_chat_sh(chat), tmp_path)
    assert checkpoint_kind(f"{chat}/checkpoint-2") == "ptuning"
    if shutil.which("deepspeed") is None:  # `--deepspeed deepspeed.json` without DeepSpeed: one line, no traceback
        with pytest.raises(SystemExit, match="--deepspeed needs the deepspeed package"):
            run_original(["--deepspeed", os.path.join(ROOT, "ptuning", "deepspeed.json"),
                          *original_ds_train_finetune_sh(ft)], tmp_path)
    run_original(original_ds_train_finetune_sh(ft), tmp_path)  # --fp16 on a CPU: fp32, with a warning
    assert checkpoint_kind(f"{ft}/checkpoint-2") == "full"
    run_original(original_evaluate_finetune_sh(ft, f"{ft}/checkpoint-2"), tmp_path)
    assert len(predictions(ft)) == 2


def test_the_original_web_demo_sh_command_line(tmp_path):
    """`python3 web_demo.py --model_name_or_path ... --ptuning_checkpoint ... --pre_seq_len N` in ptuning/."""
    import argparse

    from runtime.options import add_model_args

    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--model_name_or_path", TINY, "--ptuning_checkpoint", "ckpt", "--pre_seq_len", "8", "--quantization_bit", "4"])
    assert (args.model_path, args.ptuning_checkpoint, args.pre_seq_len, args.quantize) == (TINY, "ckpt", 8, 4)
    result = subprocess.run([sys.executable, "web_demo.py", "--help"], cwd=os.path.join(ROOT, "ptuning"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--model_name_or_path" in result.stdout, result.stderr[-2000:]


def test_the_same_seed_gives_the_same_curve_and_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        run_main("--do_train", "--do_predict", "--predict_with_generate", train_file=f"{ADGEN}/train.json",
                 test_file=f"{ADGEN}/dev.json", output_dir=out, cache_dir=f"{out}/cache", pre_seq_len=4,
                 learning_rate=0.5, max_steps=6, save_steps=6, logging_steps=1, max_train_samples=8,
                 per_device_train_batch_size=2, max_predict_samples=4, per_device_eval_batch_size=2,
                 generation_max_length=96)
        losses = [entry["loss"] for entry in read_json(f"{out}/trainer_state.json")["log_history"] if "loss" in entry]
        metrics = {k: v for k, v in read_json(f"{out}/predict_results.json").items() if "runtime" not in k
                   and "per_second" not in k}
        runs.append((losses, metrics, predictions(out)))
    assert len(runs[0][0]) == 6 and runs[0] == runs[1]


def test_metrics_equal_the_originals_recorded_numbers():
    """tests/fixtures/metrics_reference.json: what the original's compute_metrics gives on fixed pairs, among them
    an empty prediction (the original raised there; we score 0) and one of punctuation only."""
    recorded = read_json(os.path.join(ROOT, "tests", "fixtures", "metrics_reference.json"))["pairs"]
    scored = [pair for pair in recorded if pair["original_error"] is None]
    for pair in scored:
        assert ptuning_main.score([pair["prediction"]], [pair["reference"]]) == pair["original"], pair["prediction"]
    together = ptuning_main.score([p["prediction"] for p in scored], [p["reference"] for p in scored])
    for name, value in together.items():
        assert value == pytest.approx(sum(p["original"][name] for p in scored) / len(scored), abs=1e-9)
    empty = next(pair for pair in recorded if pair["prediction"] == "")
    assert "Hypothesis is empty" in empty["original_error"]
    assert ptuning_main.score([""], [empty["reference"]]) == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0,
                                                              "bleu-4": empty["original"]["bleu-4"]}


def test_decoding_gives_no_replacement_character_for_valid_tokens():
    """The demo vocabulary spells rare characters in byte-fallback pieces: every sample answer decodes back
    whole, and an answer cut inside a character (a generation at its length limit) loses that character
    rather than showing U+FFFD. (Bytes a model writes in an order that is no UTF-8 stay U+FFFD: they are
    no character.)"""
    from chatglm_6b.tokenization_chatglm import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer.from_pretrained(os.path.join(ROOT, "demo_model"))
    for path, column in ((f"{ADGEN}/dev.json", "summary"), (f"{ADGEN}/train.json", "summary"),
                         (f"{CHAT}/dev.json", "response")):
        with open(path, encoding="utf-8") as f:
            answers = [json.loads(line)[column] for line in f]
        for answer in answers:
            ids = tokenizer.encode(answer, add_special_tokens=False)
            # SentencePiece's NFKC normalisation is the one change (full-width "，" reads ",")
            assert ptuning_main.decode(tokenizer, np.array([ids])) == [unicodedata.normalize("NFKC", answer).strip()]
    ids = tokenizer.encode("碎花图案", add_special_tokens=False)  # 案 is three byte pieces here
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[-3:] == ["<0xE6>", "<0xA1>", "<0x88>"]
    for cut in (1, 2):
        assert ptuning_main.decode(tokenizer, np.array([ids[:-cut] + [-100] * cut])) == ["碎花图"]
