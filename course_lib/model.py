"""The single-device reference model: a small GPT in the style of nanoGPT.

Chapter 0 introduces it and counts its parameters and FLOPs; every later chapter proves
that its parallel strategy computes exactly what this model computes on one device.

Architecture (GPT-2 shape, pre-LayerNorm):

    tokens -> wte + wpe -> [Block] * n_layer -> ln_f -> lm_head -> logits
    Block(x) = x + attn(ln_1(x));  x + mlp(ln_2(x))

``GPT.forward(idx)`` returns logits only; the loss is :func:`loss_fn`, outside the model.
The forward is three named pieces, ``embed`` -> ``blocks`` -> ``head``, so that a pipeline
stage (chapter 5) is a slice of them, and :func:`qkv_rows` picks a subset of attention
heads out of the fused QKV weight for tensor parallelism (chapter 6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """Shape of the reference GPT. The defaults are the course's tiny model (~0.87M params)."""

    vocab_size: int = 256  # byte-level vocabulary: one token per byte value
    block_size: int = 64  # longest sequence the model accepts (size of the position table)
    n_layer: int = 4  # number of transformer blocks, L
    n_head: int = 4  # attention heads per block; must divide n_embd
    n_embd: int = 128  # width of the residual stream, d
    dropout: float = 0.0  # dropout probability; 0 keeps training deterministic
    bias: bool = True  # biases in Linear and LayerNorm layers, as in GPT-2
    tie_weights: bool = True  # share the token embedding with the LM head (one Parameter)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            divisors = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0]
            raise ValueError(
                f"n_head={self.n_head} does not divide n_embd={self.n_embd}; "
                f"choose n_head in {divisors[:12]}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def qkv_rows(n_embd: int, n_head: int, heads: range | slice) -> torch.Tensor:
    """Rows of the fused ``c_attn.weight`` (and ``c_attn.bias``) that belong to ``heads``.

    Chapter 6 (tensor parallelism). ``c_attn`` maps d -> 3d; its 3d output rows are
    [q | k | v], d rows each, and inside each block head h owns the head_dim = d / n_head
    rows from h * head_dim. The answer lists q's rows of the given heads, then k's, then
    v's (int64, shape (3 * len(heads) * head_dim,)), which is exactly the layout a
    :class:`CausalSelfAttention` with ``len(heads)`` heads expects:
    ``c_attn.weight[qkv_rows(d, n_head, range(h0, h1))]`` is its weight.
    """
    # Why not a plain slice: a contiguous chunk of the 3d rows mixes q, k and v. With two
    # ranks, rows [0, 3d/2) would give rank 0 all of q and half of k, and rank 1 the other
    # half of k and all of v: neither could compute a single head. A head needs its rows
    # from each of the three blocks, so the rows of a shard are three slices, not one.
    if n_head < 1 or n_embd % n_head != 0:
        raise ValueError(f"n_head={n_head} must be >= 1 and divide n_embd={n_embd}")
    chosen = range(n_head)[heads] if isinstance(heads, slice) else heads
    if len(chosen) == 0 or min(chosen) < 0 or max(chosen) >= n_head:
        raise ValueError(f"heads={heads} must be a non-empty subset of range({n_head})")
    hd = n_embd // n_head
    within = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in chosen])  # rows of q
    return torch.cat([block * n_embd + within for block in range(3)])  # q, then k, then v


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past.

    ``n_head`` (default ``config.n_head``) is how many heads this module holds, each of
    width ``config.n_embd // config.n_head``: a tensor-parallel rank (chapter 6) holds
    some of the model's heads, its ``c_attn`` rows taken with :func:`qkv_rows`.
    """

    def __init__(self, config: GPTConfig, n_head: int | None = None) -> None:
        super().__init__()
        self.n_head = config.n_head if n_head is None else n_head
        if not 1 <= self.n_head <= config.n_head:
            raise ValueError(f"n_head={n_head} must be in [1, config.n_head={config.n_head}]")
        self.head_dim = config.n_embd // config.n_head
        width = self.n_head * self.head_dim  # n_embd when the module holds every head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * width, bias=config.bias)
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs side by side, before ``c_proj``: (B, T, C) -> (B, T, n_head * hd)."""
        qkv = self.c_attn(x)  # (B, T, 3 * nh * hd); a sequence-parallel c_attn (chapter 6)
        B, T, _ = qkv.shape  # gathers the whole sequence, so T is read from its output
        nh, hd = self.n_head, self.head_dim
        q, k, v = qkv.split(nh * hd, dim=2)  # 3 x (B, T, nh * hd)
        # (B, T, nh * hd) -> (B, nh, T, hd)
        q = q.view(B, T, nh, hd).transpose(1, 2)
        k = k.view(B, T, nh, hd).transpose(1, 2)
        v = v.view(B, T, nh, hd).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return y.transpose(1, 2).contiguous().view(B, T, nh * hd)  # (B, nh, T, hd) -> (B, T, nh*hd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.c_proj(self.attend(x)))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward network: d -> 4d -> GELU -> d."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """One pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The reference decoder-only transformer (chapter 0).

    ``forward(idx)`` returns the logits, (B, T, vocab); the loss is
    ``loss_fn(model(idx), targets)``. The forward is ``head(blocks(embed(idx)))``:
    ``embed`` (token + position embedding), ``blocks`` (an ``nn.ModuleList``) and
    ``head`` (final LayerNorm + LM head) are the pieces a pipeline stage (chapter 5) is
    made of: the first stage embeds, every stage runs some blocks, the last one applies
    the head and the loss.

    Tied embedding: with ``config.tie_weights`` the token embedding ``wte.weight`` and the
    LM head ``lm_head.weight`` are ONE Parameter, so its gradient is the sum of the two
    uses. When the embedding and the head live on different pipeline stages, each of the
    two stages holds its own copy of that weight; after backward their gradients must be
    summed (an all-reduce between the first and the last stage, as Megatron-LM does for
    its word embeddings) so that both copies take the same step and stay equal.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one Parameter used twice
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2L) so the stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> residual stream (B, T, C): wte + wpe, then dropout."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.config.block_size}; "
                "use shorter sequences or a GPTConfig with a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream (B, T, C) -> logits (B, T, vocab): final LayerNorm, then LM head."""
        return self.lm_head(self.ln_f(x))

    def forward(
        self, idx: torch.Tensor, *args: torch.Tensor, **kwargs: torch.Tensor
    ) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab). The loss is :func:`loss_fn`."""
        if args or kwargs:  # model(x, y) or model(x, targets=y): the old, loss-inside API
            raise TypeError(
                "GPT.forward takes only idx: the loss is outside forward now: "
                "loss_fn(model(idx), targets)"
            )
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt ``idx`` of shape (B, T)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.block_size :])  # (B, T, V)
            probs = F.softmax(logits[:, -1, :] / max(temperature, 1e-6), dim=-1)  # (B, V)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all B*T positions of ``logits`` (B, T, V) and ``targets`` (B, T).

    Chapter 0. Outside :class:`GPT` so that a pipeline's last stage, or a strategy that
    scales the loss, can apply it to logits it got some other way.
    """
    B, T = logits.shape[:2]
    if targets.shape != (B, T):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits {(B, T)}")
    return F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))


def count_parameters(config: GPTConfig) -> int:
    """Number of distinct parameters of ``GPT(config)``, from the formula (chapter 0).

    Per block: 12 d^2 matrix weights (QKV 3d^2, attention projection d^2, MLP 8d^2),
    2d LayerNorm scales, and with ``bias`` another 9d Linear biases and 2d LayerNorm
    shifts. Tests check this against ``sum(p.numel() for p in GPT(config).parameters())``.
    """
    d, L, V = config.n_embd, config.n_layer, config.vocab_size
    b = 1 if config.bias else 0
    # Linear weights 12d^2; Linear biases 3d + d + 4d + d = 9d; two LayerNorms 2d weight + 2d bias
    per_block = 12 * d * d + 9 * d * b + 2 * d + 2 * d * b
    embeddings = V * d + config.block_size * d
    final_norm = d + d * b
    head = 0 if config.tie_weights else V * d
    return embeddings + L * per_block + final_norm + head


def matmul_parameters(config: GPTConfig) -> int:
    """N in the 6N rule: the weights of the matrix multiplies every token goes through.

    Chapter 0. That is 12 d^2 per block plus the LM head's V x d matrix (with tied
    weights it is the token embedding, used a second time as a matmul). Embedding
    lookups, biases and LayerNorm entries cost O(1) FLOPs per parameter, not 6, and are
    left out: under 1% of the count for the course's models.
    """
    return config.n_layer * 12 * config.n_embd**2 + config.vocab_size * config.n_embd


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token, forward + backward: 6N + 12 L d T (chapter 0).

    6N: each multiply-add of a weight with an activation is 2 FLOPs forward and 4
    backward (gradient w.r.t. the input and w.r.t. the weight). 12 L d T: the two
    attention matmuls (QK^T and AV), 2 * 2 * T * d FLOPs per token per layer forward,
    times 3 for forward + backward. Causal masking is not subtracted (kernels compute
    the full square), matching PaLM's and nanoGPT's accounting.
    """
    T = config.block_size if seq_len is None else seq_len
    return 6 * matmul_parameters(config) + 12 * config.n_layer * config.n_embd * T
