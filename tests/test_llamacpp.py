"""Our GGUF export in llama.cpp itself (the prebuilt CPU build node-llama-cpp ships, driven by
tests/llamacpp/greedy.mjs): it tokenizes as transformers does and decodes transformers' greedy tokens from the
same checkpoint; q8_0 is compared with fp32 alongside our own int8. .ci/run installs node-llama-cpp."""

import json
import shutil
import subprocess

import pytest
import torch

import checkpoint
import export_model
import modern_llm
from conftest import ROOT

SCRIPT = ROOT / "tests" / "llamacpp" / "greedy.mjs"
INSTALL = "cd tests/llamacpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install"  # what .ci/run does
pytestmark = pytest.mark.skipif(
    not shutil.which("node") or not (SCRIPT.parent / "node_modules" / "node-llama-cpp").is_dir(),
    reason=f"llama.cpp comes from node and node-llama-cpp: {INSTALL}")

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return"]
NEW_TOKENS = 24
SAMPLE = "Héllo wörld <|im_start|>user\nTo be, or not 🎉 日本語<|im_end|>"


def llamacpp(gguf, *flags: str, requests: list[dict] | None = None) -> list[dict]:
    """The node script as a user types it (flags: one request), or fed JSON requests on stdin (one model load for
    several); its JSON replies."""
    stdin = None if requests is None else "".join(json.dumps(r) + "\n" for r in requests)
    done = subprocess.run(["node", str(SCRIPT), f"--model={gguf}", "--threads=1", *flags]
                          + ([] if stdin is None else ["--stdin"]), input=stdin, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def export(ckpt, out, gguf_type: str):
    assert export_model.main([f"--checkpoint={ckpt}", "--format=gguf", f"--gguf_type={gguf_type}", f"--out={out}"]) == 0
    return out


def wandering_checkpoint(path, tokenizer, dtype: torch.dtype):
    """A random model with weights large enough (std 0.2) that greedy decoding wanders over the vocabulary
    instead of repeating one token; GQA with head_dim != d_model / n_head, and every matrix's rows in blocks of
    32 so q8_0 covers them all."""
    torch.manual_seed(4)
    cfg = modern_llm.model_preset("tiny", vocab_size=len(tokenizer), head_dim=32, n_kv_head=2, ffn_hidden=192)
    model = modern_llm.LLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    ids = {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    return checkpoint.save_checkpoint(model, path, extra=tokenizer.save_pretrained, dtype=dtype, token_ids=ids)


def transformers_greedy(ckpt) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy tokens) of transformers for each prompt, end tokens not stopping it (as in the node
    script), in fp32 whatever the checkpoint's dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    runs = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
        runs.append((ids, out[0, len(ids):].tolist()))
    return runs


@pytest.fixture(scope="module")
def fp32_checkpoint(tiny_tokenizer, tmp_path_factory):
    return wandering_checkpoint(tmp_path_factory.mktemp("llamacpp") / "ckpt", tiny_tokenizer, torch.float32)


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_llamacpp_decodes_transformers_greedy_tokens(tiny_tokenizer, fp32_checkpoint, tmp_path, gguf_type):
    """The same prompt text through llama.cpp's tokenizer and model gives transformers' ids and greedy tokens
    on the same checkpoint: an fp32 one as f32, an fp16 one as f16 (its weights then go in unrounded; llama.cpp
    still rounds activations to f16 in its f16 matmuls, and no pick changes on this model)."""
    ckpt = fp32_checkpoint if gguf_type == "f32" else wandering_checkpoint(tmp_path / "ckpt", tiny_tokenizer,
                                                                           torch.float16)
    gguf = export(ckpt, tmp_path / f"{gguf_type}.gguf", gguf_type)
    replies = llamacpp(gguf, requests=[{"prompt": prompt, "new_tokens": NEW_TOKENS} for prompt in PROMPTS])
    for got, (ids, want) in zip(replies, transformers_greedy(ckpt), strict=True):
        assert got["prompt_ids"] == ids
        assert got["new_ids"] == want
        assert len(set(want)) > NEW_TOKENS // 2  # the model wanders, so the comparison means something


def test_llamacpp_q8_0_picks_against_fp32_like_our_int8(fp32_checkpoint, tmp_path, capsys):
    """q8_0 rounds weights in blocks of 32 (and llama.cpp activations too) so some greedy picks differ from
    fp32. Measured along transformers' fp32 greedy path (teacher forcing: the fp32 token is fed back whatever
    was picked), the share of positions whose pick is unchanged, for llama.cpp q8_0 and for our int8 export."""
    gguf = export(fp32_checkpoint, tmp_path / "q8_0.gguf", "q8_0")
    assert export_model.main([f"--checkpoint={fp32_checkpoint}", "--format=int8", f"--out={tmp_path / 'int8'}"]) == 0
    int8 = checkpoint.load_model(tmp_path / "int8").eval()
    paths = transformers_greedy(fp32_checkpoint)
    replies = llamacpp(gguf, requests=[{"ids": ids, "follow": want, "new_tokens": NEW_TOKENS} for ids, want in paths])
    same_q8 = same_int8 = total = 0
    for reply, (ids, want) in zip(replies, paths, strict=True):
        got = reply["new_ids"]
        with torch.no_grad():
            picks = int8(torch.tensor([ids + want]))[0, len(ids) - 1:-1].argmax(-1).tolist()
        same_q8 += sum(a == b for a, b in zip(got, want))
        same_int8 += sum(a == b for a, b in zip(picks, want))
        total += len(want)
    with capsys.disabled():
        print(f"\nsame greedy pick as fp32 along its path: llama.cpp q8_0 {same_q8}/{total}, "
              f"our int8 {same_int8}/{total}")
    # A wrong block layout or scale would agree on ~1/400 of the picks; both quantizers keep nearly all of them.
    assert same_q8 >= 0.8 * total and same_int8 >= 0.8 * total


@pytest.mark.parametrize("adds_bos", [False, True])
def test_llamacpp_adds_bos_exactly_when_transformers_does(tiny_tokenizer, tmp_path, adds_bos):
    """The GGUF states add_bos_token/add_eos_token as transformers' tokenizer behaves (ours adds nothing; a
    tokenizer whose post-processor puts BOS first must get it from llama.cpp too), and special tokens and
    multi-byte characters in the text tokenize to the same ids."""
    from conftest import make_checkpoint
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_checkpoint(tmp_path / "base", tiny_tokenizer)))
    if adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    ckpt = make_checkpoint(tmp_path / "ckpt", tok)
    want = AutoTokenizer.from_pretrained(str(ckpt)).encode(SAMPLE)
    assert (want[0] == tok.bos_token_id) == adds_bos
    [got] = llamacpp(export(ckpt, tmp_path / "m.gguf", "f32"), f"--prompt={SAMPLE}", "--new_tokens=0")
    assert (got["add_bos"], got["add_eos"]) == (adds_bos, False)
    assert got["prompt_ids"] == want
