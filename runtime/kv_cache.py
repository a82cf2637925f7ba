"""The serving engine's KV cache: allocated once from a memory budget and handed out in blocks of tokens (paged, as
in vLLM), so that a sequence holds what its tokens need rather than a slot of the model's whole context, and joins
or leaves by its block table without any copy.

    cache = PagedKVCache.for_model(model, budget_bytes)
    blocks = cache.allocate(cache.blocks_for(tokens))        # a sequence's blocks, in token order
    cache.write(layer, cache.places(blocks, start, end), k, v)  # tokens [start, end) of that sequence
    context = cache.attend(layer, q, tables, SeenKeys(rows, visible))  # query i: the first visible[i] keys of its row

Layout, per layer (on the layer's device): keys and values [num_blocks, heads, block_size, head_dim], so that one
head's keys of a block are contiguous for the attention kernel.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from chatglm_6b.kernels import loaded_cpu_kernels

from .devices import available_memory


BLOCK_SIZE = 16  # tokens per block
# From this many consecutive queries of one sequence (a prompt slice, not decoding), attention gathers the
# sequence's keys and runs torch's SDPA, a blocked matrix product, rather than the kernel's query-by-query loop.
GATHER_FROM_QUERIES = 16
# Of the memory free once the weights are loaded, the default budget takes this share, less HEADROOM_BYTES for
# the activations of a step, the allocator and the server itself.
FREE_MEMORY_SHARE = 0.8
HEADROOM_BYTES = 1 << 30


class CacheFull(Exception):
    """Fewer free blocks than asked for."""


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer."""
    return 2 * config.num_layers * config.hidden_size * torch.empty((), dtype=dtype).element_size()


def default_budget(model, dtype: torch.dtype, most_tokens: int) -> int:
    """The default KV budget in bytes: FREE_MEMORY_SHARE of what is free after the weights, less the headroom, but
    no more than `most_tokens` need, and at least one full context (a sequence must be able to grow to it)."""
    per_token = kv_bytes_per_token(model.config, dtype)
    free = FREE_MEMORY_SHARE * (available_memory(model.device) or 0) - HEADROOM_BYTES
    one_context = per_token * (model.config.max_sequence_length + (model.config.pre_seq_len or 0))
    return int(max(min(free, per_token * most_tokens), one_context))


@dataclass
class SeenKeys:
    """Which keys each query of a step attends to: the first visible[i] of the sequence in block-table row rows[i]."""
    rows: List[int]
    visible: List[int]
    _tensors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """rows and visible as int32 tensors (made once: a step's decoding rows attend in every layer)."""
        if self._tensors is None:
            self._tensors = (torch.tensor(self.rows, dtype=torch.int32), torch.tensor(self.visible, dtype=torch.int32))
        return self._tensors

    def __add__(self, other: "SeenKeys") -> "SeenKeys":
        return SeenKeys(self.rows + other.rows, self.visible + other.visible)


class PagedKVCache:
    """`devices`: one device for every layer, or a list with each layer's (a model split over GPUs)."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_blocks: int, dtype: torch.dtype,
                 devices, block_size: int = BLOCK_SIZE):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size, self.num_blocks, self.dtype = block_size, num_blocks, dtype
        devices = devices if isinstance(devices, (list, tuple)) else [devices] * num_layers
        shape = (num_blocks, num_heads, block_size, head_dim)
        # torch.empty: on the CPU, pages are only committed when a block is first written.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for device in devices]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for device in devices]
        self.free_blocks: List[int] = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest block first
        self.scale = head_dim ** -0.5

    @staticmethod
    def dtype_for(model) -> torch.dtype:
        """The model's activation dtype: its embeddings' (a quantized table's: its scale's)."""
        embeddings = model.transformer.word_embeddings
        return getattr(embeddings, "weight_scale", embeddings.weight).dtype

    @classmethod
    def for_model(cls, model, budget_bytes: int, block_size: int = BLOCK_SIZE) -> "PagedKVCache":
        """As many blocks as fit in budget_bytes, in the model's activation dtype on its device."""
        config, dtype = model.config, cls.dtype_for(model)
        num_blocks = budget_bytes // (kv_bytes_per_token(config, dtype) * block_size)
        heads = config.num_attention_heads
        devices = [layer.input_layernorm.weight.device for layer in model.transformer.layers]
        return cls(config.num_layers, heads, config.hidden_size // heads, int(num_blocks), dtype, devices, block_size)

    @property
    def bytes(self) -> int:
        return sum(2 * keys.numel() * keys.element_size() for keys in self.keys)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def tokens(self) -> int:
        """Tokens the whole cache holds."""
        return self.num_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def allocate(self, count: int) -> List[int]:
        if count > len(self.free_blocks):
            raise CacheFull(f"{count} blocks asked for, {len(self.free_blocks)} free")
        taken = self.free_blocks[len(self.free_blocks) - count:][::-1]
        del self.free_blocks[len(self.free_blocks) - count:]
        return taken

    def release(self, blocks: List[int]) -> None:
        self.free_blocks.extend(reversed(blocks))

    def places(self, blocks: List[int], start: int, end: int) -> torch.Tensor:
        """Where tokens [start, end) of a sequence with these blocks go: [tokens, heads], rows of a layer's keys or
        values seen as [num_blocks * heads * block_size, head_dim]."""
        tokens = torch.arange(start, end)
        size, heads = self.block_size, self.keys[0].shape[1]
        first = torch.tensor(blocks, dtype=torch.long)[tokens // size] * heads * size + tokens % size  # head 0
        return first[:, None] + torch.arange(heads) * size

    def write(self, layer: int, places: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores keys, values [n, heads, head_dim] of n tokens at their places [n, heads] (from places())."""
        index, head_dim = places.reshape(-1), keys.shape[-1]
        self.keys[layer].view(-1, head_dim).index_copy_(0, index, keys.reshape(-1, head_dim).to(self.dtype))
        self.values[layer].view(-1, head_dim).index_copy_(0, index, values.reshape(-1, head_dim).to(self.dtype))

    def attend(self, layer: int, queries: torch.Tensor, block_tables: torch.Tensor, seen: "SeenKeys") -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim)) v for queries [n, heads, head_dim], query i over the first seen.visible[i]
        keys of the sequence whose blocks are block_tables[seen.rows[i]] (block_tables [S, max_blocks] int32) ->
        [n, heads, head_dim]. A run of many queries of one sequence (a prompt slice) is a matrix product: its
        sequence's keys are gathered once for torch's SDPA. Decoding's few queries per sequence go to the CPU kernel,
        which reads the blocks in place (elsewhere they are gathered too)."""
        kernels = loaded_cpu_kernels()
        if not (kernels is not None and queries.device.type == "cpu" and self.dtype == queries.dtype
                and queries.dtype in (torch.float32, torch.bfloat16)):
            kernels = None
        rows, visible = seen.rows, seen.visible
        out, by_kernel, start = None, [], 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[start]:
                end += 1
            if kernels is not None and end - start < GATHER_FROM_QUERIES:
                by_kernel += range(start, end)
            else:
                out = torch.empty_like(queries) if out is None else out
                out[start:end] = self._gathered_attention(layer, queries[start:end], block_tables[rows[start]],
                                                          visible[start:end])
            start = end
        if len(by_kernel) == len(rows):
            return kernels.ops.paged_attention(queries, self.keys[layer], self.values[layer], block_tables,
                                           *seen.tensors(), self.scale)
        if by_kernel:
            index = torch.tensor(by_kernel, device=queries.device)
            out[index] = kernels.ops.paged_attention(
                queries[index], self.keys[layer], self.values[layer], block_tables,
                torch.tensor([rows[i] for i in by_kernel], dtype=torch.int32),
                torch.tensor([visible[i] for i in by_kernel], dtype=torch.int32), self.scale)
        return out

    def _gathered_attention(self, layer: int, queries: torch.Tensor, table: torch.Tensor, visible: List[int]):
        """Queries [m, heads, head_dim] of one sequence (blocks `table`) over their first visible[i] keys, by SDPA
        on the sequence's keys and values gathered from its blocks."""
        seen = max(visible)
        table = table[:self.blocks_for(seen)].long().to(queries.device)

        def gathered(cache):  # [heads, seen, head_dim]
            blocks = cache[table]  # [blocks, heads, block_size, head_dim]
            return blocks.transpose(0, 1).reshape(blocks.shape[1], -1, blocks.shape[3])[:, :seen]

        limits = torch.tensor(visible, device=queries.device)
        mask = torch.arange(seen, device=queries.device)[None, :] < limits[:, None]  # [m, seen], True = seen
        q = queries.transpose(0, 1)  # [heads, m, head_dim]
        context = F.scaled_dot_product_attention(q, gathered(self.keys[layer]).to(q.dtype),
                                                 gathered(self.values[layer]).to(q.dtype), attn_mask=mask)
        return context.transpose(0, 1)
