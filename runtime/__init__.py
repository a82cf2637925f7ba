"""What runs the model for the front-ends, outside the remote code that ships with checkpoints:

    devices.py      which device and dtype, the memory a device has free, how layers are placed over several GPUs
    loading.py      checkpoint path or hub id -> (model, tokenizer): one path for every format, quantizing while loading
    saving.py       checkpoints that load anywhere: weights, config, tokenizer and the model code side by side
    finetunes.py    what ptuning/ trains (P-Tuning prefixes, LoRA adapters, full fine-tunes), applied on load
    options.py      the model, sampling and serving options the three front-ends share
    engine.py       the serving engine's public face (GenerationEngine, Reply), behind api.py and web_demo.py;
      scheduler.py  its scheduler: step budget, admission, preemption, layer-major prefill slices
      kv_cache.py   its paged KV cache, allocated once from a memory budget, and the attention that reads it
      runner.py     its runner: one step through the model's layers
      sampling.py   the next token as chat() picks it, with OpenAI's penalties, logit_bias and logprobs
      grammar.py    constrained decoding: the tokens a JSON schema allows next (llguidance)
    generation.py   token ids -> the text a user sees, incrementally (decoding, post-processing, stop strings)
    metrics.py      what a serving process reports at GET /metrics
    server.py       HTTP serving: OpenAI's error shape, guards before a body is read, graceful shutdown
    openai_api.py   OpenAI's request and response bodies, its messages as ChatGLM's, logprobs in its two shapes
    chat_service.py what api.py's routes run: requests -> jobs -> engine rows -> response bodies and events
    ray_serving.py  replicas of api.py's app on Ray Serve

Data flows one way: front-end script -> options -> loading -> chatglm_6b -> transformers/torch.
"""
import os

# The repository root. Scripts in subfolders put it on sys.path with their first import line,
# `sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))`, and then take it from here.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
