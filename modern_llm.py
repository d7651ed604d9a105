"""
A Llama-style decoder in one file: grouped-query attention, RoPE, SwiGLU, RMSNorm pre-norm, tied embeddings.

The module names match Hugging Face's LlamaForCausalLM one for one (model.embed_tokens, model.layers.N.self_attn.
q_proj, ...), so a checkpoint directory written here is a Hugging Face Llama directory and `transformers` loads it
as it is, and a Llama directory written by anyone loads here.

Also here, because every other script needs them and this file imports nothing of the project:
- the command-line convention (constants at the top, `--name=value` overrides, `--help`) and `UserError`,
  the one-line error every script prints for a user's mistake;
- size presets and the parameter / FLOP / memory estimators the training script plans with;
- checkpoint save/load (atomic) and finding the newest checkpoint in a run directory.

Run `python modern_llm.py` to print every size preset with its parameter count.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Errors a user can cause, and the command-line convention shared by all scripts


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad file, bad checkpoint).

    Scripts print it as one line that names the README section explaining it, and exit with code 2;
    no traceback, because the traceback would only hide the message.
    """

    def __init__(self, message: str, section: str = "Troubleshooting"):
        super().__init__(message)
        self.section = section

    def __str__(self) -> str:
        return f"{self.args[0]} (see README: {self.section})"


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run a script's main(argv), turning UserError into a one-line message and exit code 2."""
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(name: str, text: str, default: Any) -> Any:
    """Parse a flag's text into the type of the constant it overrides."""
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise UserError(f"--{name} expects true or false, got {text!r}", "Configuration")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise UserError(f"--{name} expects an integer, got {text!r}", "Configuration") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise UserError(f"--{name} expects a number, got {text!r}", "Configuration") from None
    if default is None and text.lower() in ("none", ""):
        return None
    return text


def constant_comments(path: str) -> dict[str, str]:
    """The `# comment` after each `NAME = value` line at the top level of a script, for --help."""
    comments = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*(?::[^=]+)?=\s*(.*?)\s+#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(3)
    return comments


def assigned_names(path: str) -> set[str]:
    """Names a script assigns at its top level (not those it imports)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    targets = [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
    targets += [n.target for n in tree.body if isinstance(n, ast.AnnAssign)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def script_constants(module_globals: dict) -> dict[str, Any]:
    """The UPPER_CASE constants a script assigns itself: its configuration, in the order they are written.
    Constants it imports from another file are that file's settings, not flags of this script."""
    own = assigned_names(module_globals["__file__"]) if "__file__" in module_globals else None
    return {
        k: v
        for k, v in module_globals.items()
        if k.isupper() and not k.startswith("_") and isinstance(v, (bool, int, float, str, list, type(None)))
        and (own is None or k in own)
    }


def parse_flags(defaults: dict[str, Any], argv: list[str], script: str | None = None,
                usage: str = "") -> tuple[dict[str, Any], set[str]]:
    """Override a script's constants from `--lower_case_name=value` flags.

    Returns (config, given): config maps lower-case names to values, given is the set of names the user typed,
    so hardware presets can fill in only what the user did not set. A list-valued constant is repeatable:
    each `--name=value` appends. `--help` prints every constant with its value and comment, then exits.
    """
    config = {k.lower(): (list(v) if isinstance(v, list) else v) for k, v in defaults.items()}
    given: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            print_help(defaults, script, usage)
            sys.exit(0)
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: flags look like --name=value", "Configuration")
        name, has_value, text = arg[2:].partition("=")
        name = name.replace("-", "_").lower()
        if name not in config:
            valid = ", ".join(f"--{k}" for k in config)
            raise UserError(f"unknown flag --{name}; valid flags: {valid}", "Configuration")
        default = defaults[name.upper()]
        if not has_value:
            if isinstance(default, bool):
                text = "true"
            elif i < len(argv) and not argv[i].startswith("--"):
                text = argv[i]
                i += 1
            else:
                raise UserError(f"--{name} needs a value: --{name}=VALUE", "Configuration")
        if isinstance(default, list):
            config[name] = (config[name] if name in given else []) + [text]
        else:
            config[name] = _convert(name, text, default)
        given.add(name)
    return config, given


def print_help(defaults: dict[str, Any], script: str | None, usage: str = "") -> None:
    comments = constant_comments(script) if script else {}
    if usage:
        print(usage.strip() + "\n")
    print("Flags (each overrides the constant of the same name at the top of the script):")
    for k, v in defaults.items():
        print(f"  --{k.lower()}={v!r:<24} {comments.get(k, '')}")


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA, else Apple MPS, else CPU) or a named device that this machine really has."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name!r} is not a device: use cpu, cuda, cuda:N or mps", "Configuration") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device=cuda, but PyTorch sees no CUDA GPU (a CPU-only build, or no driver): "
                            "use --device=cpu, or install the CUDA build of PyTorch", "Configuration")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device={name}: there are only {torch.cuda.device_count()} GPUs", "Configuration")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps, but this machine has no Apple GPU backend: use --device=cpu", "Configuration")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={name!r}: only cpu, cuda and mps are supported", "Configuration")
    return device


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

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k, self.v


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

    def forward(self, x, cos, sin, slots=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(slots, k, v)
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

    def forward(self, x, cos, sin, slots=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, slots, mask)
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
        self.int8_head: Int8Linear | None = None  # quantize_int8's copy of the output head (never saved)
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
        """Preallocate a KV cache for `batch_size` rows of up to `max_len` tokens (prompt + generated)."""
        if max_len > self.cfg.max_seq_len:
            raise UserError(f"{max_len} tokens exceed the model's context of {self.cfg.max_seq_len}", "Generation")
        w = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_head, max_len, self.cfg.head_dim,
                                               dtype or w.dtype, w.device)
        self.cache_len = max_len

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
                slots: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or the mean cross-entropy when `targets` is given (-100 is ignored).

        pos:   RoPE position of each token, (T,) or (B, T) for left-padded rows; default 0..T-1.
        slots: with a KV cache, the cache slots (T,) these tokens fill; default `pos` when it is 1-D.
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
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, slots, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, slots, mask)
        x = self.model.norm(x)
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


# Dense peak TFLOP/s (fp32, tf32, bf16 with fp32 accumulation) from NVIDIA's data sheets, for MFU. The first name
# contained in the device's name wins, so "H100 PCIe" comes before "H100". Other devices: a measured matmul.
GPU_PEAK_TFLOPS = {
    "H100 PCIe": (51.0, 378.0, 756.0),
    "H100": (67.0, 494.7, 989.4),
    "H200": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
    "RTX 4090": (82.6, 82.6, 165.2),
    "RTX 4080": (48.7, 48.7, 97.5),
    "RTX 4070 Ti": (40.1, 40.1, 80.2),
    "RTX 3090": (35.6, 35.6, 71.0),
    "RTX 3060": (12.7, 12.7, 25.6),
}


def datasheet_flops(device_name: str) -> dict[str, float] | None:
    """{"fp32", "tf32", "bf16"} -> FLOP/s of a GPU we know by name, else None."""
    for key, (fp32, tf32, bf16) in GPU_PEAK_TFLOPS.items():
        if key in device_name:
            return {"fp32": fp32 * 1e12, "tf32": tf32 * 1e12, "bf16": bf16 * 1e12}
    return None


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of a few n x n matmuls: the practical peak where no data sheet applies (a CPU's depends
    on its cores, clock, AVX-512/AMX units and BLAS)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # first call: library and thread-pool start-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def estimate_training_memory(cfg: ModelConfig, batch_size: int, seq_len: int, optimizer: str = "adamw",
                             activation_checkpointing: bool = False, autocast: bool = True,
                             world_size: int = 1, shard: bool = False) -> dict[str, int]:
    """Peak training memory in bytes, by part: fp32 weights and grads, optimizer state, activations, logits.

    Optimizer state is 2 fp32 tensors per parameter for AdamW; Muon keeps one momentum for hidden matrices.
    Activations count the tensors a block saves for backward under bf16 autocast with fused SDPA attention
    (about 26*d + 6*kv + 10*ffn bytes per token per layer: fp32 residual/norm inputs, bf16 projections,
    the SwiGLU intermediates); with activation checkpointing a block keeps only its fp32 input, plus one
    block's full set during recomputation. `shard` (FSDP) divides weights, grads and state by world_size.
    """
    n = count_params(cfg)
    b = 2 if autocast else 4  # bytes of a saved activation
    weights = grads = 4 * n
    if optimizer == "muon":  # one momentum for block matrices, AdamW's two moments for the rest
        hidden = count_block_matrices(cfg)
        state = 4 * hidden + 8 * (n - hidden)
    else:
        state = 8 * n
    if shard and world_size > 1:
        weights, grads, state = weights // world_size, grads // world_size, state // world_size
    tokens = batch_size * seq_len
    kv = cfg.n_kv_head * cfg.head_dim
    per_layer = tokens * (4 * 2 * cfg.d_model + b * (9 * cfg.d_model + 3 * kv + 5 * cfg.ffn_hidden))
    if activation_checkpointing:
        activations = cfg.n_layer * tokens * cfg.d_model * 4 + per_layer
    else:
        activations = cfg.n_layer * per_layer
    logits = tokens * cfg.vocab_size * (b + 4 + 4)  # logits, fp32 copy for the loss, its gradient
    total = int(1.1 * (weights + grads + state + activations + logits))  # ~10% allocator fragmentation
    return {"weights": weights, "grads": grads, "optimizer": state, "activations": activations,
            "logits": logits, "total": total}


# -----------------------------------------------------------------------------
# Checkpoints: Hugging Face Llama directories

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
STATE_FILE = "trainer_state.json"  # {"global_step": N}, beside a training checkpoint's files
CHECKPOINT_PREFIX = "checkpoint-"


def hf_config(cfg: ModelConfig, dtype: str = "float32", bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None) -> dict:
    """config.json fields. rope_theta is written both top level (transformers 4) and in rope_parameters (5)."""
    rope_params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope_params = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    d = {
        "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
        "model_type": "qwen3" if cfg.qk_norm else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": rope_params,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if cfg.qk_norm:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    return d


class CheckpointError(UserError):
    def __init__(self, message: str):
        super().__init__(message, "Checkpoint does not load")


def config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face config, refusing (by field name) what this model cannot represent."""
    arch = (d.get("architectures") or ["?"])[0]
    if d.get("model_type") not in ("llama", "qwen3") or arch not in ("LlamaForCausalLM", "Qwen3ForCausalLM"):
        raise CheckpointError(f"{where}: model_type={d.get('model_type')!r}, architectures={arch!r}: only Llama "
                              "(LlamaForCausalLM) checkpoints are supported")
    for field, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if d.get(field, ok) != ok:
            raise CheckpointError(f"{where}: {field}={d[field]!r} is not supported (this model needs {ok!r})")
    if d.get("use_sliding_window"):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
    rope = d.get("rope_scaling") or {}
    params = d.get("rope_parameters") or {}
    if not rope and params.get("rope_type", "default") != "default":
        rope = params
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{where}: rope_scaling type {rope_type!r} is not supported (only default and llama3)")
    try:
        n_head = d["num_attention_heads"]
        return ModelConfig(
            vocab_size=d["vocab_size"],
            n_layer=d["num_hidden_layers"],
            d_model=d["hidden_size"],
            n_head=n_head,
            n_kv_head=d.get("num_key_value_heads") or n_head,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_head,
            ffn_hidden=d["intermediate_size"],
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(d.get("rope_theta") or params.get("rope_theta") or 10000.0),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qk_norm=d.get("model_type") == "qwen3",
            rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if rope_type == "llama3" else None,
        )
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}") from None
    except TypeError as e:
        raise CheckpointError(f"{where}: a field has the wrong type ({e})") from None


def read_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    f = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not f.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: {CONFIG_FILE} is missing")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{f} is not a JSON object")
    return config_from_hf(d, str(f))


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory: model.safetensors, or the shards its index names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif (path / INDEX_FILE).is_file():
        try:
            index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
            files = [path / name for name in sorted(set(index["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE} is not a valid safetensors index ({e})") from None
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{path}: shard {f.name} named in {INDEX_FILE} is missing")
    else:
        raise CheckpointError(f"{path}: no weights ({WEIGHTS_FILE} or {INDEX_FILE}) in the directory")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return state


def load_weights(model: LLM, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Copy Hugging Face-named tensors into the model, naming any missing, unexpected or misshapen tensor."""
    own = model.state_dict()
    state = dict(state)
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the head too; it is the embedding
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = ([f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}"] if missing else []) + \
                ([f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"] if unexpected else [])
        raise CheckpointError(f"{where}: weights do not match the model config: {'; '.join(parts)}")
    for k, t in state.items():
        if t.shape != own[k].shape:
            raise CheckpointError(f"{where}: {k} has shape {tuple(t.shape)}, the config needs {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=True, assign=False)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LLM:
    """Build the model a checkpoint directory describes and load its weights (any Llama directory works)."""
    path = resolve_checkpoint(path)
    cfg = read_config(path)
    state = load_state_dict(path)
    with torch.device("meta"):
        model = LLM(cfg)
    model = model.to_empty(device=device)
    if read_quantization(path):  # an int8 checkpoint: give the model int8 layers before filling them
        replace_linears(model, Int8Linear.empty_like)
    load_weights(model, state, str(path))
    if read_quantization(path):
        quantize_output_head(model)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.to(dtype)


def _weights_for_saving(model: LLM) -> dict[str, torch.Tensor]:
    """Hugging Face names, tied head saved once (as the embedding), contiguous CPU tensors."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module; save the original's names
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model: LLM, path: str | os.PathLike, extra: Callable[[Path], None] | None = None,
                    dtype: torch.dtype | None = None, token_ids: dict | None = None) -> Path:
    """Write a Hugging Face Llama directory atomically: everything goes to a temporary directory beside the
    target, which is renamed into place last, so a process killed at any instant leaves either the old
    directory or the complete new one. `extra(tmp_dir)` adds files (tokenizer, training state) before the rename.

    If `path` already exists and holds other things (a run's OUT_DIR with its checkpoint-N folders), the
    new files replace the old ones one by one, weights first and config.json last.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = getattr(model, "_orig_mod", model)
    state = _weights_for_saving(raw)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a checkpoint is as readable as any directory
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        ids = token_ids or {}
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(raw.cfg, dtype_name, **ids), indent=2) + "\n")
        gen = {"bos_token_id": ids.get("bos_id"), "eos_token_id": ids.get("eos_id"),
               "pad_token_id": ids.get("pad_id"), "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
        for f in tmp.iterdir():  # durable before the rename makes it visible
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)  # safetensors writes owner-only files
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if not path.exists():
            os.replace(tmp, path)
        else:
            names = sorted(p.name for p in tmp.iterdir())
            names.sort(key=lambda n: n == CONFIG_FILE)  # config.json last
            for n in names:
                if (path / n).is_dir():
                    shutil.rmtree(path / n)
                os.replace(tmp / n, path / n)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def checkpoint_step(path: Path) -> int | None:
    """The training step a directory was saved at (from trainer_state.json), or None for a foreign one."""
    try:
        return int(json.loads((path / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file())


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint-N directories of a run, oldest first (temporary half-written ones are ignored)."""
    run_dir = Path(run_dir)
    found = []
    for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        m = re.fullmatch(CHECKPOINT_PREFIX + r"(\d+)", p.name)
        if m and p.is_dir() and is_complete_checkpoint(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run's OUT_DIR means its newest complete checkpoint or final model; any other directory means itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    candidates = list_checkpoints(path)
    if is_complete_checkpoint(path):
        if not candidates:
            return path
        own, newest = checkpoint_step(path), checkpoint_step(candidates[-1])
        if own is None or newest is None or own >= newest:
            return path
    if candidates:
        return candidates[-1]
    return path  # not a checkpoint: read_config names what is missing


# -----------------------------------------------------------------------------
# Weight-only int8: int8 weights with one scale per output channel, activations stay in floating point

INT8_METHOD = "int8_weight_only"  # config.json's quantization_config.quant_method for save_int8_checkpoint
INT8_FUSED_ROWS = 4  # compiled Int8Linear: up to this many input rows, fuse dequantization into the product
INT8_BLOCK_ROWS = 1024  # eager Int8Linear: weight rows dequantized at a time (a float block that fits in cache)


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is stored as int8 with one scale per output channel (row):
    W ~= weight * weight_scale[:, None]. Decoding is bound by reading the weights, so a quarter of fp32's
    bytes is what makes it faster; accuracy stays close because each row gets its own range."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.float32, device=None, persistent=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                             persistent=persistent)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device),
                             persistent=persistent)

    @classmethod
    def empty_like(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.in_features, linear.out_features, linear.weight.dtype, linear.weight.device)

    @classmethod
    def quantize(cls, linear: nn.Linear) -> "Int8Linear":
        return cls.from_weight(linear.weight)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, persistent: bool = True) -> "Int8Linear":
        """Symmetric round-to-nearest: each row's largest |w| maps to 127."""
        q = cls(weight.size(1), weight.size(0), weight.dtype, weight.device, persistent)
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        q.weight_scale.copy_(scale)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scale is applied to the output, not the weight: one multiply per output instead of per weight.
        scale = self.weight_scale.to(x.dtype)
        if torch.compiler.is_compiling() and x.numel() <= INT8_FUSED_ROWS * self.in_features:
            # A few rows (a decode step): written as product-and-sum, the compiler fuses the int8 -> float
            # conversion into the reduction and reads each weight byte once; F.linear needs a float copy of
            # the weight first, four times its bytes written and read again.
            return (x[..., None, :] * self.weight.to(x.dtype)).sum(-1) * scale
        # Eagerly, dequantize a block of rows at a time: its float copy stays in cache instead of going to memory.
        w = self.weight.split(INT8_BLOCK_ROWS)
        return torch.cat([F.linear(x, block.to(x.dtype)) for block in w], dim=-1) * scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def replace_linears(model: LLM, make: Callable[[nn.Linear], nn.Module]) -> LLM:
    """Swap every Linear inside the blocks for make(linear). The embedding and output head stay as they are
    (quantize_output_head gives the head an unsaved int8 copy: a tied head is the embedding's lookup table too)."""
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, make(child))
    return model


def quantize_output_head(model: LLM) -> None:
    """An int8 copy of the output head for the logits (a quarter of the bytes read per decoded token). It is
    not saved: the checkpoint keeps the floating-point head (the tied embedding), which lookups need anyway."""
    with torch.no_grad():
        model.int8_head = Int8Linear.from_weight(model.output_weight, persistent=False)


def quantize_int8(model: LLM) -> LLM:
    """Quantize the model's block weights and output head to int8 in place (per output channel); returns it."""
    with torch.no_grad():
        replace_linears(model, Int8Linear.quantize)
    quantize_output_head(model)
    return model


def is_int8(model: LLM) -> bool:
    return any(isinstance(m, Int8Linear) for m in getattr(model, "_orig_mod", model).modules())


def read_quantization(path: str | os.PathLike) -> dict | None:
    """config.json's quantization_config, refusing quantization methods this code cannot run."""
    f = Path(path) / CONFIG_FILE
    try:
        q = json.loads(f.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # read_config reports a missing or malformed config.json
    if q and q.get("quant_method") != INT8_METHOD:
        raise CheckpointError(f"{f}: quantization_config.quant_method={q.get('quant_method')!r} is not supported "
                              f"(only {INT8_METHOD!r}, written by save_int8_checkpoint)")
    return q or None


def save_int8_checkpoint(model: LLM, path: str | os.PathLike, extra: Callable[[Path], None] | None = None,
                         token_ids: dict | None = None) -> Path:
    """Save a weight-only int8 checkpoint (the model is quantized first if it is not already): the usual
    directory, with int8 `*.weight` and floating-point `*.weight_scale` tensors for the block Linears and
    config.json's quantization_config naming the method, so load_model rebuilds Int8Linear layers.
    transformers cannot load this format; keep the floating-point checkpoint for Hugging Face tools."""
    raw = getattr(model, "_orig_mod", model)
    if not is_int8(raw):
        import copy
        raw = quantize_int8(copy.deepcopy(raw))

    def add_quantization(tmp: Path) -> None:
        d = json.loads((tmp / CONFIG_FILE).read_text(encoding="utf-8"))
        d["quantization_config"] = {"quant_method": INT8_METHOD, "bits": 8, "symmetric": True,
                                    "granularity": "per_output_channel", "modules": "model.layers.*.*.*_proj"}
        (tmp / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
        if extra is not None:
            extra(tmp)

    return save_checkpoint(raw, path, extra=add_quantization, token_ids=token_ids)


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
