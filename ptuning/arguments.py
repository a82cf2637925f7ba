"""Command-line options of ptuning/main.py, parsed by HfArgumentParser together with Seq2SeqTrainingArguments.

The names are the original's, so its command lines keep working. A few options only made sense for the
Hugging Face summarisation example the original started from; they are accepted and, when set, a warning
says they are ignored (IGNORED_OPTIONS).
"""
from dataclasses import dataclass, field
from typing import Optional

from chatglm_6b.modeling_chatglm import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from runtime.loading import DEMO_MODEL_PATH


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEMO_MODEL_PATH,
        metadata={"help": "base checkpoint directory or hub id (default: the demo checkpoint; THUDM/chatglm-6b for "
                          "the real model), or the directory of a full fine-tune checkpoint"})
    ptuning_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "a checkpoint of this script to evaluate or continue from: P-Tuning (prefix "
                                        "weights) or LoRA (adapter), applied on top of --model_name_or_path"})
    config_name: Optional[str] = field(default=None, metadata={"help": "ignored: the checkpoint's config is used"})
    tokenizer_name: Optional[str] = field(default=None,
                                          metadata={"help": "ignored: the checkpoint's tokenizer is used"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "cache directory of the datasets library"})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "ignored: ChatGLM has a slow tokenizer only"})
    model_revision: str = field(default="main", metadata={"help": "ignored: pass a local directory instead"})
    use_auth_token: bool = field(default=False, metadata={"help": "ignored: log in with `hf auth login` instead"})
    resize_position_embeddings: Optional[bool] = field(default=None, metadata={"help": "ignored (rotary positions)"})
    quantization_bit: Optional[int] = field(
        default=None, metadata={"help": "4 or 8: quantize the frozen base model (P-Tuning and evaluation only)"})
    pre_seq_len: Optional[int] = field(
        default=None, metadata={"help": "P-Tuning v2: number of prefix tokens; only the prefix encoder is trained"})
    prefix_projection: bool = field(
        default=False, metadata={"help": "P-Tuning v2: a two-layer MLP produces the prefix (P-Tuning v2's "
                                         "reparameterisation) instead of one embedding per token"})
    lora_rank: Optional[int] = field(default=None, metadata={"help": "LoRA: rank of the adapters; only they train"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA: scaling numerator (scale = alpha / rank)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA: dropout on the adapter input"})
    lora_target: str = field(default="query_key_value",
                             metadata={"help": "LoRA: comma-separated names of the linear layers to adapt"})


@dataclass
class DataTrainingArguments:
    lang: Optional[str] = field(default=None, metadata={"help": "ignored (a summarisation-example option)"})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "a dataset of the datasets library"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "configuration of --dataset_name"})
    prompt_column: Optional[str] = field(default=None,
                                         metadata={"help": "column of the query (default: --text_column)"})
    response_column: Optional[str] = field(default=None,
                                           metadata={"help": "column of the answer (default: --summary_column)"})
    history_column: Optional[str] = field(
        default=None, metadata={"help": "column of earlier [query, answer] turns: the prompt is built exactly as "
                                        "chat() builds it ([Round i] turns)"})
    summary_column: Optional[str] = field(default=None, metadata={"help": "alias of --response_column"})
    text_column: Optional[str] = field(default=None, metadata={"help": "alias of --prompt_column"})
    train_file: Optional[str] = field(default=None, metadata={"help": "JSON lines (or CSV) training data"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "JSON lines (or CSV) data for --do_eval"})
    test_file: Optional[str] = field(default=None, metadata={"help": "JSON lines (or CSV) data for --do_predict"})
    overwrite_cache: bool = field(default=False, metadata={"help": "re-tokenise instead of using the datasets cache"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "accepted as in the original's scripts (transformers 5 dropped the flag): "
                                         "the output directory is written into whether or not it exists"})
    preprocessing_num_workers: Optional[int] = field(default=None, metadata={"help": "processes for tokenising"})
    max_source_length: int = field(default=1024, metadata={"help": "prompt tokens, [gMASK] included; longer "
                                                                   "prompts are truncated"})
    max_target_length: int = field(default=128, metadata={"help": "answer tokens, <sop> and <eop> included; "
                                                                  "longer answers are truncated"})
    val_max_target_length: Optional[int] = field(
        default=None, metadata={"help": "--max_target_length for the reference answers of evaluation (default: "
                                        "--max_target_length)"})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "pad every batch to the maximum length instead of its longest example"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N training examples"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N eval examples"})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "use only the first N test examples"})
    num_beams: Optional[int] = field(default=None, metadata={"help": "beam search width for evaluation (default: "
                                                                     "--generation_num_beams, else greedy)"})
    ignore_pad_token_for_loss: bool = field(default=True,
                                            metadata={"help": "padding does not count in the loss"})
    source_prefix: Optional[str] = field(default="", metadata={"help": "text put before every prompt"})
    forced_bos_token: Optional[str] = field(default=None, metadata={"help": "ignored (an mBART option)"})
    do_sample: bool = field(default=False, metadata={"help": "sample during evaluation (default: deterministic "
                                                             "greedy or beam search)"})
    top_p: float = field(default=DEFAULT_TOP_P, metadata={"help": "nucleus sampling threshold with --do_sample"})
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={"help": "sampling temperature with --do_sample"})

    def __post_init__(self):
        if not (self.dataset_name or self.train_file or self.validation_file or self.test_file):
            raise ValueError("Need --dataset_name or a --train_file / --validation_file / --test_file.")
        for path in (self.train_file, self.validation_file, self.test_file):
            if path is not None and path.rsplit(".", 1)[-1] not in ("json", "jsonl", "csv"):
                raise ValueError(f"{path}: data files must be .json / .jsonl (JSON lines) or .csv.")
        self.prompt_column = self.prompt_column or self.text_column
        self.response_column = self.response_column or self.summary_column
        if not (self.prompt_column and self.response_column):
            raise ValueError("Need --prompt_column and --response_column (the keys of query and answer).")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


# Options accepted for compatibility only, with their defaults: main.py warns when one is set.
IGNORED_OPTIONS = {"config_name": None, "tokenizer_name": None, "use_fast_tokenizer": True, "model_revision": "main",
                   "use_auth_token": False, "resize_position_embeddings": None, "lang": None, "forced_bos_token": None}
