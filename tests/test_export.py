"""export_model.py: ONNX Runtime agrees with PyTorch, the int8 checkpoint loads and generates, and bad inputs are
refused in one line without touching what already exists."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import cli
import export_model
from conftest import ROOT


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Run the script in-process as the command line would: (exit code, stdout + stderr)."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(export_model.main, argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out + captured.err


@pytest.fixture(scope="module")
def onnx_dir(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "exported"
    assert export_model.main([f"--checkpoint={tiny_checkpoint}", "--format=onnx", "--kv_cache", f"--out={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def fp32_model(tiny_checkpoint):
    return checkpoint.load_model(tiny_checkpoint).eval()


# -----------------------------------------------------------------------------
# ONNX


def test_onnx_logits_match_pytorch_for_two_shapes_from_one_file(onnx_dir, fp32_model):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 7), (4, 50)]:
        ids = torch.randint(0, fp32_model.cfg.vocab_size, shape, generator=gen)
        got = session.run(None, {"input_ids": ids.numpy()})[0]
        with torch.no_grad():
            want = fp32_model(ids).numpy()
        assert got.shape == want.shape == (*shape, fp32_model.cfg.vocab_size)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_onnx_decoder_with_past_decodes_like_the_full_forward(onnx_dir, fp32_model):
    """Greedy decoding through decoder_with_past.onnx, feeding back its present tensors, picks the same tokens
    with the same logits as running PyTorch on the whole sequence at every step."""
    import onnxruntime as ort

    cfg = fp32_model.cfg
    session = ort.InferenceSession(str(onnx_dir / "decoder_with_past.onnx"), providers=["CPUExecutionProvider"])
    names = export_model.past_names(cfg.n_layer, "past_key_values")
    seq = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    feeds = {n: np.zeros((2, cfg.n_kv_head, 0, cfg.head_dim), np.float32) for n in names}
    new = seq
    for _ in range(6):
        logits, *present = session.run(None, {"input_ids": new.numpy(), **feeds})
        with torch.no_grad():
            want = fp32_model(seq)[:, -1]
        np.testing.assert_allclose(logits[:, -1], want.numpy(), rtol=0, atol=1e-4)
        assert present[0].shape == (2, cfg.n_kv_head, seq.shape[1], cfg.head_dim)
        new = torch.from_numpy(logits[:, -1].argmax(-1))[:, None]
        seq = torch.cat([seq, new], dim=1)
        feeds = dict(zip(names, present))


def test_onnx_directory_is_self_contained(onnx_dir, tiny_tokenizer):
    from transformers import AutoTokenizer

    assert {"config.json", "tokenizer.json", "model.onnx", "decoder_with_past.onnx"} <= set(os.listdir(onnx_dir))
    text = "To be, or not to be"
    assert AutoTokenizer.from_pretrained(str(onnx_dir)).encode(text) == tiny_tokenizer.encode(text)
    assert not [p for p in os.listdir(onnx_dir.parent) if p.startswith(".")]  # no temporary directory left


# -----------------------------------------------------------------------------
# int8


def test_int8_checkpoint_loads_generates_and_stays_close_to_fp32(tiny_checkpoint, fp32_model, tmp_path, capsys):
    from safetensors import safe_open

    from engine import Engine
    from sampling import SamplingParams

    out = tmp_path / "int8"
    code, text = run([f"--checkpoint={tiny_checkpoint}", "--format=int8", f"--out={out}"], capsys)
    assert code == 0, text
    assert "max logit error" in text and "MB" in text
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.int8
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert (out / "model.safetensors").stat().st_size < (tiny_checkpoint / "model.safetensors").stat().st_size

    int8 = checkpoint.load_model(out).eval()
    assert checkpoint.is_int8(int8)
    ids = torch.randint(0, int8.cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = fp32_model(ids), int8(ids)
    assert export_model.max_error(got, want) <= export_model.INT8_TOLERANCE
    assert export_model.max_error(got, want) > 0  # it really is quantized

    engine = Engine(out, device="cpu", dtype="float32")
    prompt = engine.tokenizer.encode("The quick brown fox")
    done = engine.generate([prompt], [SamplingParams(max_new_tokens=8, temperature=0)])[0]
    assert done.completion_tokens >= 1
    seq = torch.tensor([prompt])
    for token in done.token_ids:  # greedy: each generated token is the int8 model's argmax
        with torch.no_grad():
            assert int(int8(seq)[0, -1].argmax()) == token
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)


# -----------------------------------------------------------------------------
# Bad inputs


def test_missing_checkpoint_is_one_line_error_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "export_model.py"), f"--checkpoint={tmp_path / 'nope'}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: checkpoint directory") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_unknown_format_is_refused(tiny_checkpoint, tmp_path, capsys):
    code, text = run([f"--checkpoint={tiny_checkpoint}", "--format=tflite", f"--out={tmp_path / 'x'}"], capsys)
    assert code == 2 and "unknown --format='tflite'" in text and "onnx" in text
    assert not (tmp_path / "x").exists()


def test_existing_output_is_kept_without_force_and_replaced_with_it(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, text = run([f"--checkpoint={tiny_checkpoint}", "--format=int8", f"--out={out}"], capsys)
    assert code == 2 and "already exists" in text and "--force" in text
    assert os.listdir(out) == ["precious.txt"] and (out / "precious.txt").read_text() == "keep me"

    code, text = run([f"--checkpoint={tiny_checkpoint}", "--format=int8", f"--out={out}", "--force"], capsys)
    assert code == 0, text
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory or old copy left behind


def test_failed_export_leaves_the_old_output_and_no_debris(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")

    def broken(model, checkpoint, staged, cfg):
        staged.mkdir()
        (staged / "half.bin").write_bytes(b"x")
        raise RuntimeError("export failed half way")

    monkeypatch.setitem(export_model.FORMATS, "onnx", broken)
    with pytest.raises(RuntimeError):
        export_model.main([f"--checkpoint={tiny_checkpoint}", "--format=onnx", f"--out={out}", "--force"])
    assert os.listdir(out) == ["precious.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_output_that_would_replace_the_checkpoint_is_refused(tiny_checkpoint, capsys):
    before = sorted(os.listdir(tiny_checkpoint))
    for out in (tiny_checkpoint, tiny_checkpoint.parent):
        code, text = run([f"--checkpoint={tiny_checkpoint}", "--format=int8", f"--out={out}", "--force"], capsys)
        assert code == 2 and "would replace the checkpoint" in text
    assert sorted(os.listdir(tiny_checkpoint)) == before


# -----------------------------------------------------------------------------
# GGUF


@pytest.mark.skipif(not __import__("importlib").util.find_spec("gguf"), reason="gguf is optional: pip install gguf")
def test_gguf_reads_back_in_transformers_with_same_logits_and_tokens(tiny_tokenizer, tmp_path, capsys):
    """transformers' GGUF loader undoes llama.cpp's conventions (interleaved RoPE rows, token spellings), so equal
    logits and token ids show the file follows them. GQA with head_dim != d_model / n_head covers the
    key_length and per-KV-head reordering."""
    from conftest import make_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer, seed=4, head_dim=32, n_kv_head=2)
    code, text = run([f"--checkpoint={ckpt}", "--format=gguf", "--gguf_type=f32"], capsys)
    assert code == 0, text
    out = tmp_path / "ckpt.gguf"
    assert "GGUF reads back" in text and out.is_file()

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    ours = checkpoint.load_model(ckpt).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-4)

    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    sample = "Héllo wörld <|im_start|>user\nTo be, or not 🎉 日本語<|im_end|>"
    assert tok.encode(sample) == tiny_tokenizer.encode(sample)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert "<|im_start|>" in tok.chat_template and "{% generation %}" not in tok.chat_template


@pytest.mark.skipif(not __import__("importlib").util.find_spec("gguf"), reason="gguf is optional: pip install gguf")
def test_gguf_q8_0_reads_back_in_transformers_close_to_fp32(tiny_tokenizer, tmp_path, capsys):
    """transformers' GGUF loader dequantizes Q8_0 itself, so logits near the fp32 model's show the blocks and
    scales are laid out as llama.cpp reads them (a wrong layout gives noise). ffn_hidden 176 is no multiple of 32:
    the down projection stays f16."""
    import gguf
    from conftest import make_checkpoint
    from transformers import AutoModelForCausalLM

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_tokenizer, seed=4)
    code, text = run([f"--checkpoint={ckpt}", "--format=gguf", "--gguf_type=q8_0"], capsys)
    assert code == 0, text
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "ckpt.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="ckpt.gguf", dtype=torch.float32).eval()
    ours = checkpoint.load_model(ckpt).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = ours(ids), hf(ids).logits
    assert export_model.max_error(got, want) < 0.02
    assert export_model.max_error(got, want) > 1e-5  # it really is quantized


def test_gguf_without_the_package_names_it(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    code, text = run([f"--checkpoint={tiny_checkpoint}", "--format=gguf", f"--out={tmp_path / 'm.gguf'}"], capsys)
    assert code == 2 and "pip install gguf" in text
    assert os.listdir(tmp_path) == []


def test_gguf_from_an_int8_checkpoint_is_refused(tiny_checkpoint, tmp_path, capsys):
    assert run([f"--checkpoint={tiny_checkpoint}", "--format=int8", f"--out={tmp_path / 'q'}"], capsys)[0] == 0
    code, text = run([f"--checkpoint={tmp_path / 'q'}", "--format=gguf", f"--out={tmp_path / 'q.gguf'}"], capsys)
    assert code == 2 and "int8 checkpoint" in text and not (tmp_path / "q.gguf").exists()


def test_only_the_documented_constants_are_flags():
    flags = set(export_model._FLAG_DEFAULTS)
    assert flags == {"CHECKPOINT", "FORMAT", "OUT", "FORCE", "KV_CACHE", "TOLERANCE", "INT8_TOLERANCE", "GGUF_TYPE"}


def test_a_run_directory_exports_its_newest_checkpoint_beside_the_run(tiny_tokenizer, tmp_path, capsys):
    from conftest import make_checkpoint

    run_dir = tmp_path / "run"
    for step in (1, 2):
        ckpt = make_checkpoint(run_dir / f"checkpoint-{step}", tiny_tokenizer, seed=step)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    code, text = run([f"--checkpoint={run_dir}", "--format=int8"], capsys)
    assert code == 0, text
    assert f"exporting {run_dir / 'checkpoint-2'} " in text
    assert (tmp_path / "run-int8" / "model.safetensors").is_file()
    assert sorted(os.listdir(run_dir)) == ["checkpoint-1", "checkpoint-2"]
