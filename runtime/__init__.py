"""What runs the model for the front-ends, outside the remote code that ships with checkpoints:

    devices.py     which device and dtype, and how layers are placed over several GPUs
    loading.py     checkpoint path or hub id -> (model, tokenizer): formats, quantize-while-loading, saving
    finetunes.py   what ptuning/ trains (P-Tuning prefixes, LoRA adapters, full fine-tunes), applied on load
    options.py     the model options and sampling defaults the three front-ends share
    generation.py  the generation engine's home: what turns a stream of tokens into text for a user
    server.py      HTTP serving: OpenAI's error shape, guards before a body is read, graceful shutdown

Data flows one way: front-end script -> options -> loading -> chatglm_6b -> transformers/torch.
"""
import os

# The repository root. Scripts in subfolders put it on sys.path with their first import line,
# `sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))`, and then take it from here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
