"""
The checkpoint directory: a Hugging Face Llama folder that `transformers` loads as it is.

- config.json <-> ModelConfig (Llama, or Qwen3 when QK-norm is on), refusing by field name what the model cannot
  represent;
- model.safetensors (or shards and their index) with Hugging Face tensor names, written atomically: a process
  killed at any instant leaves the old directory or the complete new one;
- a run's OUT_DIR: its checkpoint-N folders, the newest complete one, the final model beside them;
- weight-only int8: the Int8Linear layer and the int8 checkpoint format.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import UserError
from modern_llm import LLM, ModelConfig, rope_inv_freq

# -----------------------------------------------------------------------------
# config.json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
STATE_FILE = "trainer_state.json"  # {"global_step": N, "task": "pretrain" or "sft", ...} beside a trained model
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


def saved_state(path: Path) -> dict:
    """trainer_state.json of a directory, or {} for one trained elsewhere (or an unreadable record)."""
    try:
        state = json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def checkpoint_step(path: Path) -> int | None:
    """The training step a directory was saved at (from trainer_state.json), or None for a foreign one."""
    try:
        return int(saved_state(path)["global_step"])
    except (KeyError, TypeError, ValueError):
        return None


def trained_on_chats(path: str | os.PathLike) -> bool:
    """Whether this toolkit's last training of the model was chat fine-tuning (trainer_state.json's task "sft").
    A model trained elsewhere has no such record, so this says False: the chat page then starts in completion
    mode, which any model can do."""
    return saved_state(path).get("task") == "sft"


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
        raw = quantize_int8(copy.deepcopy(raw))

    def add_quantization(tmp: Path) -> None:
        d = json.loads((tmp / CONFIG_FILE).read_text(encoding="utf-8"))
        d["quantization_config"] = {"quant_method": INT8_METHOD, "bits": 8, "symmetric": True,
                                    "granularity": "per_output_channel", "modules": "model.layers.*.*.*_proj"}
        (tmp / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
        if extra is not None:
            extra(tmp)

    return save_checkpoint(raw, path, extra=add_quantization, token_ids=token_ids)
