"""Seq2SeqTrainer for ChatGLM: checkpoints hold only what is trained, and evaluation returns the answers alone."""
import os

import torch
from safetensors.torch import save_file
from transformers import Seq2SeqTrainer
from transformers.trainer import TRAINING_ARGS_NAME

from runtime.loading import load_prefix_encoder
from runtime.saving import save_checkpoint


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


class ChatGLMTrainer(Seq2SeqTrainer):
    """Checkpoints by training mode:
    - P-Tuning v2: model.safetensors with the trainable (prefix-encoder) weights only, and config.json;
    - LoRA: the peft adapter (adapter_config.json, adapter_model.safetensors);
    - full fine-tune: a whole checkpoint made by runtime.saving.save_checkpoint (weights, config, tokenizer,
      model code);
    plus, in checkpoint-N/, the usual optimizer, scheduler, RNG and trainer state for --resume_from_checkpoint.
    """

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if is_peft(model):
            model.save_pretrained(output_dir)
        elif model.config.pre_seq_len is not None:
            # state_dict: the weights gathered from the ranks under DeepSpeed ZeRO-3 (each holds a shard)
            full = state_dict if state_dict is not None else dict(model.named_parameters())
            trained = {name: full[name].detach().cpu().contiguous()
                       for name, p in model.named_parameters() if p.requires_grad}
            save_file(trained, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
            model.config.save_pretrained(output_dir)
        else:
            # The Trainer turns the cache off for training; the saved model should generate with it.
            use_cache, model.config.use_cache = model.config.use_cache, True
            save_checkpoint(model, self.processing_class, output_dir, state_dict=state_dict)
            model.config.use_cache = use_cache
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model or self.model
        if not is_peft(model) and model.config.pre_seq_len is not None:
            load_prefix_encoder(model, resume_from_checkpoint)  # only the prefix is in the checkpoint
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """With --predict_with_generate: generate from the left-padded prompts and return only the new tokens
        (a decoder-only model's output starts with its prompt), with the reference answers as labels."""
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels", None)
        gen_kwargs = {k: v for k, v in {**getattr(self, "_gen_kwargs", {}), **gen_kwargs}.items() if v is not None}
        outputs = self.accelerator.unwrap_model(model).generate(**inputs, **gen_kwargs)
        return None, outputs[:, inputs["input_ids"].shape[1]:], labels
