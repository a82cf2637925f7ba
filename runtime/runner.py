"""The serving engine's runner: turns a scheduled step (runtime/scheduler.py) into the model's computation, layer
by layer, and returns the logits of the rows that sample a token.

At each layer the step's tokens go through the model's own pieces (GLMBlock.input_layernorm,
SelfAttention.project, GLMBlock.feed_forward, ...) as one batch of independent rows: the decoding rows with the
prompt tokens of the PROJECT segments at that layer through the QKV projection, then the decoding rows with those
of the FINISH segments through attention, dense and the MLP. A layer's weights are thus read once for the decoding
rows and the prompt slice together, and the decoding rows ride along with the compute-bound prefill almost free.
Attention reads the paged cache in place: each query sees the first `visible` keys of its own sequence.

A prefilling sequence keeps three buffers for its prompt tokens: the hidden state entering the layer being
computed, that layer's LayerNorm output (the residual of FINISH) and its queries.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .kv_cache import PagedKVCache, SeenKeys
from .scheduler import Phase, Segment, Sequence, Step


@dataclass
class PrefillBuffers:
    hidden: torch.Tensor  # [n, H]: entering the layer being computed (after the last layer's FINISH: its output)
    attention_input: torch.Tensor  # [n, H]: that layer's input LayerNorm
    queries: torch.Tensor  # [n, heads, head_dim]
    rotation: Tuple[torch.Tensor, torch.Tensor]  # the rotary angles of their positions ([1, n, ...], SelfAttention.rotation)
    places: torch.Tensor  # [n, heads]: where their keys and values go in the cache


@dataclass
class DecodeRows:
    """The decoding rows of a step as they go through the layers."""
    hidden: torch.Tensor  # [n, H]
    rotation: Tuple[torch.Tensor, torch.Tensor]  # [1, n, ...], computed once for all layers
    places: torch.Tensor  # [n, heads]
    seen: SeenKeys


def joined(parts: List[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class ModelRunner:
    def __init__(self, model, cache: PagedKVCache):
        self.model, self.cache = model, cache
        self.transformer = model.transformer
        config = model.config
        self.num_heads, self.head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.device = model.device  # the embeddings', where the prefill buffers live
        # A model split over GPUs (--num-gpus) has its layers on several devices: each layer's rows go to its own.
        self.layer_devices = [layer.input_layernorm.weight.device for layer in self.transformer.layers]

    @torch.inference_mode()
    def run(self, step: Step) -> torch.Tensor:
        """Runs the step; returns logits [rows, vocab] for step.decode then step.completing, in that order."""
        for segment in step.segments:
            if segment.sequence.workspace is None:
                self._start_prefill(segment.sequence)
        # Attention: one block-table row per sequence that attends in this step.
        attending = list(dict.fromkeys(step.decode + [g.sequence for g in step.segments if g.phase == Phase.FINISH]))
        table_row = {id(s): i for i, s in enumerate(attending)}
        tables = torch.zeros(len(attending), max([len(s.blocks) for s in attending], default=0), dtype=torch.int32)
        for i, sequence in enumerate(attending):
            tables[i, :len(sequence.blocks)] = torch.tensor(sequence.blocks, dtype=torch.int32)
        decode = self._decode_rows(step.decode, table_row) if step.decode else None

        by_layer = [[] for _ in self.transformer.layers]
        for segment in step.segments:
            by_layer[segment.layer].append(segment)
        for index, layer in enumerate(self.transformer.layers):
            projecting = [g for g in by_layer[index] if g.phase == Phase.PROJECT]
            finishing = [g for g in by_layer[index] if g.phase == Phase.FINISH]
            if decode is None and not projecting and not finishing:
                continue
            device = self.layer_devices[index]
            if decode is not None:
                decode.hidden = decode.hidden.to(device)
            attention_input, queries = self._project(index, layer, device, decode, projecting)
            if decode is not None or finishing:
                self._finish(index, layer, device, decode, attention_input, queries, finishing, table_row,
                             tables.to(device))

        last = ([decode.hidden] if decode is not None else []) + \
            [s.workspace.hidden[s.prefill_length - 1:] for s in step.completing]
        if not last:
            return torch.empty(0, self.model.config.vocab_size, device=self.device)
        norm = self.transformer.final_layernorm
        return self.model.lm_head(norm(joined([x.to(norm.weight.device) for x in last])))  # [rows, vocab]

    def _rotation(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rotary angles of tokens at positions [2, n] (or [n]): [1, n, ...] each, for every layer."""
        return self.transformer.layers[0].attention.rotation(positions[None].to(self.device), dtype)

    def _decode_rows(self, sequences: List[Sequence], table_row: dict) -> DecodeRows:
        tokens = torch.tensor([s.tokens[s.computed] for s in sequences], device=self.device)
        places = [self.cache.places(s.blocks, s.prefix_length + s.computed, s.prefix_length + s.computed + 1)
                  for s in sequences]
        hidden = self.transformer.word_embeddings(tokens)
        positions = joined([s.positions(s.computed, s.computed + 1) for s in sequences], dim=-1)
        return DecodeRows(hidden=hidden, rotation=self._rotation(positions, hidden.dtype), places=joined(places),
                          seen=SeenKeys([table_row[id(s)] for s in sequences], [s.visible(s.computed) for s in sequences]))

    def _project(self, index, layer, device, decode: Optional[DecodeRows], segments: List[Segment]):
        """LayerNorm, QKV and rotary positions of the decoding rows and the PROJECT tokens; their keys and values go
        into the cache, the prompt tokens' LayerNorm and queries into their buffers. Returns the decoding rows'
        (LayerNorm, queries), or (None, None)."""
        if decode is None and not segments:
            return None, None
        first = [decode] if decode is not None else []
        rows = [d.hidden for d in first] + [g.sequence.workspace.hidden[g.start:g.end].to(device) for g in segments]
        rotations = [d.rotation for d in first] + [tuple(t[:, g.start:g.end] for t in g.sequence.workspace.rotation)
                                                    for g in segments]
        places = [d.places for d in first] + [g.sequence.workspace.places[g.start:g.end] for g in segments]
        attention_input = layer.input_layernorm(joined(rows))
        rotation = tuple(joined(list(tables), dim=1) for tables in zip(*rotations))  # (cos, signed sin)
        q, k, v = layer.attention.project(attention_input[None], rotation=rotation)
        q, k, v = q[0], k[0], v[0]  # [rows, nh, hd]
        self.cache.write(index, joined(places).to(device), k, v)
        n = offset = len(decode.seen.rows) if decode is not None else 0
        for g in segments:
            end = offset + g.end - g.start
            g.sequence.workspace.attention_input[g.start:g.end] = attention_input[offset:end]
            g.sequence.workspace.queries[g.start:g.end] = q[offset:end]
            offset = end
        return attention_input[:n], q[:n]

    def _finish(self, index, layer, device, decode: Optional[DecodeRows], attention_input, queries,
                segments: List[Segment], table_row: dict, tables: torch.Tensor) -> None:
        """Attention over the cache, dense, residual and MLP of the decoding rows (their hidden state moves to the
        next layer) and the FINISH tokens (into their buffers)."""
        first = [decode] if decode is not None else []
        seen = [d.seen for d in first] + [SeenKeys([table_row[id(g.sequence)]] * (g.end - g.start),
                                                   [g.sequence.visible(t) for t in range(g.start, g.end)])
                                          for g in segments]
        context = self.cache.attend(
            index, joined([queries] * bool(first) + [g.sequence.workspace.queries[g.start:g.end].to(device)
                                                      for g in segments]),
            tables, seen[0] if len(seen) == 1 else sum(seen[1:], seen[0]))
        residual = joined([attention_input] * bool(first) +
                          [g.sequence.workspace.attention_input[g.start:g.end].to(device) for g in segments])
        output = layer.feed_forward(residual, layer.attention.dense(context.flatten(1)))
        offset = len(decode.seen.rows) if decode is not None else 0
        if decode is not None:
            decode.hidden = output[:offset]
        for g in segments:
            end = offset + g.end - g.start
            g.sequence.workspace.hidden[g.start:g.end] = output[offset:end]
            offset = end

    def _start_prefill(self, sequence: Sequence) -> None:
        tokens = sequence.tokens[:sequence.prefill_length]
        hidden = self.transformer.word_embeddings(torch.tensor(tokens, device=self.device))  # [n, H]
        sequence.workspace = PrefillBuffers(
            hidden=hidden, attention_input=torch.empty_like(hidden),
            queries=hidden.new_empty(len(tokens), self.num_heads, self.head_dim),
            rotation=self._rotation(sequence.positions(0, len(tokens)), hidden.dtype),
            places=self.cache.places(sequence.blocks, sequence.prefix_length, sequence.prefix_length + len(tokens)))
        self._write_prefix(sequence)

    def _write_prefix(self, sequence: Sequence) -> None:
        """The P-Tuning prefix's keys and values into the first slots of a newly admitted sequence's blocks."""
        if not sequence.prefix_length:
            return
        keys, values = self.transformer.get_prompt(1, self.cache.dtype)  # [layers, 1, nh, pre, hd] each
        places = self.cache.places(sequence.blocks, 0, sequence.prefix_length)
        for layer, device in enumerate(self.layer_devices):
            self.cache.write(layer, places.to(device), keys[layer, 0].transpose(0, 1).to(device),
                             values[layer, 0].transpose(0, 1).to(device))
