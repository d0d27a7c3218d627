"""The single-device reference model: a small GPT in the style of nanoGPT.

Chapter 0 introduces it and counts its parameters and FLOPs; every later chapter proves
that its parallel strategy computes exactly what this model computes on one device.

Architecture (GPT-2 shape, pre-LayerNorm):

    tokens -> wte + wpe -> [Block] * n_layer -> ln_f -> lm_head -> logits
    Block(x) = x + attn(ln_1(x));  x + mlp(ln_2(x))
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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and the past."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, n_head, T, hd) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


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

    ``forward(idx, targets)`` returns ``(logits, loss)``; ``loss`` is the mean
    cross-entropy over all B*T positions, or None without targets.
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

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size={self.config.block_size}; "
                "use shorter sequences or a GPTConfig with a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

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
            logits, _ = self(idx[:, -self.config.block_size :])
            probs = F.softmax(logits[:, -1, :] / max(temperature, 1e-6), dim=-1)  # (B, V)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


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
