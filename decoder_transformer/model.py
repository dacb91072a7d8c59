"""A decoder-only Transformer language model with a choice of position encoding, a KV cache and
temperature / top-k / nucleus (top-p) sampling.

Positions (`ModelConfig.pos`):
  rope        rotary embeddings on queries and keys (Su et al. 2021, arXiv 2104.09864, eq. 34)
  learned     a learned table added to the token embedding (GPT-2); cannot go past block_size
  sinusoidal  the fixed sine/cosine table of Vaswani et al. 2017, added to the token embedding
  none        no position signal beyond what the causal mask leaks (NoPE)

Sampling follows Holtzman et al. 2019 (arXiv 1904.09751), section 3.1: the nucleus is the smallest
set of most likely tokens whose probability reaches p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITIONS = ("rope", "learned", "sinusoidal", "none")


@dataclass
class ModelConfig:
    vocab_size: int = 65  # number of symbols (65 characters in Tiny Shakespeare, 256 for bytes)
    block_size: int = 64  # training context length in tokens
    n_layer: int = 4  # decoder blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual stream width
    dropout: float = 0.0  # dropout on attention weights, residual branches and embeddings
    bias: bool = False  # biases in Linear and LayerNorm layers (nanoGPT's default: off)
    pos: str = "rope"  # one of POSITIONS
    rope_base: float = 10000.0  # theta_i = base^(-2i/d), Su et al. section 3.2.2

    def __post_init__(self):
        if self.pos not in POSITIONS:
            raise ValueError(f"pos must be one of {POSITIONS} (got {self.pos!r})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"RoPE rotates pairs of dimensions: head_dim {self.n_embd // self.n_head} must be even"
            )


# ---------------------------------------------------------------------------------------------
# position encodings


def rope_rotation(positions: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """exp(i m theta_i) for each position m and pair i: complex (T, head_dim // 2) (Su et al. eq. 12)."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * theta[None, :]  # (T, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_2i, x_2i+1) of x (..., head_dim) by m * theta_i, read as the complex number
    x_2i + i x_2i+1 times exp(i m theta_i): one complex product instead of four real ones and a stack.
    `rotation` broadcasts against x's leading dimensions with head_dim // 2 as its last."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., head_dim // 2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)  # (..., head_dim)


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017 section 3.5: PE(m, 2i) = sin(m / 10000^(2i/d)), PE(m, 2i+1) = cos(...)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim // 2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, :dim]  # (T, dim)


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per layer."""

    def __init__(self, config: ModelConfig, batch_size: int, device, dtype=torch.float32):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # tokens already stored (the position of the next token)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_head, t, head_dim) after the cached tokens; return all keys and values so far."""
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# ---------------------------------------------------------------------------------------------
# the network


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        qkv = self.qkv(x)  # (B, T, 3C)
        qk, v = qkv[..., : 2 * C].view(B, T, 2, self.n_head, self.head_dim), qkv[..., 2 * C :]
        if (
            rope is not None
        ):  # queries and keys rotated in one product; rope: (T, hd // 2) -> (T, 1, 1, hd // 2)
            qk = apply_rope(qk, rope[:, None, None, :])  # (B, T, 2, nh, hd)
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hd)
        if past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one new token may see every cached one
        else:  # several new tokens after a cached prefix: new token i sees keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


class DecoderLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the stream's variance stays O(1)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the mean cross-entropy.

        With a cache the tokens continue the cached ones (positions cache.length ..). Learned positions and
        the cache stop at block_size; rope, sinusoidal and none run on longer inputs without a cache.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        limit = self.config.block_size if (cache is not None or self.config.pos == "learned") else None
        if limit is not None and start + T > limit:
            raise ValueError(
                f"context of {start + T} tokens is longer than the model's block_size {limit}"
                + (" (learned positions)" if self.config.pos == "learned" else "")
            )
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx)  # (B, T, C)
        if self.config.pos == "learned":
            x = x + self.wpe(positions)
        elif self.config.pos == "sinusoidal":  # Vaswani et al. 3.4: embeddings times sqrt(d_model), so the
            # unit-amplitude table does not drown tokens embedded at std 0.02
            table = sinusoidal_table(positions, self.config.n_embd).to(x.dtype)  # (T, C)
            x = x * math.sqrt(self.config.n_embd) + table
        rope = None
        if self.config.pos == "rope":
            rope = rope_rotation(positions, self.config.n_embd // self.config.n_head, self.config.rope_base)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices and embeddings; leave biases and LayerNorm gains alone (as GPT-2 and nanoGPT)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ):
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        Context window: the model sees the tokens since `start`; once that would exceed block_size the
        window restarts on the last block_size // 2 tokens. The cached path refills its cache there and
        the uncached path runs a full forward pass over the same window, so both draw the same tokens.
        """
        keep = max(1, self.config.block_size // 2)
        start, cache = 0, None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > self.config.block_size:
                start, cache = idx.size(1) - keep, None
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif cache is None:
                cache = KVCache(self.config, idx.size(0), idx.device, self.wte.weight.dtype)
                logits, _ = self(idx[:, start:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            next_token = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


# ---------------------------------------------------------------------------------------------
# sampling

TOP_P_TOLERANCE = 1e-6  # a set whose probability is within this of p counts as reaching p (float rounding)


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0
) -> torch.Tensor:
    """Log-probabilities (float64, rows of `logits` (B, V)) to sample from; removed tokens get -inf.

    temperature 0 keeps only the maximum (ties kept together); top_k keeps the k most likely tokens
    (ties at the k-th value kept); top_p keeps the smallest set of most likely tokens whose probability
    reaches p, with the token that crosses p and every token tied with the least likely kept one.
    """
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (got {temperature})")
    if not top_p > 0:
        raise ValueError(f"top_p must be > 0 (got {top_p})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (got {top_k})")
    z = logits.double()
    z = z - z.max(dim=-1, keepdim=True).values  # maximum at 0, so z / T is never inf - inf
    if temperature == 0:
        return torch.where(z == 0, 0.0, -math.inf).log_softmax(dim=-1)
    z = z / temperature  # tiny T: -inf except the maxima; huge T: all near 0 (uniform)
    if top_k is not None and top_k < z.size(-1):
        kth = z.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        z = z.masked_fill(z < kth, -math.inf)
    logp = z.log_softmax(dim=-1)
    if top_p < 1:
        sorted_logp, _ = logp.sort(dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()  # probability of the better tokens
        keep_sorted = mass_before < top_p - TOP_P_TOLERANCE
        keep_sorted[..., 0] = True  # at least one token, whatever p
        n_keep = keep_sorted.sum(dim=-1, keepdim=True)  # (B, 1)
        threshold = sorted_logp.gather(-1, n_keep - 1)  # log-probability of the least likely kept token
        logp = logp.masked_fill(logp < threshold, -math.inf).log_softmax(dim=-1)
    return logp


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B, 1); temperature 0 is greedy (first maximum)."""
    if temperature == 0:
        filter_logits(logits, 0.0, top_k, top_p)  # same argument checks as the sampled path
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).exp()
    return torch.multinomial(probs.float(), 1, generator=generator).to(logits.device)
