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
    """exp(i m theta_i) for each position m and pair i: complex64 (T, head_dim // 2) (Su et al. eq. 12).

    The angles m * theta_i are formed in float64 and reduced mod 2 pi before the cast, so a position of
    10^6 rotates as accurately as position 10: the cached decoder rotates keys at their absolute position.
    """
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = torch.remainder(positions.double()[:, None] * theta[None, :], 2 * math.pi)  # (T, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_2i, x_2i+1) of x (..., head_dim) by m * theta_i, read as the complex number
    x_2i + i x_2i+1 times exp(i m theta_i): one complex product instead of four real ones and a stack.
    `rotation` broadcasts against x's leading dimensions with head_dim // 2 as its last."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., head_dim // 2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)  # (..., head_dim)


class SplitHeads(torch.autograd.Function):
    """qkv (B, T, 3C) -> q, k, v (B, n_head, T, head_dim), q and k rotated by `rotation` (T, hd // 2)
    when it is given (apply_rope's complex product).

    Autograd through slices and views of qkv would build the gradient from zero-filled copies, one per
    slice, and add them up; the backward here writes the three gradients into one buffer and rotates
    its q and k parts back in place (by the conjugate rotation): the same numbers, about 1 ms less per
    layer and step at the baby-GPT size on a CPU."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, rotation: torch.Tensor | None, n_head: int):
        B, T, C3 = qkv.shape
        hd = C3 // 3 // n_head
        heads = qkv.view(B, T, 3, n_head, hd)
        q, k, v = heads.unbind(2)  # (B, T, nh, hd) each
        if rotation is not None:
            pairs = torch.view_as_complex(qkv.float().view(B, T, 3, n_head, hd // 2, 2)[:, :, :2])
            q, k = (
                torch.view_as_real(pairs * rotation[:, None, None, :])
                .to(qkv.dtype)
                .view(B, T, 2, n_head, hd)
                .unbind(2)
            )
        ctx.save_for_backward(rotation)
        ctx.dims = (B, T, n_head, hd)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        (rotation,) = ctx.saved_tensors
        B, T, n_head, hd = ctx.dims
        dtype = torch.float32 if rotation is not None else grad_q.dtype
        grad = torch.empty(B, T, 3, n_head, hd, dtype=dtype, device=grad_q.device)
        for i, g in enumerate((grad_q, grad_k, grad_v)):
            grad[:, :, i] = g.transpose(1, 2)
        if rotation is not None:
            pairs = torch.view_as_complex(grad.view(B, T, 3, n_head, hd // 2, 2)[:, :, :2])
            pairs.mul_(rotation.conj()[:, None, None, :])
        return grad.view(B, T, 3 * n_head * hd).to(grad_q.dtype), None, None


def sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. 2017 section 3.5: PE(m, 2i) = sin(m / 10000^(2i/d)), PE(m, 2i+1) = cos(...)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, dim // 2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, :dim]  # (T, dim)


def window_mask(q_start: int, n_q: int, k_start: int, n_k: int, window: int, device) -> torch.Tensor:
    """Bool (n_q, n_k): query at position q_start + i sees key at k_start + j iff 0 <= offset < window."""
    offset = (q_start + torch.arange(n_q, device=device))[:, None] - (
        k_start + torch.arange(n_k, device=device)
    )
    return (offset >= 0) & (offset < window)


def linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight_t (+ bias): nn.Linear with its weight stored transposed, (in, out)."""
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of the last `window` positions of every layer, in one preallocated ring buffer.

    The i-th token held lives in slot i % window. A single new token writes its slot and attends to
    every filled slot (softmax does not care about their order); several new tokens attend to the
    cached ones (read in position order) and to each other through `window_mask`. RoPE keys are stored
    rotated at their absolute position: a query at m and a key at n score by m - n only (Su et al.
    eq. 16), so stored keys stay valid as the window slides.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, device, dtype=torch.float32, window=None, first_position=0
    ):
        self.window = window or config.block_size
        shape = (config.n_layer, batch_size, config.n_head, self.window, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.first = self.length = first_position  # position of the first and of the next token
        self.layer_keys, self.layer_values = self.keys.unbind(0), self.values.unbind(0)  # views per layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Add k, v (B, n_head, t, head_dim) at positions length .. length + t - 1.

        Returns the keys and values to attend to, the attention mask (None: all) and is_causal."""
        start, t, window = self.length - self.first, k.size(2), self.window  # start: tokens already held
        keys, values = self.keys[layer], self.values[layer]
        if t == 1:  # decoding: O(window) work, no allocation beyond views
            keys[:, :, start % window] = k[:, :, 0]
            values[:, :, start % window] = v[:, :, 0]
            n = min(start + 1, window)
            return keys[:, :, :n], values[:, :, :n], None, False
        n_past = min(start, window)
        all_k, all_v = k, v
        if n_past:
            slots = torch.arange(start - n_past, start, device=k.device) % window
            all_k, all_v = (
                torch.cat((keys[:, :, slots], k), dim=2),
                torch.cat((values[:, :, slots], v), dim=2),
            )
        kept = min(t, window)  # only the last `window` new positions can be seen again
        slots = torch.arange(start + t - kept, start + t, device=k.device) % window
        keys[:, :, slots], values[:, :, slots] = k[:, :, -kept:], v[:, :, -kept:]
        if n_past == 0 and t <= window:
            return all_k, all_v, None, True
        return all_k, all_v, window_mask(start, t, start - n_past, n_past + t, window, k.device), False


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

    def forward(self, x, rope=None, cache: KVCache | None = None, layer: int = 0, window: int | None = None):
        B, T, C = x.shape
        q, k, v = SplitHeads.apply(self.qkv(x), rope, self.n_head)  # (B, nh, T, hd) each, q and k rotated
        if cache is not None:
            k, v, mask, causal = cache.update(layer, k, v)
        elif window is not None and window < T:  # sliding window: each position sees the last `window`
            mask, causal = window_mask(0, T, 0, T, window, x.device), False
        else:
            mask, causal = None, True
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

    def forward(self, x, rope=None, cache=None, layer=0, window=None):
        x = x + self.attn(self.ln_1(x), rope, cache, layer, window)
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
        # RoPE rotations for positions 0 .. len - 1, computed once (grown by doubling when decoding past it)
        self.register_buffer("rope_table", self._rope_rotations(config.block_size), persistent=False)
        sin_table = sinusoidal_table(torch.arange(config.block_size), config.n_embd)
        self.register_buffer("sin_table", sin_table if config.pos == "sinusoidal" else None, persistent=False)

    def _rope_rotations(self, length: int, device=None) -> torch.Tensor | None:
        if self.config.pos != "rope":
            return None
        positions = torch.arange(length, device=device)
        return rope_rotation(positions, self.config.n_embd // self.config.n_head, self.config.rope_base)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Trainable parameters, the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        window: int | None = None,
        last_only: bool = False,
    ):
        """idx (B, T) token ids -> logits (B, T, vocab); with targets (B, T) also the mean cross-entropy.

        With a cache the tokens continue the cached ones (positions cache.length ..). `window` (no cache)
        lets each position attend to the last `window` positions only, as the sliding cache does.
        Learned positions stop at block_size, and so do sinusoidal ones with a cache; rope and none run
        on longer inputs. `last_only` computes the logits of the last position only (B, 1, vocab).
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        self._check_length(start + T, cache is not None)
        x = self.wte(idx)  # (B, T, C)
        if self.config.pos == "learned":
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        elif self.config.pos == "sinusoidal":  # Vaswani et al. 3.4: embeddings times sqrt(d_model), so the
            # unit-amplitude table does not drown tokens embedded at std 0.02
            if start + T <= len(self.sin_table):
                table = self.sin_table[start : start + T]
            else:
                table = sinusoidal_table(
                    torch.arange(start, start + T, device=idx.device), self.config.n_embd
                )
            x = x * math.sqrt(self.config.n_embd) + table.to(x.dtype)
        rope = self._rope_at(start, T)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, window)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def _rope_at(self, start: int, length: int) -> torch.Tensor | None:
        """Rotations of positions start .. start + length - 1 (None without RoPE), from the table."""
        if self.config.pos != "rope":
            return None
        if start + length > len(self.rope_table):
            with torch.inference_mode(False):  # grown while decoding, kept for training: a normal tensor
                self.rope_table = self._rope_rotations(2 * (start + length), self.rope_table.device)
        return self.rope_table[start : start + length]

    def decode_weights(self) -> list:
        """The weights `decode_step` reads, matrices transposed to (in, out) and contiguous: a one-row
        product x @ W^T runs about twice as fast on a CPU from that layout. A copy: take it again after
        the weights change."""

        def t(linear):
            return linear.weight.detach().t().contiguous(), linear.bias

        layers = [
            (b.ln_1.weight, b.ln_1.bias, *t(b.attn.qkv), *t(b.attn.proj), b.ln_2.weight, b.ln_2.bias)
            + (*t(b.mlp.fc), *t(b.mlp.proj))
            for b in self.blocks
        ]
        return [layers, self.ln_f.weight, self.ln_f.bias, self.lm_head.weight.detach().t().contiguous()]

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, cache: KVCache, weights: list | None = None) -> torch.Tensor:
        """Logits (B, vocab) for one new token per row (token (B, 1)) after the cached ones.

        The arithmetic of forward(token, cache=cache) in eval mode, written as plain tensor calls on
        preallocated buffers: at this size a decoding step is bound by per-operation overhead."""
        self._check_length(cache.length + 1, True)
        logits = self._decode(token, cache, weights or self.decode_weights(), cache.length)
        cache.length += 1
        return logits

    def _decode(
        self, token: torch.Tensor, cache: KVCache, weights: list, p: int | torch.Tensor
    ) -> torch.Tensor:
        """decode_step's arithmetic for the new token at position p; cache.length is left alone.

        p an int: the cache slot and the filled part of the window are Python numbers (narrowed views).
        p a 0-d long tensor on the model's device: every index is read from it and the token attends to
        all window slots, the unfilled ones masked, so shapes never change and the step can be captured
        once in a CUDA graph (`CUDAGraphDecoder`). The two agree up to float rounding (tested)."""
        layers, ln_w, ln_b, head = weights
        B, C = token.size(0), self.config.n_embd
        nh, hd, window = self.config.n_head, C // self.config.n_head, cache.window
        static = isinstance(p, torch.Tensor)
        if static:
            index = p.view(1)
            offset = p - cache.first  # tokens held before this one
            slot = (offset % window).view(1)
            mask = (torch.arange(window, device=p.device) <= offset).view(1, 1, 1, window)
        else:
            slot, n = (p - cache.first) % window, min(p - cache.first + 1, window)
        x = self.wte.weight[token[:, 0]]  # (B, C)
        if self.config.pos == "learned":
            x = x + (self.wpe.weight.index_select(0, index) if static else self.wpe.weight[p])
        elif self.config.pos == "sinusoidal":
            x = x * math.sqrt(C) + (
                self.sin_table.index_select(0, index) if static else self.sin_table[p]
            ).to(x.dtype)
        rope = None  # (1, hd // 2): broadcasts over (B, 2, nh, hd // 2)
        if self.config.pos == "rope":  # a static step reads a table grown beforehand (CUDAGraphDecoder)
            rope = self.rope_table.index_select(0, index) if static else self._rope_at(p, 1)
        for (w1, b1, qkv_w, qkv_b, proj_w, proj_b, w2, b2, fc_w, fc_b, out_w, out_b), keys, values in zip(
            layers, cache.layer_keys, cache.layer_values
        ):
            qkv = linear_t(torch.layer_norm(x, (C,), w1, b1), qkv_w, qkv_b).view(B, 3, nh, hd)
            q, k, v = qkv.unbind(1)  # (B, nh, hd) each
            if rope is not None:  # one complex product for q and k, as apply_rope
                pairs = torch.view_as_complex(qkv.view(B, 3, nh, hd // 2, 2)[:, :2])
                q, k = torch.view_as_real(pairs * rope).view(B, 2, nh, hd).unbind(1)
            if static:  # keys, values (B, nh, window, hd)
                keys.index_copy_(2, slot, k.unsqueeze(2))
                values.index_copy_(2, slot, v.unsqueeze(2))
                y = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask)
            else:
                keys.select(2, slot).copy_(k)
                values.select(2, slot).copy_(v)
                y = F.scaled_dot_product_attention(
                    q.unsqueeze(2), keys.narrow(2, 0, n), values.narrow(2, 0, n)
                )
            x = x + linear_t(y.view(B, C), proj_w, proj_b)
            x = x + linear_t(F.gelu(linear_t(torch.layer_norm(x, (C,), w2, b2), fc_w, fc_b)), out_w, out_b)
        return torch.layer_norm(x, (C,), ln_w, ln_b) @ head

    def _check_length(self, end: int, cached: bool) -> None:
        absolute = self.config.pos == "learned" or (cached and self.config.pos == "sinusoidal")
        if absolute and end > self.config.block_size:
            raise ValueError(
                f"context of {end} tokens is longer than the model's block_size {self.config.block_size}"
                f" ({self.config.pos} positions{' with a cache' if cached else ''})"
            )

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay matrices and embeddings; leave biases and LayerNorm gains alone (as GPT-2 and nanoGPT)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def make_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float], device_type: str):
        """AdamW over `optimizer_groups`, torch's fused kernel where it has one (CUDA, CPU): the same update
        as the default multi-tensor one up to float rounding, and on a CPU about half its time at the
        baby-GPT size (nanoGPT fuses on CUDA only)."""
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(self.optimizer_groups(weight_decay), lr=lr, betas=betas, fused=fused)

    @property
    def sliding(self) -> bool:
        """Relative (rope) or no positions: generation slides a window over the cache."""
        return self.config.pos in ("rope", "none")

    def _decodes(self, n: int, cache: KVCache | None) -> bool:
        """Whether the token after out[:, :n] is one cached decoding step (the rest is in the cache)."""
        return cache is not None and cache.length == n - 1 and (self.sliding or n <= self.config.block_size)

    @torch.no_grad()
    def next_logits(self, out: torch.Tensor, n: int, cache: KVCache | None, weights=None) -> torch.Tensor:
        """Logits (B, vocab) for the token after out[:, :n], under `generate`'s context rule."""
        W = self.config.block_size
        if self._decodes(n, cache):
            return self.decode_step(out[:, n - 1 : n], cache, weights)
        if self.sliding:
            if cache is not None:  # the prompt at once
                return self(out[:, cache.length : n], cache=cache, last_only=True)[0][:, -1]
            field = self.config.n_layer * (W - 1) + 1  # every token that reaches the last one's logits
            return self(out[:, max(0, n - field) : n], window=W, last_only=True)[0][:, -1]
        if cache is not None and n <= W:  # absolute positions: cached until the window is full
            return self(out[:, cache.length : n], cache=cache, last_only=True)[0][:, -1]
        return self(out[:, max(0, n - W) : n], last_only=True)[0][:, -1]  # nanoGPT's crop, recomputed

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
        cuda_graph: bool | None = None,
    ):
        """Extend idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        Context: every new token sees the last block_size tokens.
        - rope / none: each layer attends to the last block_size positions (a sliding window, as in
          Mistral's sliding-window attention); the cache keeps exactly those keys and values, so a new
          token costs the same at step 10 and at step 10^5. Without the cache the same logits come from
          a full forward over the last n_layer * (block_size - 1) + 1 tokens (the receptive field)
          with the window mask. With one layer this is nanoGPT's crop exactly; with more, the earlier
          tokens' hidden states keep the context they had (nanoGPT recomputes them on the crop alone).
        - learned / sinusoidal: nanoGPT's rule, a full forward over the last block_size tokens with
          positions 0 .. block_size - 1; the cache serves until the window is first full.
        cuda_graph (cached decoding only; default: on a CUDA device) replays the decoding step and the
        sampling as one CUDA graph (`CUDAGraphDecoder`) instead of launching their ~120 kernels one by one
        from Python; the tokens are the same.
        """
        B, T0 = idx.shape
        if cuda_graph is None:
            cuda_graph = use_cache and idx.device.type == "cuda"
        if cuda_graph and not (use_cache and idx.device.type == "cuda"):
            raise ValueError(f"cuda_graph needs use_cache and a CUDA device (tokens are on {idx.device})")
        # inference mode: no view or version tracking, about 10% more tokens/s at the baby size on a CPU
        with torch.inference_mode():
            out = idx.new_empty(B, T0 + max_new_tokens)  # preallocated: no torch.cat per token
            out[:, :T0] = idx
            cache = KVCache(self.config, B, idx.device, self.wte.weight.dtype) if use_cache else None
            weights = self.decode_weights() if use_cache else None
            sampling = (temperature, top_k, top_p)
            graph = (
                CUDAGraphDecoder(self, cache, weights, T0 + max_new_tokens, sampling) if cuda_graph else None
            )
            for n in range(T0, T0 + max_new_tokens):
                if graph is not None and self._decodes(n, cache):
                    out[:, n : n + 1] = graph.next_token(out[:, n - 1 : n], generator)
                    continue
                logits = self.next_logits(out, n, cache, weights)
                out[:, n : n + 1] = sample_next_token(logits, temperature, top_k, top_p, generator)
        return out.clone()  # a normal tensor again: the tokens may feed a later forward that trains


class CUDAGraphDecoder:
    """`DecoderLM.decode_step` captured once as a CUDA graph and replayed for each new token.

    A decoding step of the baby or 6x6x384 model is about a hundred small kernels; launched one by one
    from Python they take ~10 us each for a few us of GPU work, so eager decoding on a GPU is bound by
    the launches. A replay submits them all at once. The step reads its token and position from static
    buffers (copied in before each replay), writes the cache it was built with (whose buffers never
    move) and returns its logits in a static buffer, overwritten by the next call. RoPE rotations are
    tabulated up to `end` (the last position decoded) before capture, as the graph holds the table's
    address. Built lazily: the first call captures, after one eager warm-up of the very same step.

    With `sampling` (temperature, top_k, top_p) the graph also samples the next token from the logits
    (`next_token`); only the random draws of the sampler (the exponential race, and with top_p the
    uniform draws that order boundary ties) are made outside it, by the caller's
    generator, so the tokens are those of eager decoding with the same generator.
    """

    def __init__(
        self, model: DecoderLM, cache: KVCache, weights: list, end: int, sampling: tuple | None = None
    ):
        device = cache.keys.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device (the cache is on {device})")
        if sampling is not None:
            check_sampling(*sampling)
        model._rope_at(0, end)  # grow the table now, not inside the graph
        self.model, self.cache, self.weights, self.sampling = model, cache, weights, sampling
        B = cache.keys.size(1)
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.noise = None  # Exp(1) draws of the sampler, (B, vocab) float64, refilled before each replay
        self.tie_noise = None  # uniform draws that order the nucleus's boundary ties, refilled likewise
        if sampling is not None and sampling[0] > 0:
            self.noise = torch.empty(B, model.config.vocab_size, dtype=torch.float64, device=device)
            if sampling[2] < 1:
                self.tie_noise = torch.empty_like(self.noise)
        self.graph, self.logits, self.sampled = None, None, None

    def next_token(self, token: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The token (B, 1) sampled after token (B, 1), in a static buffer (needs `sampling`)."""
        if self.sampling is None:
            raise ValueError("next_token needs the sampling settings given when the decoder is built")
        if self.noise is not None:
            self.noise.exponential_(1, generator=generator)  # what sample_next_token would draw, in order
        if self.tie_noise is not None:
            self.tie_noise.uniform_(generator=generator)
        self(token)
        return self.sampled

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) for token (B, 1) at position cache.length, as decode_step."""
        self.model._check_length(self.cache.length + 1, True)
        self.token.copy_(token)
        self.position.fill_(self.cache.length)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.cache.length += 1
        return self.logits

    def _capture(self) -> None:
        step = (self.token, self.cache, self.weights, self.position)
        side = torch.cuda.Stream()  # warm-up off the capturing stream, as torch.cuda.graph's docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model._decode(*step)  # writes the cache slot that the first replay writes again
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model._decode(*step)
            if self.sampling is not None:
                self.sampled = sample_next_token(
                    self.logits, *self.sampling, noise=self.noise, tie_noise=self.tie_noise
                )


# ---------------------------------------------------------------------------------------------
# sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    if not temperature >= 0 or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (got {top_p}); 1 keeps every token")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None (got {top_k!r})")


def nucleus_mask(logits: torch.Tensor, top_p: float, tie_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Bool, rows of logits (B, V): the smallest set of most likely tokens whose probability is >= top_p
    (Holtzman et al. 2019 section 3.1), for the true softmax of the logits.

    The partial sums are of exp(logit - max) in float64, compared with top_p times their total: the
    probabilities are never rounded on their own (exp(log_softmax) turns 0.1 into 0.09999999999999998,
    and five of them fall short of 0.5), and a uniform row sums integers, so an exact hit is exact. A
    partial sum within twice the float64 rounding bound of the row (V * 2^-52 of the total, at most
    1.2e-11 for V = 50,257) counts as reaching top_p, since rounding cannot tell it apart; a token whose
    mass is needed by more than that is kept. Tokens tied with the last one kept are ranked in a random
    order, the argsort of `tie_noise` (B, V) (uniform draws), so which of them are kept favours no token
    id; without it, ties go by token id.
    """
    z = logits.double()
    weights = (z - z.max(dim=-1, keepdim=True).values).exp()  # (B, V), the largest exactly 1
    if tie_noise is None:
        order = weights.argsort(dim=-1, descending=True, stable=True)
    else:  # a random order first; the stable sort by weight then keeps it among equal weights
        shuffle = tie_noise.argsort(dim=-1)  # (B, V)
        order = shuffle.gather(-1, weights.gather(-1, shuffle).argsort(dim=-1, descending=True, stable=True))
    partial = weights.gather(-1, order).cumsum(dim=-1)  # (B, V), ascending
    total = partial[..., -1:]  # (B, 1)
    rounding = total * (z.size(-1) * 2.0**-52)  # twice the bound on the error of partial and top_p * total
    n_keep = (partial < top_p * total - rounding).sum(dim=-1, keepdim=True) + 1  # (B, 1), >= 1
    keep_sorted = torch.arange(z.size(-1), device=z.device) < n_keep  # (B, V)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    tie_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probabilities (float64, rows of `logits` (B, V)) to sample from; removed tokens get -inf.

    temperature 0 keeps only the first maximum (what argmax returns); top_k keeps the k most likely
    tokens and every token tied with the k-th (as nanoGPT and Hugging Face do); top_p keeps the
    nucleus of `nucleus_mask`, tokens tied at its boundary chosen at random: by `tie_noise` (B, V) if
    given, else by uniform draws from `generator`.
    """
    check_sampling(temperature, top_k, top_p)
    z = logits.double()
    z = z - z.max(dim=-1, keepdim=True).values  # maximum at 0, so z / T is never inf - inf
    if temperature == 0:
        first = F.one_hot(z.argmax(dim=-1), z.size(-1)).bool()
        return torch.where(first, 0.0, -math.inf)
    z = z / temperature  # tiny T: -inf except the maxima; huge T: all near 0 (uniform)
    if top_k is not None and top_k < z.size(-1):
        kth = z.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
        z = z.masked_fill(z < kth, -math.inf)
    if top_p < 1:
        if tie_noise is None:
            tie_noise = torch.empty_like(z).uniform_(generator=generator)
        z = z.masked_fill(~nucleus_mask(z, top_p, tie_noise), -math.inf)
    return z.log_softmax(dim=-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    tie_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B, 1); temperature 0 is greedy (first maximum).

    The draw is the exponential race: argmax of p / q with q ~ Exp(1) per token, so token k wins with
    probability p_k. torch.multinomial(p, 1) draws one sample this very way, so the same generator
    gives the same tokens (tested). With top_p < 1 the uniform draws that order the nucleus's boundary
    ties (`filter_logits`) come from the generator after q. `noise` (B, V) float64 is q drawn beforehand,
    and `tie_noise` (B, V) float64 the uniform draws, as a CUDA graph needs."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if noise is None:
        noise = torch.empty_like(logits, dtype=torch.float64).exponential_(1, generator=generator)
    if top_k is None and top_p >= 1:  # plain sampling: the same probabilities in fewer operations
        z = logits.double()
        probs = ((z - z.max(dim=-1, keepdim=True).values) / temperature).softmax(dim=-1)
    else:
        probs = filter_logits(logits, temperature, top_k, top_p, generator, tie_noise).exp()
    return (probs / noise).argmax(dim=-1, keepdim=True)
