"""
A Llama-style decoder in one file: grouped-query attention, RoPE, SwiGLU, RMSNorm pre-norm, tied embeddings.

The module names match Hugging Face's LlamaForCausalLM one for one (model.embed_tokens, model.layers.N.self_attn.
q_proj, ...), so the state dict is a Hugging Face Llama state dict and checkpoint.py saves and loads it with no
conversion. Also here: the size presets, the preallocated KV cache, and the parameter / FLOP / memory estimates
the training script plans with.

Run `python modern_llm.py` to print every size preset with its parameter count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from cross_entropy import linear_cross_entropy, loss_memory

# -----------------------------------------------------------------------------
# Configuration and size presets


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    n_kv_head: int = 3  # grouped-query attention: n_head / n_kv_head query heads share one K/V head
    head_dim: int = 64
    ffn_hidden: int = 2048  # SwiGLU hidden size
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMSNorm on each head's q and k (Qwen3, OLMo 2): steadier at high learning rates
    # Llama 3 long-context RoPE scaling ({"rope_type": "llama3", "factor": ..., ...}), kept only for loading
    # pretrained checkpoints that declare it.
    rope_scaling: dict | None = None

    def __post_init__(self):
        for f in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "ffn_hidden", "max_seq_len"):
            if getattr(self, f) <= 0:
                raise UserError(f"model config: {f} must be positive, got {getattr(self, f)}", "Model sizes")
        if self.n_head % self.n_kv_head:
            raise UserError(f"model config: n_head ({self.n_head}) must be a multiple of n_kv_head "
                            f"({self.n_kv_head})", "Model sizes")
        if self.head_dim % 2:
            raise UserError(f"model config: head_dim must be even for RoPE, got {self.head_dim}", "Model sizes")


# The reference model, "730m": 12 layers, d=1536, 24 query / 6 KV heads of 64, SwiGLU hidden 8192, seq 384.
# Its blocks hold 523M parameters; the name counts the embedding of Llama 3's 128,256-token vocabulary too
# (197M, tied, so counted once): 720M, "730M" in round figures. The embedding grows with the vocabulary:
# with our default 32,000-token tokenizer the same model has 573M parameters, which is what we train.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=512, n_layer=2, d_model=64, n_head=4, n_kv_head=1, head_dim=16,
                        ffn_hidden=176, max_seq_len=128),
    "small": ModelConfig(vocab_size=8192, n_layer=6, d_model=384, n_head=8, n_kv_head=2, head_dim=48,
                         ffn_hidden=1024, max_seq_len=256),
    "125m": ModelConfig(vocab_size=32000, n_layer=12, d_model=768, n_head=12, n_kv_head=3, head_dim=64,
                        ffn_hidden=2048, max_seq_len=1024),
    "730m": ModelConfig(vocab_size=32000, n_layer=12, d_model=1536, n_head=24, n_kv_head=6, head_dim=64,
                        ffn_hidden=8192, max_seq_len=384),
    "1.5b": ModelConfig(vocab_size=32000, n_layer=24, d_model=2048, n_head=32, n_kv_head=8, head_dim=64,
                        ffn_hidden=8192, max_seq_len=2048),
    "3b": ModelConfig(vocab_size=32000, n_layer=28, d_model=3072, n_head=32, n_kv_head=8, head_dim=96,
                      ffn_hidden=8192, max_seq_len=2048),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A size preset by name, with fields overridden (for example the tokenizer's vocab_size)."""
    if name not in PRESETS:
        raise UserError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)}", "Model sizes")
    return replace(PRESETS[name], **overrides)


# -----------------------------------------------------------------------------
# The model


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 whatever the input dtype, as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The rotation frequency of each pair of head dimensions (fp32, as transformers computes it)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s and s.get("rope_type", s.get("type")) == "llama3":
        # Llama 3.1+: slow down the low frequencies by `factor`, keep the high ones, blend in between.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face layout, so their weights need no permutation)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of past tokens, preallocated once: (batch, kv heads, max len, head dim).

    Preallocating keeps every decode step the same shape, so a compiled decode step never recompiles.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               view: tuple[slice | torch.Tensor, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, heads, T, dim) at `slots`: (T,) the same for every row, or (B, T) each row its own
        (continuous batching: rows at different lengths). Returns the keys and values attention reads: all of
        the cache, or with view = (rows, span) the cache rows `rows` and their first `span` slots. A slice of
        rows is read in place; a tensor of row numbers (B,) may repeat a row (one input per token of a prompt,
        packed with other rows' tokens into one step), and is read as a copy after every write."""
        rows, span = view or (slice(None), self.k.size(2))
        if isinstance(rows, torch.Tensor):
            self.k[rows[:, None], :, slots] = k.transpose(1, 2).to(self.k.dtype)
            self.v[rows[:, None], :, slots] = v.transpose(1, 2).to(self.v.dtype)
            return self.k[rows, :, :span], self.v[rows, :, :span]
        k_cache, v_cache = self.k[rows, :, :span], self.v[rows, :, :span]
        if slots.dim() == 1:
            k_cache.index_copy_(2, slots, k.to(k_cache.dtype))
            v_cache.index_copy_(2, slots, v.to(v_cache.dtype))
        else:
            index = slots[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))
            k_cache.scatter_(2, index, k.to(k_cache.dtype))
            v_cache.scatter_(2, index, v.to(v_cache.dtype))
        return k_cache, v_cache


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, slots=None, mask=None, view=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(slots, k, v, view)
        y = sdpa(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def sdpa(q, k, v, mask):
    """Causal attention when no mask is given. `enable_gqa` (PyTorch 2.5+) lets each group of query heads
    read its shared K/V head in place instead of materialising n_head / n_kv_head copies of K and V."""
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, slots=None, mask=None, view=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, mask, view)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """The stack without the output head; named `model` in the LLM so the state dict keys match Hugging Face."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class LLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.int8_head: nn.Module | None = None  # checkpoint.quantize_int8's copy of the output head (never saved)
        self.activation_checkpointing = False
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.cache_len = 0
        self.init_weights()

    # -- initialisation --------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Normal(0, 0.02) everywhere; the two projections that write into the residual stream (o_proj,
        down_proj) scaled by 1/sqrt(2 * n_layer) so the residual's variance does not grow with depth (GPT-2)."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight

    # -- KV cache ----------------------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache of `max_len` slots for `batch_size` rows. Slots are not positions: a left-padded
        row starts late, so a batch may need more slots than the context (no row gets more positions, though)."""
        w = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_head, max_len, self.cfg.head_dim,
                                               dtype or w.dtype, w.device)
        self.cache_len = max_len

    def move_cache_row(self, src: int, dst: int) -> None:
        """Copy row src of the cache into row dst (continuous batching keeps its live rows at the front)."""
        for layer in self.model.layers:
            cache = layer.self_attn.kv_cache
            cache.k[dst], cache.v[dst] = cache.k[src], cache.v[src]

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.cache_len = 0

    # -- forward -----------------------------------------------------------------------------------------------
    def rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions `pos` (T,) or (B, T), shaped to broadcast over (B, heads, T, head_dim)."""
        freqs = pos.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if pos.dim() == 2:  # per-row positions: add the heads dimension
            cos, sin = cos[:, None], sin[:, None]
        return cos.to(dtype), sin.to(dtype)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                view: tuple[slice | torch.Tensor, int] | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or the mean cross-entropy when `targets` is given (-100 is ignored).

        pos:   RoPE position of each token, (T,) or (B, T) for left-padded rows; default 0..T-1.
        slots: with a KV cache, the cache slots (T,) these tokens fill, or (B, T) per row; default `pos` when it
               is 1-D.
        view:  with a KV cache, (rows, span): the cache rows these B inputs are (a slice, or a tensor (B,) of
               row numbers) and how many leading slots attention reads (S = span); default all of both.
        mask:  boolean, True where a query may attend: (T, S) or (B, 1, T, S) with S the cache length.
               Without a cache and mask the attention is causal; with a cache the default mask lets each
               token see the slots up to its own.
        """
        B, T = idx.shape
        if pos is None:
            pos = torch.arange(T, device=idx.device)
        if self.cache_len:
            if slots is None:
                slots = pos if pos.dim() == 1 else pos[0]
            if mask is None:
                mask = torch.arange(self.cache_len, device=idx.device)[None, :] <= slots[:, None]
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope(pos, x.dtype)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, slots, mask, view, use_reentrant=False)
            else:
                x = layer(x, cos, sin, slots, mask, view)
        x = self.model.norm(x)
        if targets is not None and self.int8_head is None:
            return linear_cross_entropy(x.flatten(0, 1), self.output_weight, targets.reshape(-1))
        logits = F.linear(x, self.output_weight) if self.int8_head is None else self.int8_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row of idx (B, T) by max_new_tokens sampled tokens, nanoGPT style, with the KV cache:
        the prompt runs once, then one token per step. For quick samples while training; text_generator.py
        is the full engine. temperature 0 is greedy; `generator` keeps sampling off the global RNG."""
        B, T = idx.shape
        if T + max_new_tokens > self.cfg.max_seq_len:
            raise UserError(f"{T + max_new_tokens} tokens exceed the model's context of {self.cfg.max_seq_len}",
                            "Generation")
        self.setup_cache(B, T + max_new_tokens)
        try:
            logits = self(idx)[:, -1]
            out = [idx]
            for t in range(T, T + max_new_tokens):
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits.float() / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                out.append(nxt)
                if t + 1 < T + max_new_tokens:
                    logits = self(nxt, pos=torch.tensor([t], device=idx.device))[:, -1]
            return torch.cat(out, dim=1)
        finally:
            self.clear_cache()


# -----------------------------------------------------------------------------
# Estimators: parameters, FLOPs, memory


def count_block_matrices(cfg: ModelConfig) -> int:
    """Parameters in the blocks' 2-D weight matrices: what Muon optimises."""
    d, hd = cfg.d_model, cfg.head_dim
    return cfg.n_layer * (d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2 + 3 * d * cfg.ffn_hidden)


def count_params(cfg: ModelConfig, embedding: bool = True) -> int:
    """Parameter count from the config alone (so the 3B preset needs no memory to be counted)."""
    norms = cfg.n_layer * (2 * cfg.d_model + (2 * cfg.head_dim if cfg.qk_norm else 0)) + cfg.d_model
    n = count_block_matrices(cfg) + norms
    if embedding:
        n += cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    elif not cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model  # an untied head is a real matmul, not a lookup
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, 6N + 12*L*H*Q*T (PaLM, appendix B): N counts every matmul weight, the output
    head included but not the input embedding lookup; the second term is attention's QK^T and AV products."""
    n = count_params(cfg, embedding=False) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


FRAGMENTATION = 1.1  # the CUDA caching allocator's rounding and fragmentation over the allocated peak


def activation_bytes_per_token(cfg: ModelConfig, autocast: bool) -> int:
    """Bytes a block saves for backward per token, eager (as saved-tensor hooks saw them): 2 RMSNorms' fp32 input and
    normalised input; the projections' inputs (autocast: 5 bf16 casts; fp32: the 2 norms' outputs); attention's q,
    k, v, output and log-sum-exp; SwiGLU's 4 intermediates. torch.compile saves less."""
    b, d, hd, kv = 2 if autocast else 4, cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return 2 * (8 * d + 4) + (10 if autocast else 8) * d + b * (2 * hd + 2 * kv + 4 * cfg.ffn_hidden) + 4 * cfg.n_head


def estimate_training_memory(cfg: ModelConfig, batch_size: int, seq_len: int, optimizer: str = "adamw",
                             activation_checkpointing: bool = False, autocast: bool = True,
                             world_size: int = 1, shard: bool = False) -> dict[str, int]:
    """Training memory in bytes by part (fp32 weights and grads, optimizer state: AdamW 2 fp32 tensors per parameter,
    Muon 1 for hidden matrices; activations; logits: the loss's) and the total a run needs, the allocated peak x
    FRAGMENTATION (`python speed_optimizations_2025.py memory_plan` checks each against a measured step). Under
    autocast activations include each weight's bf16 copy, alive until forward ends; checkpointing keeps each block's
    input, recomputing one block at a time. The peak: at the loss (every activation alive), or in backward (every
    gradient alive, or a block recomputed). `shard` (FSDP) divides weights, grads and state by world_size."""
    n, hidden = count_params(cfg), count_block_matrices(cfg)
    weights = grads = 4 * n
    state = 4 * hidden + 8 * (n - hidden) if optimizer == "muon" else 8 * n
    if shard and world_size > 1:
        weights, grads, state = weights // world_size, grads // world_size, state // world_size
    tokens = batch_size * seq_len
    layer = tokens * activation_bytes_per_token(cfg, autocast)
    copies = 2 * hidden // cfg.n_layer if autocast else 0  # one block's bf16 weights
    saved = tokens * cfg.d_model * 4 if activation_checkpointing else layer  # per block
    activations = cfg.n_layer * (saved + copies) + tokens * (8 * cfg.d_model + 8)  # + the final norm, token ids
    recompute = layer + copies if activation_checkpointing else 0
    logits = loss_memory(tokens, cfg.d_model, cfg.vocab_size, autocast)
    peak = weights + state + max(activations + logits, max(activations, grads) + recompute)
    return {"weights": weights, "grads": grads, "optimizer": state, "activations": activations,
            "logits": logits, "total": int(FRAGMENTATION * peak)}


# -----------------------------------------------------------------------------

def describe_presets() -> str:
    lines = [f"{'preset':<7} {'layers':>6} {'d_model':>7} {'heads':>7} {'ffn':>6} {'seq':>5} {'vocab':>7} "
             f"{'params':>9} {'non-emb':>9} {'GFLOP/tok':>9}"]
    for name, cfg in PRESETS.items():
        lines.append(f"{name:<7} {cfg.n_layer:>6} {cfg.d_model:>7} {cfg.n_head:>3}/{cfg.n_kv_head:<3} "
                     f"{cfg.ffn_hidden:>6} {cfg.max_seq_len:>5} {cfg.vocab_size:>7} "
                     f"{count_params(cfg) / 1e6:>8.1f}M {count_params(cfg, embedding=False) / 1e6:>8.1f}M "
                     f"{flops_per_token(cfg, cfg.max_seq_len) / 1e9:>9.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe_presets())
    print(f"\n730m with Llama 3's 128,256-token vocabulary: "
          f"{count_params(model_preset('730m', vocab_size=128256)) / 1e6:.0f}M parameters")
