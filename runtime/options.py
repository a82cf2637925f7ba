"""The options the three front-ends share: which model to load and how, and the sampling defaults."""
import argparse
import sys

import torch

from chatglm_6b import kernels
from chatglm_6b.modeling_chatglm import DEFAULT_MAX_LENGTH, DEFAULT_TEMPERATURE, DEFAULT_TOP_P

from .devices import DeviceError
from .engine import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE
from .finetunes import load_finetuned
from .loading import CheckpointError

__all__ = ["DEFAULT_MAX_LENGTH", "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "DTYPES", "add_model_args",
           "add_sampling_args", "add_serving_args", "engine_options", "load_from_args", "sampling"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Below this, sampling picks the top token anyway (and dividing logits by ~1e-38 overflows float32).
GREEDY_BELOW_TEMPERATURE = 1e-5


def sampling(temperature: float, top_p: float, greedy: bool = False) -> dict:
    """chat()'s sampling arguments. Greedy when asked for, and when temperature ~0 or top_p 0 leave only the
    most likely token (transformers refuses a temperature of 0)."""
    greedy = greedy or temperature < GREEDY_BELOW_TEMPERATURE or top_p == 0
    return {"do_sample": not greedy, "temperature": temperature, "top_p": top_p}


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model options every front-end takes."""
    group = parser.add_argument_group("model", "the original ptuning/web_demo.sh's spellings (--model_name_or_path, "
                                               "--ptuning_checkpoint, --pre_seq_len, --quantization_bit) work too")
    group.add_argument("--model-path", "--model_name_or_path", dest="model_path", default=None,
                       help="checkpoint directory or hub id (default: the demo checkpoint in demo_model/; "
                            "THUDM/chatglm-6b for the real model)")
    group.add_argument("--quantize", "--quantization_bit", dest="quantize", type=int, choices=[4, 8], default=None,
                       help="weight-only INT4 or INT8")
    group.add_argument("--quantize-embeddings", action="store_true",
                       help="with --quantize: the word embeddings and the tied lm_head too (at 4 bits the original's "
                            "-int4-qe format; 1.07 GB of bf16 table become 0.27 GB at 4 bits, 0.53 GB at 8)")
    group.add_argument("--activations", choices=list(kernels.ACTIVATION_PASSES), default=None,
                       help="how the CPU's INT8/INT4 kernels take each layer's input (default: CHATGLM_ACTIVATIONS, "
                            "else int8x2): int8x2 two int8 passes, less logit error than bf16 activations; int8 one "
                            "pass, about 1.7x faster prompts and 1.2-1.5x faster batched steps, 5-20x bf16's logit "
                            "error (README, 'Activations with outliers'); fp32 the original's arithmetic")
    group.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                       help="auto picks CUDA, then MPS, then CPU")
    group.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="dtype of the unquantized weights and activations (default: fp16 on GPUs, fp32 on "
                            "CPU; bf16 halves a CPU model's memory)")
    group.add_argument("--num-gpus", type=int, default=1, help="split the model over this many GPUs")
    group.add_argument("--ptuning-checkpoint", "--ptuning_checkpoint", dest="ptuning_checkpoint", default=None,
                       help="a checkpoint from ptuning/: P-Tuning v2 prefix, LoRA adapter or full fine-tune")
    group.add_argument("--pre-seq-len", "--pre_seq_len", dest="pre_seq_len", type=int, default=None,
                       help="PRE_SEQ_LEN of a P-Tuning checkpoint (default: what the checkpoint records)")
    return parser


def positive(kind):
    """An argparse type: a number of `kind` above zero."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not above zero")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_serving_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The generation engine's limits (api.py and web_demo.py serve many users at once)."""
    group = parser.add_argument_group("serving")
    group.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                       help="requests generated together, one token each per step")
    group.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                       help="requests waiting for a place in the batch; beyond them a request is refused (429)")
    group.add_argument("--kv-cache-gb", type=positive(float), default=None,
                       help="memory for the KV cache, shared by all requests in blocks of 16 tokens (default: 80%% "
                            "of what is free after loading the model, less 1 GB, and no more than --max-batch-size "
                            "full contexts need)")
    group.add_argument("--max-step-tokens", type=positive(int), default=None,
                       help="work of one engine step, in tokens through every layer, decoding rows included: "
                            "long prompts are prefilled in slices of this between the running replies' tokens "
                            "(default: measured, so that a step spends about as long on prompts as on decoding)")
    return parser


def engine_options(args: argparse.Namespace) -> dict:
    """GenerationEngine's keyword arguments from add_serving_args' options."""
    return {"max_batch_size": args.max_batch_size, "max_queue": args.max_queue,
            "kv_cache_bytes": None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30),
            "max_step_tokens": args.max_step_tokens}


def add_sampling_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Sampling options with chat()'s defaults."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="prompt + reply tokens at most")
    group.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                       help="nucleus sampling: keep this probability mass")
    group.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="sampling temperature")
    group.add_argument("--greedy", action="store_true", help="no sampling: the same input gives the same reply")
    return parser


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) from add_model_args' options, with a fine-tuned checkpoint applied if given;
    a bad checkpoint or a missing device exits with one line."""
    if getattr(args, "quantize_embeddings", False) and not args.quantize:
        sys.exit("error: --quantize-embeddings needs --quantize 4 or 8.")
    if getattr(args, "activations", None):
        kernels.settings.activations = args.activations
    try:
        return load_finetuned(args.ptuning_checkpoint, args.model_path, pre_seq_len=args.pre_seq_len,
                              device=args.device, dtype=DTYPES.get(args.dtype), quantize=args.quantize,
                              quantize_embeddings=getattr(args, "quantize_embeddings", False),
                              num_gpus=args.num_gpus)
    except (CheckpointError, DeviceError) as error:
        sys.exit(f"error: {error}")
