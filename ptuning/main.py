#!/usr/bin/env python
"""Fine-tunes ChatGLM-6B on prompt/answer pairs and evaluates it with ROUGE and BLEU-4 (see README.md).

    --pre_seq_len N       P-Tuning v2: only the prefix encoder trains (the base may be --quantization_bit 4/8)
    --lora_rank R         LoRA (peft) on --lora_target: only the adapters train
    neither               full fine-tuning (see ds_train_finetune.sh for DeepSpeed)

    python ptuning/main.py --do_train --train_file ptuning/data/adgen_sample/train.json \
        --prompt_column content --response_column summary --output_dir ptuning/output/adgen-pt \
        --pre_seq_len 32 --learning_rate 1 --max_steps 200
    python ptuning/main.py --do_predict --predict_with_generate --test_file ptuning/data/adgen_sample/dev.json \
        --prompt_column content --response_column summary --output_dir ptuning/output/adgen-pt \
        --ptuning_checkpoint ptuning/output/adgen-pt   # the final weights; or one of its checkpoint-N/

Arguments are ModelArguments and DataTrainingArguments (arguments.py) and transformers' Seq2SeqTrainingArguments,
on the command line or in one JSON file (`python main.py args.json`).
"""
import importlib.util
import json
import logging
import os
import sys
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import transformers
from datasets import load_dataset
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainerCallback, set_seed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from chatglm_6b.modeling_chatglm import build_prompt  # noqa: E402
from chatglm_6b.tokenization_chatglm import glm_training_labels  # noqa: E402
from ptuning.arguments import IGNORED_OPTIONS, DataTrainingArguments, ModelArguments  # noqa: E402
from ptuning.trainer import ChatGLMTrainer  # noqa: E402
from runtime.finetunes import load_finetuned  # noqa: E402
from runtime.loading import CheckpointError, load_model_and_tokenizer  # noqa: E402

logger = logging.getLogger("ptuning")


# ---- data ----------------------------------------------------------------------------------------------

def prompt_text(example: dict, data_args: DataTrainingArguments) -> str:
    """The prompt exactly as chat() builds it: the bare query, or `[Round i]` turns with a history."""
    history = example[data_args.history_column] if data_args.history_column else None
    return data_args.source_prefix + build_prompt(example[data_args.prompt_column], history)


def prompt_ids(tokenizer, example: dict, data_args: DataTrainingArguments) -> List[int]:
    """Prompt tokens, leaving room for [gMASK] in max_source_length. A multi-turn prompt loses its oldest
    tokens (its end, the current question and 答：, must stay); a plain one its end, as in the original."""
    ids = tokenizer.encode(prompt_text(example, data_args), add_special_tokens=False)
    keep = data_args.max_source_length - 1
    return ids[-keep:] if data_args.history_column else ids[:keep]


def answer_ids(tokenizer, example: dict, data_args: DataTrainingArguments, max_target_length: int) -> List[int]:
    """Answer tokens, leaving room for <sop> and <eop> in max_target_length."""
    return tokenizer.encode(example[data_args.response_column], add_special_tokens=False)[: max_target_length - 2]


def encode_for_loss(tokenizer, example: dict, data_args: DataTrainingArguments, max_target_length: int) -> dict:
    """prompt [gMASK] <sop> answer <eop>, the layout chat() generates in; the loss covers <sop> answer <eop>."""
    input_ids = tokenizer.build_inputs_with_special_tokens(prompt_ids(tokenizer, example, data_args),
                                                           answer_ids(tokenizer, example, data_args, max_target_length))
    return {"input_ids": input_ids, "labels": glm_training_labels(input_ids, tokenizer.bos_token_id)}


def encode_for_generation(tokenizer, example: dict, data_args: DataTrainingArguments, max_target_length: int) -> dict:
    """prompt [gMASK] <sop> to generate from, and the reference answer's tokens as labels."""
    return {"input_ids": tokenizer.build_inputs_with_special_tokens(prompt_ids(tokenizer, example, data_args)),
            "labels": answer_ids(tokenizer, example, data_args, max_target_length)}


@dataclass
class Collator:
    """Left-pads input_ids with the tokenizer, which adds each example's GLM attention mask and position ids
    (so padding never changes what a token sees), and left-pads labels to the batch's width (the inputs' or
    the longest label's): for the loss they stay aligned with input_ids; for generation they are the
    reference answers, which decode() reads without the padding."""
    tokenizer: object
    label_pad_id: int = -100
    max_length: Optional[int] = None  # --pad_to_max_length: every batch this long

    def __call__(self, features: List[dict]) -> dict:
        batch = self.tokenizer.pad({"input_ids": [f["input_ids"] for f in features]}, return_tensors="pt",
                                   padding="max_length" if self.max_length else "longest", max_length=self.max_length)
        width = max([batch["input_ids"].shape[1]] + [len(f["labels"]) for f in features])
        batch["labels"] = torch.tensor([[self.label_pad_id] * (width - len(f["labels"])) + f["labels"]
                                        for f in features])
        return batch


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: Optional[str]):
    if data_args.dataset_name:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path}
    kind = "csv" if next(iter(files.values())).endswith(".csv") else "json"
    return load_dataset(kind, data_files=files, cache_dir=cache_dir)


def prepare(raw_datasets, split: str, limit: Optional[int], encode, data_args: DataTrainingArguments,
            training_args: Seq2SeqTrainingArguments):
    if split not in raw_datasets:
        sys.exit(f"error: there is no {split} data: pass --{split}_file.")
    dataset = raw_datasets[split]
    columns = [c for c in (data_args.prompt_column, data_args.response_column, data_args.history_column) if c]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        sys.exit(f"error: the {split} data has no column {missing[0]!r}; it has {dataset.column_names}.")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    with training_args.main_process_first(desc=f"{split} tokenisation"):
        # The original skips examples with an empty query or answer.
        dataset = dataset.filter(lambda e: bool(e[data_args.prompt_column]) and bool(e[data_args.response_column]))
        return dataset.map(encode, remove_columns=dataset.column_names, num_proc=data_args.preprocessing_num_workers,
                           load_from_cache_file=not data_args.overwrite_cache, desc=f"tokenising {split}")


# ---- metrics -------------------------------------------------------------------------------------------

def decode(tokenizer, ids: np.ndarray) -> List[str]:
    """Texts of generated answers or reference labels. -100 (label padding, the trainer's batch padding) and
    the special tokens are left out, and so is a character cut in half at the length limit."""
    specials = set(tokenizer.all_special_ids)
    rows = [[i for i in row if i >= 0 and i not in specials] for row in ids.tolist()]
    return [tokenizer.decode(tokenizer.without_partial_character(row)).strip() for row in rows]


def score(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """The original's metrics, averaged over examples and x100: ROUGE-1/2/L F1 on jieba words (rouge_chinese)
    and BLEU-4 on characters (nltk sentence_bleu, smoothing method 3)."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    rouge, smoothing = Rouge(), SmoothingFunction().method3
    scores = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for prediction, reference in zip(predictions, references):
        hypothesis_words, reference_words = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
        if hypothesis_words.strip() and reference_words.strip():
            for name, value in rouge.get_scores(hypothesis_words, reference_words)[0].items():
                scores[name].append(round(value["f"] * 100, 4))
        else:  # rouge_chinese refuses empty texts; an empty answer shares nothing with the reference
            for name in ("rouge-1", "rouge-2", "rouge-l"):
                scores[name].append(0.0)
        bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing) if prediction else 0.0
        scores["bleu-4"].append(round(bleu * 100, 4))
    return {name: float(np.mean(values)) for name, values in scores.items()}


# ---- main ----------------------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]] = None):
    given = sys.argv[1:] if argv is None else argv
    if any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in given) \
            and importlib.util.find_spec("deepspeed") is None:
        sys.exit("error: --deepspeed needs the deepspeed package (pip install deepspeed; see ds_train_finetune.sh), "
                 "which is not installed here.")
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)


def load_model(model_args: ModelArguments, training_args: Seq2SeqTrainingArguments, full_finetune: bool):
    # Full fine-tuning keeps fp32 master weights (--fp16 / DeepSpeed add mixed precision); everything else loads
    # in the loader's default, fp16 on GPUs and fp32 on CPU.
    options = dict(device=training_args.device.type, dtype=torch.float32 if full_finetune else None,
                   quantize=model_args.quantization_bit)
    try:
        if model_args.ptuning_checkpoint:
            model, tokenizer = load_finetuned(model_args.ptuning_checkpoint, model_args.model_name_or_path,
                                              pre_seq_len=model_args.pre_seq_len,
                                              prefix_projection=model_args.prefix_projection or None, **options)
        else:
            model, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path,
                                                        pre_seq_len=model_args.pre_seq_len,
                                                        prefix_projection=model_args.prefix_projection, **options)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    if not training_args.do_train:
        return model, tokenizer
    if model_args.pre_seq_len:  # the loader has frozen everything but the prefix
        model.transformer.prefix_encoder.float()  # the trained part stays fp32 even on an fp16 base
    elif model_args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=model_args.lora_rank, lora_alpha=model_args.lora_alpha,
                                                 lora_dropout=model_args.lora_dropout, task_type="CAUSAL_LM",
                                                 target_modules=model_args.lora_target.split(",")))
    def size(param):  # ZeRO-3 has partitioned the weights already: their full size is ds_numel
        return getattr(param, "ds_numel", param.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    logger.info(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    return model, tokenizer


def check_args(model_args: ModelArguments, data_args: DataTrainingArguments,
               training_args: Seq2SeqTrainingArguments) -> Seq2SeqTrainingArguments:
    """Refuses what cannot run; returns the training arguments, adjusted to this machine."""
    for args in (model_args, data_args):
        for name, default in IGNORED_OPTIONS.items():
            if hasattr(args, name) and getattr(args, name) != default:
                logger.warning(f"--{name} is accepted for compatibility and ignored.")
    if training_args.device.type == "cpu":  # the original's scripts say --fp16 for their GPUs
        asked = [flag for flag in ("fp16", "fp16_full_eval") if getattr(training_args, flag)]
        for flag in asked:
            logger.warning(f"--{flag} needs a GPU: on this CPU the model trains and evaluates in fp32.")
        if asked:  # made anew, so that what was derived from --fp16 (mixed precision, DeepSpeed's config) follows
            training_args = dataclasses.replace(training_args, **{flag: False for flag in asked})
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        sys.exit("error: nothing to do: pass --do_train, --do_eval and/or --do_predict.")
    if model_args.pre_seq_len and model_args.lora_rank:
        sys.exit("error: choose one of --pre_seq_len (P-Tuning v2) and --lora_rank (LoRA).")
    if model_args.pre_seq_len and not (training_args.do_train or model_args.ptuning_checkpoint):
        sys.exit("error: evaluating P-Tuning needs the trained prefix: pass --ptuning_checkpoint.")
    if training_args.do_train and model_args.quantization_bit and not model_args.pre_seq_len:
        sys.exit("error: quantized weights cannot be trained: use --quantization_bit with --pre_seq_len (P-Tuning), "
                 "or for evaluation only.")
    if training_args.do_predict and not training_args.predict_with_generate:
        sys.exit("error: --do_predict generates answers: add --predict_with_generate.")
    return training_args


class ReleaseDeepSpeedSharedMemory(TrainerCallback):
    """DeepSpeed's CPU all-reduce maps one /dev/shm file per process (69 MB) and never removes it: every CPU run
    kept 69 MB of RAM per process in /dev/shm until a reboot. When training starts every process has mapped every
    file (DeepSpeed's start, before the barrier), so each unlinks its own; the mappings live on until it exits."""

    def on_train_begin(self, args, state, control, **kwargs):
        if not args.deepspeed or args.device.type != "cpu" or not torch.distributed.is_initialized():
            return
        torch.distributed.barrier()
        name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
        if os.path.exists(name):
            os.unlink(name)


def main(argv: Optional[List[str]] = None) -> ChatGLMTrainer:
    """Runs what the arguments ask for; returns the trainer (its model included) for programmatic use."""
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING, force=True)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    training_args = check_args(model_args, data_args, training_args)
    set_seed(training_args.seed)

    full_finetune = training_args.do_train and not (model_args.pre_seq_len or model_args.lora_rank)
    model, tokenizer = load_model(model_args, training_args, full_finetune)
    raw_datasets = load_raw_datasets(data_args, model_args.cache_dir)

    def for_loss(max_target_length):
        return lambda example: encode_for_loss(tokenizer, example, data_args, max_target_length)

    def for_generation(max_target_length):
        return lambda example: encode_for_generation(tokenizer, example, data_args, max_target_length)

    train_dataset = eval_dataset = predict_dataset = None
    if training_args.do_train:
        train_dataset = prepare(raw_datasets, "train", data_args.max_train_samples,
                                for_loss(data_args.max_target_length), data_args, training_args)
        logger.info(f"first training example: {tokenizer.decode(train_dataset[0]['input_ids'])!r}")
    if training_args.do_eval:
        # Without --predict_with_generate, evaluation measures the loss on prompt + answer.
        encode = for_generation if training_args.predict_with_generate else for_loss
        eval_dataset = prepare(raw_datasets, "validation", data_args.max_eval_samples,
                               encode(data_args.val_max_target_length), data_args, training_args)
    if training_args.do_predict:
        predict_dataset = prepare(raw_datasets, "test", data_args.max_predict_samples,
                                  for_generation(data_args.val_max_target_length), data_args, training_args)

    def compute_metrics(eval_prediction):
        return score(decode(tokenizer, eval_prediction.predictions), decode(tokenizer, eval_prediction.label_ids))

    # Generation: at most generation_max_length tokens in all (prompt + answer), 512 as in the original;
    # deterministic (greedy or --num_beams) unless --do_sample.
    training_args.generation_max_length = training_args.generation_max_length or 512
    if training_args.predict_with_generate and training_args.generation_max_length <= data_args.max_source_length + 1:
        sys.exit(f"error: --generation_max_length {training_args.generation_max_length} counts the prompt too: "
                 f"make it longer than --max_source_length + 1 = {data_args.max_source_length + 1}.")
    training_args.generation_num_beams = data_args.num_beams or training_args.generation_num_beams or 1
    training_args.dataloader_pin_memory &= training_args.device.type != "cpu"  # nothing to pin for on CPU
    if training_args.ddp_find_unused_parameters is None:  # torchrun: every trainable weight takes part in the loss
        training_args.ddp_find_unused_parameters = False
    sampling = dict(do_sample=True, top_p=data_args.top_p, temperature=data_args.temperature) \
        if data_args.do_sample else {}
    trainer = ChatGLMTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=Collator(tokenizer, label_pad_id=-100 if data_args.ignore_pad_token_for_loss
                               else tokenizer.pad_token_id,
                               max_length=data_args.max_source_length + data_args.max_target_length
                               if data_args.pad_to_max_length else None),
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
        callbacks=[ReleaseDeepSpeedSharedMemory()])

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # the final weights, in the same format as the checkpoints
        metrics = {**result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = {**trainer.evaluate(metric_key_prefix="eval", **sampling), "eval_samples": len(eval_dataset)}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        results = trainer.predict(predict_dataset, metric_key_prefix="predict", **sampling)
        metrics = {**results.metrics, "predict_samples": len(predict_dataset)}
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        if trainer.is_world_process_zero():
            path = os.path.join(training_args.output_dir, "generated_predictions.txt")
            with open(path, "w", encoding="utf-8") as f:
                for label, prediction in zip(decode(tokenizer, results.label_ids),
                                             decode(tokenizer, results.predictions)):
                    f.write(json.dumps({"labels": label, "predict": prediction}, ensure_ascii=False) + "\n")
            logger.info(f"predictions written to {path}")
    return trainer


if __name__ == "__main__":
    main()
