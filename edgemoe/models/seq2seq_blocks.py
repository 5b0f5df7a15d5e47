"""Encoder-decoder blocks (Switch Transformers, NLLB-MoE): attention with an additive
position bias and cross-attention, T5's relative position buckets, fairseq's sinusoidal
positions, the pre-norm encoder and decoder layers, their cache and the model.

Layer ids: encoder layer i is MoE layer i, decoder layer j is MoE layer
`num_encoder_layers + j`, so the MoE blocks of both stacks are distinct to the expert
provider (offloading, cache, prediction, preloading) and `moe_blocks()` yields them in
execution order: the encoder's, then the decoder's.

Generation (edgemoe.seq2seq) encodes the source once, computes every decoder layer's
cross-attention keys and values from it (`Seq2SeqModel.start`), then decodes with a
self-attention KVCache per decoder layer.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu import Linear, linear
from .attention import KVCache


class Seq2SeqAttention(nn.Module):
    """Multi-head attention (no grouped K/V, no RoPE) used as self-attention, with an
    optional additive position bias and a causal mask, or as cross-attention over keys
    and values computed once from the encoder output (`kv`). `scale` None: 1/sqrt(D)."""

    def __init__(self, hidden: int, heads: int, head_dim: int, bias: bool, scale: float | None):
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, scale
        self.q = Linear(hidden, heads * head_dim, bias=bias)
        self.k = Linear(hidden, heads * head_dim, bias=bias)
        self.v = Linear(hidden, heads * head_dim, bias=bias)
        self.o = Linear(heads * head_dim, hidden, bias=bias)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, T, D)

    def kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, S, D) of the encoder output memory (B, S, H)."""
        return self.split(self.k(memory)), self.split(self.v(memory))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, bias: torch.Tensor | None = None,
                causal: bool = False, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, H)
        q = self.split(self.q(x))  # (B, heads, T, D)
        offset = 0
        if kv is None:
            k, v = self.split(self.k(x)), self.split(self.v(x))  # (B, heads, T, D) x2
            if cache is not None:
                offset = cache.offset
                k, v = cache.update(k, v)  # (B, heads, offset+T, D)
        else:
            k, v = kv  # (B, heads, S, D)
        mask, is_causal = bias, False
        if causal and T > 1:  # one new query sees every cached key: no mask needed then
            S = k.shape[2]
            allowed = torch.arange(S)[None, :] <= torch.arange(offset, offset + T)[:, None]  # (T, S)
            if bias is None and offset == 0:
                is_causal = True
            elif bias is None:
                mask = allowed
            else:
                mask = bias.masked_fill(~allowed, float("-inf"))  # (1, heads, T, S)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H)


def relative_buckets(rel: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket for each relative position rel = key - query: one bucket per distance
    below half the buckets, log-spaced buckets up to max_distance, one beyond; with
    `bidirectional` (the encoder) keys after the query get the other half of the buckets,
    otherwise (the causal decoder) only distances to earlier keys count."""
    out = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0).long() * num_buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp_min(0)
    exact = num_buckets // 2
    # log(0) is -inf for the near distances: those take the exact branch below.
    far = exact + (torch.log(dist.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    far = far.clamp_max(num_buckets - 1)
    return out + torch.where(dist < exact, dist, far)


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative-position bucket, added to the attention
    scores of every layer of one stack (T5, Switch Transformers)."""

    def __init__(self, num_buckets: int, max_distance: int, heads: int, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_buckets, heads))
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, T: int, S: int, offset: int = 0) -> torch.Tensor:
        """The bias (1, heads, T, S) of queries at offset..offset+T-1 over keys 0..S-1."""
        rel = torch.arange(S)[None, :] - torch.arange(offset, offset + T)[:, None]  # (T, S)
        b = relative_buckets(rel, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(b, self.weight).permute(2, 0, 1).unsqueeze(0)  # (1, heads, T, S)


def sinusoidal_positions(ids: torch.Tensor, dim: int, pad: int, offset: int = 0) -> torch.Tensor:
    """fairseq's sinusoidal position embeddings (NLLB, M2M-100) of token ids (B, T) after
    `offset` earlier positions, fp32 (B, T, dim): non-pad tokens count positions from
    pad + 1, pad tokens get position `pad`, whose embedding is zero."""
    real = ids.ne(pad).long()  # (B, T)
    pos = (real.cumsum(dim=1) + offset) * real + pad  # (B, T)
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))  # (half,)
    angle = pos.float()[..., None] * freq  # (B, T, half)
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)  # (B, T, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.masked_fill((pos == pad)[..., None], 0.0)  # (B, T, dim)


class FFN(nn.Module):
    """The dense ungated feed-forward fc2(act(fc1(x))) of the layers without experts."""

    def __init__(self, hidden: int, inter: int, act: Callable, bias: bool):
        super().__init__()
        self.fc1 = Linear(hidden, inter, bias=bias)
        self.fc2 = Linear(inter, hidden, bias=bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, attn: Seq2SeqAttention, mlp: nn.Module, norm: Callable[[], nn.Module]):
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.norm1, self.norm2 = norm(), norm()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias=bias)
        return x + self.mlp(self.norm2(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention over the encoder
    output, then the feed-forward (dense or MoE), each added to the residual."""

    def __init__(self, attn: Seq2SeqAttention, cross: Seq2SeqAttention, mlp: nn.Module, norm: Callable[[], nn.Module]):
        super().__init__()
        self.attn, self.cross, self.mlp = attn, cross, mlp
        self.norm1, self.norm_cross, self.norm2 = norm(), norm(), norm()

    def forward(self, x: torch.Tensor, cache: KVCache | None, bias: torch.Tensor | None,
                cross_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, bias, causal=True)
        x = x + self.cross(self.norm_cross(x), kv=cross_kv)
        return x + self.mlp(self.norm2(x))


class Seq2SeqCache(list):
    """What a decoder keeps between steps: one self-attention KVCache per decoder layer
    (the list itself, so code that trims caches layer by layer works on it) and the
    cross-attention keys and values of every decoder layer (`cross`), computed once per
    source by `Seq2SeqModel.start`. `capacity` bounds the source and the target alike."""

    def __init__(self, layers: list[KVCache], capacity: int | None = None):
        super().__init__(layers)
        self.capacity = capacity
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.source_len = 0

    @property
    def offset(self) -> int:
        """Target positions held."""
        return self[0].offset if len(self) else 0


class Seq2SeqModel(nn.Module):
    """Embedding(s), encoder stack, decoder stack and LM head. Families supply the layers,
    the norm class and how positions enter: `positions(ids, offset)` (an additive
    embedding, NLLB) and/or relative position biases `enc_rel` / `dec_rel` (Switch).

    Attributes families set: `embed_scale` (NLLB: sqrt(d_model)), `head_scale` (Switch
    with tied embeddings: d_model^-0.5 before the LM head). With untied embeddings the
    decoder reads its own `dec_embed`."""

    is_encoder_decoder = True

    def __init__(self, args, encoder: list[EncoderLayer], decoder: list[DecoderLayer], norm: Callable[[], nn.Module],
                 positions: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                 enc_rel: RelativePositionBias | None = None, dec_rel: RelativePositionBias | None = None):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        if not args.tie_word_embeddings:  # transformers 5 unties the encoder's, decoder's and head's
            self.dec_embed = nn.Embedding(args.vocab_size, args.hidden_size)
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        self.enc_norm, self.dec_norm = norm(), norm()
        self.enc_rel, self.dec_rel = enc_rel, dec_rel
        self.positions = positions
        self.embed_scale: float | None = None
        self.head_scale: float | None = None

    # ----------------------------------------------------------------- forwards

    def _embed(self, ids: torch.Tensor, decoder: bool, offset: int = 0) -> torch.Tensor:
        table = self.dec_embed if decoder and not self.args.tie_word_embeddings else self.embed
        x = table(ids)  # (B, T, H)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        if self.positions is not None:
            x = x + self.positions(ids, offset).to(x.dtype)
        return x

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Source ids (B, S) -> encoder output (B, S, H). Its MoE layers are routed as one
        batch per sequence (expert capacity counts the whole source)."""
        x = self._embed(ids, decoder=False)  # (B, S, H)
        S = ids.shape[1]
        bias = self.enc_rel(S, S) if self.enc_rel is not None else None  # (1, heads, S, S)
        for layer in self.encoder:
            x = layer(x, bias)
        return self.enc_norm(x)

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values of memory (B, S, H)."""
        return [layer.cross.kv(memory) for layer in self.decoder]

    def start(self, cache: Seq2SeqCache, memory: torch.Tensor) -> None:
        """Make `cache` decode against `memory` (B, S, H): cross K/V computed once, no
        target positions yet."""
        for c in cache:
            c.trim(c.offset)
        cache.cross = self.cross_kv(memory)
        cache.source_len = memory.shape[1]

    def decode(self, ids: torch.Tensor, cache: Seq2SeqCache | None = None, memory: torch.Tensor | None = None,
               last_only: bool = False) -> torch.Tensor:
        """Target ids (B, T) after the positions `cache` holds -> logits (B, T, V) (or
        (B, 1, V) with last_only). Without a cache, `memory` (the encoder output) is
        attended to and the ids are the whole target so far."""
        offset = cache.offset if cache is not None else 0
        cross = cache.cross if cache is not None else self.cross_kv(memory)
        if cross is None:
            raise ValueError("the cache has no encoder output: call Seq2SeqModel.start first")
        x = self._embed(ids, decoder=True, offset=offset)  # (B, T, H)
        T = ids.shape[1]
        bias = self.dec_rel(T, offset + T, offset) if self.dec_rel is not None else None  # (1, heads, T, offset+T)
        for i, layer in enumerate(self.decoder):
            x = layer(x, cache[i] if cache is not None else None, bias, cross[i])
        if last_only:
            x = x[:, -1:]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) from the decoder's residual stream (B, T, H)."""
        x = self.dec_norm(x)
        if self.head_scale is not None:
            x = x * self.head_scale
        if self.args.tie_word_embeddings:
            return linear(x, self.embed.weight)  # (B, T, V)
        return self.lm_head(x)

    def forward(self, ids: torch.Tensor, decoder_ids: torch.Tensor, cache: Seq2SeqCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Source ids (B, S) and target ids (B, T) -> logits (B, T, V): the encoder, then
        the decoder (`cache`, if given, is started on this source)."""
        memory = self.encode(ids)
        if cache is None:
            return self.decode(decoder_ids, memory=memory, last_only=last_only)
        self.start(cache, memory)
        return self.decode(decoder_ids, cache, last_only=last_only)

    # ----------------------------------------------------------------- what the runtime asks

    def make_cache(self, capacity: int | None = None) -> Seq2SeqCache:
        """A decoder cache: `capacity` target positions per layer (None: grow as needed)."""
        return Seq2SeqCache([KVCache(capacity) for _ in self.decoder], capacity)

    def kv_bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        """Bytes one context position takes: its self-attention keys and values in every
        decoder layer, plus the cross-attention keys and values of one source position
        (a context of N positions holds up to N source and N target tokens)."""
        elem = torch.empty(0, dtype=dtype or self.embed.weight.dtype).element_size()
        return sum(2 * 2 * layer.attn.heads * layer.attn.head_dim * elem for layer in self.decoder)

    def state_bytes(self, dtype: torch.dtype | None = None) -> int:
        return 0

    def moe_blocks(self) -> Iterator[nn.Module]:
        """The MoE blocks in execution order: the encoder's, then the decoder's."""
        for layer in [*self.encoder, *self.decoder]:
            if hasattr(layer.mlp, "router"):
                yield layer.mlp

    def resident_names(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}

    def fp32_names(self) -> set[str]:
        """Resident tensors kept in fp32 whatever the compute dtype (the routers)."""
        return {f"{mn}.{pn}" if mn else pn for mn, m in self.named_modules()
                for pn in getattr(m, "fp32_params", ()) if getattr(m, pn, None) is not None}
