"""evaluate_model.py: its perplexity and bits per byte agree with the definitions computed independently (with
transformers' Llama on the same checkpoint), and the shipped lm-evaluation-harness task runs offline."""

import json
import math
import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import cli
import evaluate_model
from conftest import ROOT

TEXT = "Héllo wörld, to be or not to be: that is the question. 日本語 🎉 The quick brown fox jumps."


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).eval()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "known.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_one_window_matches_transformers_loss_and_the_definitions(tiny_checkpoint, tiny_tokenizer, hf_model,
                                                                  text_file):
    """The text fits one window, so the loss must be transformers' own mean loss over the sequence."""
    ids = tiny_tokenizer.encode(TEXT) + [tiny_tokenizer.eos_token_id]  # one document, EOS after it
    assert len(ids) < hf_model.config.max_position_embeddings
    x = torch.tensor([ids])
    with torch.no_grad():
        hf_loss = hf_model(input_ids=x, labels=x).loss.item()
    n_bytes = len(TEXT.encode("utf-8"))
    assert n_bytes > len(TEXT)  # multi-byte characters: bytes and characters differ

    m = evaluate_model.evaluate_checkpoint(str(tiny_checkpoint), str(text_file))
    assert m["tokens"] == len(ids) - 1 and m["bytes"] == n_bytes
    assert m["loss"] == pytest.approx(hf_loss, abs=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(hf_loss), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(hf_loss * (len(ids) - 1) / math.log(2) / n_bytes, rel=1e-5)


def test_windows_do_not_overlap_and_predict_every_token_once(tiny_checkpoint, tiny_tokenizer, hf_model,
                                                             text_file):
    """Short windows (the last one partial, batches not dividing the windows): the total is the sum over
    windows tokens[iL : iL+L] -> tokens[iL+1 : iL+L+1], each scored by transformers on its own."""
    seq_len, batch_size = 7, 3
    ids = torch.tensor(tiny_tokenizer.encode(TEXT) + [tiny_tokenizer.eos_token_id])
    assert (len(ids) - 1) % seq_len and math.ceil((len(ids) - 1) / seq_len) % batch_size
    total, targets = 0.0, []
    for s in range(0, len(ids) - 1, seq_len):
        x, y = ids[s:s + seq_len], ids[s + 1:s + seq_len + 1]
        x = x[:len(y)]
        with torch.no_grad():
            total += F.cross_entropy(hf_model(input_ids=x[None]).logits[0], y, reduction="sum").item()
        targets += y.tolist()
    assert targets == ids[1:].tolist()

    seen = [t for _, y in evaluate_model.windows(ids, seq_len, batch_size) for t in y.flatten().tolist() if t != -100]
    assert seen == ids[1:].tolist()
    m = evaluate_model.evaluate_checkpoint(str(tiny_checkpoint), str(text_file), seq_len=seq_len,
                                           batch_size=batch_size)
    assert m["loss"] == pytest.approx(total / (len(ids) - 1), abs=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-5)


def test_command_line_prints_the_metrics(tiny_checkpoint, text_file, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_main(evaluate_model.main, [f"--checkpoint={tiny_checkpoint}", f"--dataset={text_file}",
                                                  "--seq_len=16", "--device=cpu"])
    assert e.value.code == 0
    m = evaluate_model.evaluate_checkpoint(str(tiny_checkpoint), str(text_file), seq_len=16)
    out = capsys.readouterr().out
    assert f"loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  bits/byte {m['bits_per_byte']:.4f}" in out


@pytest.mark.parametrize("flag, message", [
    ("--dataset=", "--dataset=FILE_OR_NAME"),
    ("--seq_len=4096", "exceeds the model's context of 128"),
    ("--batch_size=0", "--batch_size must be >= 1"),
    ("--checkpoint=/nonexistent/run", "does not exist"),
    ("--dataset=/nonexistent/file.txt", "/nonexistent/file.txt"),
])
def test_bad_inputs_are_one_line_errors(tiny_checkpoint, text_file, flag, message, capsys):
    with pytest.raises(SystemExit) as e:  # the last --name=value wins
        cli.run_main(evaluate_model.main, [f"--checkpoint={tiny_checkpoint}", f"--dataset={text_file}", flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.startswith("error: ") and len(err.splitlines()) == 1


# -----------------------------------------------------------------------------
# lm-evaluation-harness on the task shipped in evals/


def choice_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) the way lm-eval scores it: the continuation's tokens are those of
    context + continuation after the context's own tokens."""
    ctx, whole = tokenizer.encode(context), tokenizer.encode(context + continuation)
    with torch.no_grad():
        logp = model(torch.tensor([whole[:-1]]))[0].log_softmax(-1)
    return sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.slow
def test_lm_eval_runs_the_shipped_task_offline(tiny_checkpoint, tiny_tokenizer):
    """The README's lm_eval command on a tiny checkpoint, with no network (the task's data ships in evals/), and
    its accuracy recomputed here from our own model's log-likelihoods."""
    command = (f"lm_eval --model hf --model_args pretrained={tiny_checkpoint},dtype=float32 "
               "--include_path evals --tasks modern_llm_mc --device cpu --batch_size 8")  # README: Evaluation
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(command.split(), capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # its results table: |modern_llm_mc|  1|none  |  0|acc  |↑  |0.2917|±  |0.0948|
    [acc] = [float(row.split("|")[7]) for row in r.stdout.splitlines() if re.search(r"\|\s*acc\s*\|", row)]

    model = checkpoint.load_model(tiny_checkpoint).eval()
    docs = [json.loads(line) for line in (ROOT / "evals" / "modern_llm_mc.jsonl").read_text().splitlines()]
    correct = 0
    for d in docs:
        scores = [choice_loglikelihood(model, tiny_tokenizer, d["question"], " " + c) for c in d["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == d["answer"]
    assert acc == pytest.approx(correct / len(docs), abs=1e-4)  # the table rounds to 4 places
