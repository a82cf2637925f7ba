"""Loading a real-sized checkpoint: time and peak RSS of `load_model_and_tokenizer` on a ChatGLM-6B-shaped
fp16 checkpoint written to disk in the original layout (8 `pytorch_model-0000x-of-00008.bin` shards and their
index, random weights), loaded as it is and quantized while loading to INT8 and INT4.

    python benchmarks/bench_load.py                      # writes ~13.4 GB under /tmp, deletes it afterwards
    python benchmarks/bench_load.py --dir /data/glm6b --keep

Every configuration loads in its own process, so that its peak RSS is its own. The peak counts the pages of the
memory-mapped shard being read as well as the model being built.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from benchmarks.common import machine_summary, peak_rss  # noqa: E402
from chatglm_6b.configuration_chatglm import ChatGLMConfig  # noqa: E402
from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration  # noqa: E402
from runtime.loading import DEMO_MODEL_PATH, load_model_and_tokenizer  # noqa: E402
from runtime.options import DTYPES  # noqa: E402

SHARDS = 8


def write_checkpoint(path: str) -> int:
    """ChatGLM-6B's tensor names and shapes, random fp16 values, split by layer into 8 shards like the original;
    returns the bytes written."""
    config = ChatGLMConfig()
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict(keep_vars=True).items()}
    shapes["lm_head.weight"] = shapes["transformer.word_embeddings.weight"]  # the original stores it again
    layers_per_shard = -(-config.num_layers // SHARDS)

    def shard_of(name):
        if ".layers." not in name:
            return 0 if "word_embeddings" in name else SHARDS - 1
        return int(name.split(".layers.")[1].split(".")[0]) // layers_per_shard

    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    for name in ("ice_text.model", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(DEMO_MODEL_PATH, name), os.path.join(path, name))
    inv_freq = model.transformer.layers[0].attention.rotary_emb.compute_inv_freq()
    weight_map, total = {}, 0
    for shard in tqdm(range(SHARDS), desc="writing 6B-shaped checkpoint", unit="shard"):
        file = f"pytorch_model-{shard + 1:05d}-of-{SHARDS:05d}.bin"
        tensors = {}
        for name, shape in shapes.items():
            if shard_of(name) != shard:
                continue
            if name.endswith("inv_freq"):
                tensors[name] = inv_freq.clone()
            elif "layernorm" in name:
                tensors[name] = torch.ones(shape, dtype=torch.half) if name.endswith("weight") else torch.zeros(shape, dtype=torch.half)
            else:
                tensors[name] = torch.empty(shape, dtype=torch.half).normal_(0, 0.02)
            weight_map[name] = file
            total += tensors[name].numel() * tensors[name].element_size()
        torch.save(tensors, os.path.join(path, file))
        del tensors
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def load_one(path: str, config_name: str) -> dict:
    bits = {"int8": 8, "int4": 4}.get(config_name)
    dtype = DTYPES["bf16"] if bits else DTYPES[config_name]
    start = time.perf_counter()
    model, _ = load_model_and_tokenizer(path, device="cpu", dtype=dtype, quantize=bits)
    seconds = time.perf_counter() - start
    with torch.inference_mode():  # the loaded model runs
        ids = torch.tensor([[5, 6, model.config.gmask_token_id, model.config.bos_token_id]])
        assert torch.isfinite(model(input_ids=ids).logits).all()
    return {"config": config_name, "seconds": seconds, "peak_rss": peak_rss()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="where to write the checkpoint (default: a new folder under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse one already there)")
    parser.add_argument("--configs", default="fp16,int8,int4")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: load one configuration in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(load_one(args.dir, args.one)))
        return

    path = args.dir or tempfile.mkdtemp(prefix="chatglm6b-shaped-")
    try:
        index = os.path.join(path, "pytorch_model.bin.index.json")
        if args.keep and os.path.isfile(index):
            with open(index) as f:
                size = json.load(f)["metadata"]["total_size"]
        else:
            size = write_checkpoint(path)
        rows = []
        for name in tqdm(args.configs.split(","), desc="loading"):
            result = subprocess.run([sys.executable, __file__, "--dir", path, "--one", name],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                tqdm.write(f"{name}: failed: {result.stderr.strip().splitlines()[-1:]}")
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)

    print(f"\n6B-shaped fp16 checkpoint, original 8-shard .bin layout: {size / 1e9:.2f} GB on disk")
    print(machine_summary())
    print(f"{'loaded as':<10} {'seconds':>8} {'peak RSS GB':>11} {'peak / checkpoint':>17}")
    for r in rows:
        print(f"{r['config']:<10} {r['seconds']:>8.1f} {r['peak_rss'] / 1e9:>11.2f} {r['peak_rss'] / size:>17.2f}")


if __name__ == "__main__":
    main()
