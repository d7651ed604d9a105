"""
Take a checkpoint out of the toolkit. The checkpoint directory already is a Hugging Face Llama directory; this
script writes the other forms:

    python export_model.py --checkpoint=out --format=onnx             # out-onnx/model.onnx (input_ids -> logits)
    python export_model.py --checkpoint=out --format=onnx --kv_cache  # + decoder_with_past.onnx
    python export_model.py --checkpoint=out --format=int8             # out-int8/, loads like any checkpoint
    python export_model.py --checkpoint=out --format=gguf             # out.gguf, for llama.cpp (pip install gguf)
    python export_model.py --checkpoint=out --format=gguf --gguf_type=q8_0   # 8-bit blocks, llama.cpp's Q8_0

An export is checked before it is put in place (ONNX Runtime against PyTorch on two batch/length shapes) and
written to a temporary path that is renamed to OUT at the end, so an existing OUT is replaced only with --force,
only by a complete, checked export, and a failed or interrupted export leaves nothing behind.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from checkpoint import CONFIG_FILE, is_int8, load_model, quantize_int8, resolve_checkpoint, save_int8_checkpoint
from cli import UserError, check_output_path, parse_flags, run_main, settings_block, stop_requests
from modern_llm import count_params

CHECKPOINT = "out"  # checkpoint directory, or a training run's OUT_DIR (meaning its newest checkpoint)
FORMAT = "onnx"  # onnx, int8 or gguf
OUT = ""  # output path; empty: beside --checkpoint, named out-onnx, out-int8 or out.gguf for --checkpoint=out
FORCE = False  # replace OUT if it already exists
KV_CACHE = False  # onnx: also write decoder_with_past.onnx (past keys/values in, present out) for fast decoding
TOLERANCE = 1e-4  # onnx: largest accepted |ONNX Runtime - PyTorch| logit, relative to the largest logit (>= 1)
INT8_TOLERANCE = 0.05  # int8: warn above this |int8 - fp32| logit error, relative to the largest logit (>= 1)
GGUF_TYPE = "f16"  # gguf: f16, f32 or q8_0 for the weight matrices (norms stay f32); llama-quantize goes lower
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

# Files copied so an export directory is self-contained, and the names of what is written.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CONFIG_FILES = (CONFIG_FILE, "generation_config.json")
ONNX_FILE = "model.onnx"
ONNX_PAST_FILE = "decoder_with_past.onnx"
PROTOBUF_LIMIT = 2 * 1024**3  # an .onnx file cannot exceed 2 GB: bigger weights go to a .data file beside it


# -----------------------------------------------------------------------------
# ONNX


class PastKV:
    """Stands in for the model's preallocated KVCache: instead of writing into fixed slots (an in-place update
    ONNX cannot express as an input/output pair) it appends the new keys/values to the past ones it was given,
    so the grown tensors can be returned as the `present` outputs."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, slots, k: torch.Tensor, v: torch.Tensor, view=None) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        return self.k, self.v


class DecoderWithPast(nn.Module):
    """(input_ids, past k/v of every layer) -> (logits, present k/v): one step of incremental decoding.

    Past tensors are (batch, kv heads, past length, head dim); a past length of 0 is the prompt. The new tokens
    sit at positions past..past+T-1 of every row, so rows must have equal length (no padding)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.llm = model

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]):
        T, P = input_ids.shape[1], past[0].shape[2]
        pos = torch.arange(P, P + T, device=input_ids.device)
        mask = torch.arange(P + T, device=input_ids.device)[None, :] <= pos[:, None]  # causal over past + new
        layers = self.llm.model.layers
        caches = [PastKV(past[2 * i], past[2 * i + 1]) for i in range(len(layers))]
        for layer, cache in zip(layers, caches):
            layer.self_attn.kv_cache = cache
        try:
            logits = self.llm(input_ids, pos=pos, mask=mask)
        finally:
            for layer in layers:
                layer.self_attn.kv_cache = None
        return logits, [t for c in caches for t in (c.k, c.v)]


def past_names(n_layer: int, prefix: str) -> list[str]:
    """Per-layer key/value tensor names, as Hugging Face Optimum names them (past_key_values.0.key, ...)."""
    return [f"{prefix}.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def empty_past(cfg, batch: int, length: int = 0) -> list[torch.Tensor]:
    return [torch.zeros(batch, cfg.n_kv_head, length, cfg.head_dim) for _ in range(2 * cfg.n_layer)]


def export_onnx(model: nn.Module, out_dir: Path, kv_cache: bool) -> None:
    """model.onnx: input_ids (batch, seq) -> logits (batch, seq, vocab), both axes dynamic; with kv_cache also
    decoder_with_past.onnx. Uses the torch.export-based exporter (onnxscript)."""
    cfg = model.cfg
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    external = count_params(cfg) * 4 > PROTOBUF_LIMIT * 0.9
    ids = torch.zeros(2, 8, dtype=torch.long)
    # The exporter's chatter (skipped torchvision ops, deprecations inside torch) says nothing about this model.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # Ctrl-C waits for the export under way to return: a KeyboardInterrupt raised inside torch.export's tracing
    # crashed the process (SIGSEGV) instead of stopping it; a second Ctrl-C interrupts at once.
    with warnings.catch_warnings(), stop_requests() as stop:
        warnings.filterwarnings("ignore", module=r"torch\.|copyreg")
        torch.onnx.export(model, (ids,), str(out_dir / ONNX_FILE), input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes={"idx": {0: batch, 1: seq}}, dynamo=True,
                          external_data=external, verbose=False)
        if stop:
            raise KeyboardInterrupt
        if kv_cache:
            n = cfg.n_layer
            torch.onnx.export(DecoderWithPast(model).eval(), (ids, empty_past(cfg, 2, 3)),
                              str(out_dir / ONNX_PAST_FILE),
                              input_names=["input_ids"] + past_names(n, "past_key_values"),
                              output_names=["logits"] + past_names(n, "present"),
                              dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                              "past": [{0: batch, 2: past}] * (2 * n)},
                              dynamo=True, external_data=external, verbose=False)
            if stop:
                raise KeyboardInterrupt


def max_error(got, want: torch.Tensor) -> float:
    """Largest absolute difference, relative to the largest reference logit when that is above 1."""
    want = want.detach().float()
    return float((torch.as_tensor(got).float() - want).abs().max() / max(1.0, float(want.abs().max())))


def check_onnx(model: nn.Module, out_dir: Path, kv_cache: bool, tolerance: float) -> float:
    """Run the exported files in ONNX Runtime on two batch/length shapes and compare with PyTorch; the decoder
    with past is checked on a prompt and then one decoding step fed with its own present outputs."""
    import onnxruntime as ort

    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, min(5, cfg.max_seq_len)), (3, min(37, cfg.max_seq_len))]
    session = ort.InferenceSession(str(out_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for shape in shapes:
            ids = torch.randint(0, cfg.vocab_size, shape, generator=gen)
            worst = max(worst, max_error(session.run(None, {"input_ids": ids.numpy()})[0], model(ids)))
        if kv_cache:
            session = ort.InferenceSession(str(out_dir / ONNX_PAST_FILE), providers=["CPUExecutionProvider"])
            ids = torch.randint(0, cfg.vocab_size, shapes[1], generator=gen)
            prompt, step = ids[:, :-1], ids[:, -1:]
            feeds = dict(zip(past_names(cfg.n_layer, "past_key_values"), (t.numpy() for t in empty_past(cfg, 3))))
            logits, *present = session.run(None, {"input_ids": prompt.numpy(), **feeds})
            worst = max(worst, max_error(logits, model(prompt)))
            feeds = dict(zip(past_names(cfg.n_layer, "past_key_values"), present))
            logits, *_ = session.run(None, {"input_ids": step.numpy(), **feeds})
            worst = max(worst, max_error(logits, model(ids)[:, -1:]))
    if worst > tolerance:
        raise RuntimeError(f"ONNX Runtime logits differ from PyTorch by {worst:.2e} (> {tolerance:g}): "
                           "the export is wrong; nothing was written")
    return worst


def onnx_export(model: nn.Module, checkpoint: Path, out: Path, cfg: dict) -> str:
    out.mkdir()
    export_onnx(model, out, cfg["kv_cache"])
    copy_files(checkpoint, out, TOKENIZER_FILES + CONFIG_FILES)
    err = check_onnx(model, out, cfg["kv_cache"], cfg["tolerance"])
    return f"ONNX Runtime matches PyTorch: max logit difference {err:.1e} (relative, tolerance {cfg['tolerance']:g})"


# -----------------------------------------------------------------------------
# Weight-only int8 (the format lives in modern_llm.py, so every script loads it)


def int8_export(model: nn.Module, checkpoint: Path, out: Path, cfg: dict) -> str:
    """An int8 checkpoint directory, loaded back to measure what quantization cost: the logit error against
    the fp32 model and whether the most likely next token is still the same. What stays in floating point (the
    tied embedding, norms, scales) keeps the dtype the checkpoint was saved in."""
    hf = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(hf.get("torch_dtype") or hf.get("dtype"),
                                                                       torch.float32)
    ids = {"bos_id": hf.get("bos_token_id"), "eos_id": hf.get("eos_token_id"), "pad_id": hf.get("pad_token_id")}
    int8 = quantize_int8(copy.deepcopy(model).to(dtype))
    save_int8_checkpoint(int8, out, extra=lambda tmp: copy_files(checkpoint, tmp, TOKENIZER_FILES),
                         token_ids=ids)
    int8 = load_model(out, "cpu", torch.float32).eval()
    x = torch.randint(0, model.cfg.vocab_size, (2, min(64, model.cfg.max_seq_len)),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(x), int8(x)
    err, agree = max_error(got, want), (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    mb = [sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e6 for p in (checkpoint, out)]
    message = (f"weights {mb[0]:.2f} MB -> {mb[1]:.2f} MB (the embedding and norms stay {str(dtype)[6:]}); "
               f"max logit error {err:.2e} relative to the largest logit; same top-1 token {agree:.1%}")
    if err > cfg["int8_tolerance"]:
        message += f"\nwarning: the logit error is above --int8_tolerance={cfg['int8_tolerance']:g}"
    return message


# -----------------------------------------------------------------------------
# GGUF (llama.cpp)


def rope_interleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's q/k output rows from Hugging Face's rotate-half RoPE layout (dimension i pairs with
    i + head_dim/2) to llama.cpp's (2i pairs with 2i+1), as llama.cpp's convert_hf_to_gguf.py does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def added_special_tokens(tok, checkpoint: Path) -> dict[str, bool]:
    """Whether transformers' encode puts BOS first and EOS last, found by encoding, so that the GGUF states it
    (add_bos_token / add_eos_token) instead of leaving it to llama.cpp's default for the tokenizer model."""
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    bos = tok.bos_token_id is not None and full[0] == tok.bos_token_id != plain[0]
    eos = tok.eos_token_id is not None and full[-1] == tok.eos_token_id != plain[-1]
    if len(full) != len(plain) + bos + eos:
        raise UserError(f"{checkpoint}: the tokenizer adds tokens other than BOS/EOS to every text, which llama.cpp "
                        "cannot repeat; use llama.cpp's convert_hf_to_gguf.py", "Export errors")
    return {"bos": bos, "eos": eos}


def gguf_vocab(tok, checkpoint: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every token id's string (byte-level BPE spelling, as tokenizer.json has it) and llama.cpp token type;
    ids the model has beyond the tokenizer become unused [PADn] tokens."""
    import gguf

    by_id = {i: t for t, i in tok.get_vocab().items()}
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    added = set(tok.added_tokens_decoder)
    if max(by_id) >= vocab_size:
        raise UserError(f"{checkpoint}: the tokenizer has token id {max(by_id)}, the model only {vocab_size} "
                        "embeddings", "Checkpoint does not load")
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.CONTROL if i in special
                     else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    return tokens, types


def gguf_export(model: nn.Module, checkpoint: Path, out: Path, cfg: dict) -> str:
    """A llama-architecture GGUF file with the byte-level BPE tokenizer ("gpt2" in llama.cpp's terms, GPT-2's
    pre-tokenizer) and the chat template, read back with gguf's reader before it is put in place."""
    if is_int8(model):
        raise UserError(f"{checkpoint} is an int8 checkpoint: export GGUF from the floating-point one (and "
                        "quantize with llama.cpp's llama-quantize)", "Export errors")
    try:
        import gguf
    except ImportError:
        raise UserError("--format=gguf needs the gguf package: pip install gguf", "Export errors") from None
    c = model.cfg
    if c.qk_norm or c.rope_scaling:
        raise UserError("--format=gguf writes Llama models only: this checkpoint has qk_norm or rope_scaling; "
                        "use llama.cpp's convert_hf_to_gguf.py on the checkpoint directory", "Export errors")
    Q = gguf.GGMLQuantizationType
    types = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
             "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
    if cfg["gguf_type"] not in types:
        raise UserError(f"unknown --gguf_type={cfg['gguf_type']!r}; choose f16, f32 or q8_0", "Export errors")
    matrix_type, file_type = types[cfg["gguf_type"]]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    tokens, token_types = gguf_vocab(tok, checkpoint, c.vocab_size)

    w = gguf.GGUFWriter(str(out), arch="llama")
    w.add_name(checkpoint.name)
    hyperparameters = {  # llama.cpp's llama.* keys, through the writer's add_<key> methods
        "context_length": c.max_seq_len, "embedding_length": c.d_model, "block_count": c.n_layer,
        "feed_forward_length": c.ffn_hidden, "head_count": c.n_head, "head_count_kv": c.n_kv_head,
        "key_length": c.head_dim, "value_length": c.head_dim, "rope_dimension_count": c.head_dim,
        "rope_freq_base": c.rope_theta, "layer_norm_rms_eps": c.norm_eps, "vocab_size": c.vocab_size,
        "file_type": file_type,
    }
    for key, value in hyperparameters.items():
        getattr(w, f"add_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # our ByteLevel pre-tokenizer splits with GPT-2's regex
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    vocab = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=c.vocab_size)
    if isinstance(vocab.chat_template, str):  # {% generation %} marks training masks; llama.cpp's Jinja lacks it
        vocab.chat_template = vocab.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    vocab.add_special_token = added_special_tokens(tok, checkpoint)  # what transformers does, not a guess
    vocab.add_to_gguf(w, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.n_layer)
    for key, t in model.state_dict().items():
        if key.endswith("q_proj.weight"):
            t = rope_interleave(t, c.n_head)
        elif key.endswith("k_proj.weight"):
            t = rope_interleave(t, c.n_kv_head)
        data = t.detach().float().numpy()
        qtype = matrix_type if data.ndim == 2 else Q.F32
        try:
            data = gguf.quants.quantize(data, qtype)
        except gguf.quants.QuantError:  # q8_0 needs rows in blocks of 32; llama.cpp's converter falls back alike
            qtype, data = Q.F16, data.astype(np.float16)
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    back = gguf.GGUFReader(str(out))
    arch = back.get_field("general.architecture")
    if arch.contents() != "llama" or len(back.tensors) != len(model.state_dict()):
        raise RuntimeError(f"{out}: the GGUF file does not read back as written; nothing was written")
    return (f"GGUF reads back: llama, {len(back.tensors)} tensors ({cfg['gguf_type']}), {len(tokens)} tokens, "
            f"{out.stat().st_size / 1e6:.2f} MB")


# -----------------------------------------------------------------------------
# Writing the output safely


def copy_files(checkpoint: Path, out_dir: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out_dir / name)


def check_copied_files(checkpoint: Path) -> None:
    """The tokenizer and config files an export copies must load, checked before any work: a damaged one would
    be copied as it is, and the export would look fine until someone loaded it."""
    for name in TOKENIZER_FILES + CONFIG_FILES:
        f = checkpoint / name
        if f.suffix == ".json" and f.is_file():
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise UserError(f"{f} is damaged ({e}): copy it again from where the checkpoint came from",
                                "Checkpoint does not load") from None
    if (checkpoint / "tokenizer.json").is_file():
        from prepare_data import load_tokenizer

        load_tokenizer(checkpoint)


def write_atomically(out: Path, build: Callable[[Path], str], force: bool) -> str:
    """build(staged) writes the export (a file or a directory) at `staged`, a path in a temporary directory
    beside `out`; only then is it renamed to `out`, moving any old `out` (with force) aside first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # ".export-", not ".<name>": the training script sweeps ".checkpoint-*" leftovers out of a run directory.
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{out.name}.tmp-", dir=out.parent))
    try:
        staged = tmp / out.name
        message = build(staged)
        if out.exists() or out.is_symlink():
            if not force:  # it appeared while we were exporting
                raise UserError(f"{out} already exists; pass --force to replace it", "Export errors")
            os.replace(out, tmp / "old")
        os.replace(staged, out)
        return message
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_out(checkpoint: Path, fmt: str) -> Path:
    """Beside what the user named (a run's OUT_DIR, not inside it): out -> out-onnx, out-int8, out.gguf."""
    checkpoint = checkpoint.resolve()
    suffix = {"gguf": ".gguf"}.get(fmt, f"-{fmt}")
    return checkpoint.parent / f"{checkpoint.name}{suffix}"


def check_out(out: Path, given: Path, checkpoint: Path, force: bool) -> None:
    """Refuse an OUT that exists (without --force) or that would replace the checkpoint or the run holding it."""
    out_abs = out.resolve()
    for p in (given.resolve(), checkpoint.resolve()):
        if out_abs == p or out_abs in p.parents:
            raise UserError(f"--out={out} would replace the checkpoint {p}; choose another path", "Export errors")
    if (out.exists() or out.is_symlink()) and not force:
        raise UserError(f"{out} already exists; pass --force to replace it", "Export errors")


FORMATS: dict[str, Callable[[nn.Module, Path, Path, dict], str]] = {
    "onnx": onnx_export,
    "int8": int8_export,
    "gguf": gguf_export,
}


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    fmt = cfg["format"].lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown --format={cfg['format']!r}; choose one of {', '.join(FORMATS)}", "Export errors")
    checkpoint = resolve_checkpoint(cfg["checkpoint"])
    out = Path(cfg["out"]) if cfg["out"] else default_out(Path(cfg["checkpoint"]), fmt)
    check_out(out, Path(cfg["checkpoint"]), checkpoint, cfg["force"])
    check_output_path(out, "--out", folder=fmt != "gguf", beside=True)
    model = load_model(checkpoint, "cpu", torch.float32).eval()
    check_copied_files(checkpoint)
    print(f"exporting {checkpoint} ({count_params(model.cfg) / 1e6:.1f}M parameters) as {fmt} to {out}")
    message = write_atomically(out, lambda staged: FORMATS[fmt](model, checkpoint, staged, cfg), cfg["force"])
    print(message)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
