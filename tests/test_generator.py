"""text_generator.py, engine.py and sampling.py: the engine against transformers and against itself, the
samplers against their definitions, streaming text, int8, the command line and the interactive prompt."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import checkpoint
import cli
import text_generator as tg
from conftest import ROOT, make_checkpoint
from engine import Engine, TextStream
import sampling
from sampling import SamplingParams
from speculative import DraftStats, speculative_stream

GREEDY = SamplingParams(max_new_tokens=16, temperature=0)
TEXTS = ["The quick brown fox", "def add(a, b):\n    return", "To", "Héllo wörld, ünïcödé and emoji 🎉 and 日本語"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models' ops are too small to split across threads: on a busy 2-core machine the thread hand-offs
    made these tests ~20x slower. Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same for the scripts run as subprocesses


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory, tiny_tokenizer):
    """A tiny random model with weights x10: its logits are far apart, so greedy choices are not near-ties
    that float rounding could flip, and it writes varied tokens instead of repeating one."""
    path = make_checkpoint(tmp_path_factory.mktemp("sharp") / "ckpt", tiny_tokenizer, seed=0)
    model = checkpoint.load_model(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(10)
    ids = {"bos_id": tiny_tokenizer.bos_token_id, "eos_id": tiny_tokenizer.eos_token_id,
           "pad_id": tiny_tokenizer.pad_token_id}
    return checkpoint.save_checkpoint(model, path, extra=tiny_tokenizer.save_pretrained, token_ids=ids)


@pytest.fixture(scope="module")
def engine(sharp_checkpoint):
    return Engine(sharp_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def prompts(engine):
    return [engine.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]


def full_recompute_greedy(model, prompt, n, end_tokens):
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] in end_tokens:
                break
    return seq[len(prompt):]


# -----------------------------------------------------------------------------
# The engine's tokens


def test_greedy_equals_transformers_generate(engine, sharp_checkpoint, prompts):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(sharp_checkpoint)).eval()
    ours = engine.generate(prompts, [GREEDY] * len(prompts))
    assert len({tuple(c.token_ids) for c in ours}) == len(prompts)  # the prompts really lead different ways
    for prompt, c in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                          eos_token_id=sorted(engine.end_tokens), pad_token_id=engine.pad_id)
        assert c.token_ids == out[0, len(prompt):].tolist()
        assert len(set(c.token_ids)) > 3  # not one token repeated


def test_kv_cache_equals_full_recompute(engine, prompts):
    for prompt, c in zip(prompts, engine.generate(prompts, [GREEDY] * len(prompts))):
        assert c.token_ids == full_recompute_greedy(engine.model, prompt, GREEDY.max_new_tokens, engine.end_tokens)


def test_batch_of_different_lengths_equals_each_alone(engine, prompts):
    batch = [prompts[2], prompts[0], prompts[3], prompts[1]]  # lengths 1, 4, 20+, 11: lots of left padding
    assert len({len(p) for p in batch}) == 4
    together = engine.generate(batch, [GREEDY] * 4)
    alone = [engine.generate([p], [GREEDY])[0] for p in batch]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    # sampling with a seed per row: a row's sample does not depend on its neighbours either
    sampled = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=i) for i in range(4)]
    together = engine.generate(batch, sampled)
    alone = [engine.generate([p], [s])[0] for p, s in zip(batch, sampled)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]


def test_same_seed_same_text_and_per_row_stopping(engine, prompts):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95, seed=7)
    first = engine.generate(prompts[:1], [params])[0]
    assert engine.generate(prompts[:1], [params])[0] == first
    others = {tuple(engine.generate(prompts[:1], [SamplingParams(max_new_tokens=20, seed=s)])[0].token_ids)
              for s in (1, 2, 3)}
    assert len(others) > 1
    # rows stop on their own: different max_new_tokens in one batch
    short, long = (SamplingParams(max_new_tokens=n, temperature=0) for n in (3, 9))
    a, b = engine.generate(prompts[:2], [short, long])
    assert (a.completion_tokens, a.finish_reason, b.completion_tokens, b.finish_reason) == (3, "length", 9, "length")
    assert a.prompt_tokens == len(prompts[0])


def test_stream_events_stop_strings_and_end_tokens(engine, prompts):
    full = engine.generate(prompts[:1], [GREEDY])[0]
    stop = full.text[len(full.text) // 2:][:2]  # two characters from the middle of the answer
    params = SamplingParams(max_new_tokens=16, temperature=0, stop=[stop])
    steps = list(engine.stream(prompts[:1], [params]))
    pieces = [s[0].text_delta for s in steps]
    assert steps[-1][0].finish_reason == "stop"
    assert "".join(pieces) == full.text[:full.text.index(stop)]
    assert all(stop not in p for p in pieces)
    # a token counted as end of text (EOS / <|im_end|>) ends the row and is not in its text
    end = full.token_ids[5]
    engine.end_tokens.add(end)
    try:
        c = engine.generate(prompts[:1], [GREEDY])[0]
    finally:
        engine.end_tokens.discard(end)
    assert c.token_ids == full.token_ids[:full.token_ids.index(end) + 1] and c.finish_reason == "stop"
    assert c.text == engine.tokenizer.decode(c.token_ids[:-1])


def test_cancel_ends_one_row_and_context_limits(engine, prompts):
    steps = list(engine.stream(prompts[:2], [GREEDY] * 2, cancelled=lambda row: row == 1))
    assert steps[0][1].finish_reason == "cancelled" and steps[0][1].token_id is None
    assert all(s[1] is None for s in steps[1:]) and len(steps) == GREEDY.max_new_tokens
    ctx = engine.max_seq_len
    near_full = (prompts[3] * ctx)[:ctx - 2]
    c = engine.generate([near_full], [GREEDY])[0]
    assert (c.completion_tokens, c.finish_reason) == (2, "length")  # the context ends the answer


@pytest.mark.parametrize("prompt, message", [([], "empty"), ([5] * 128, "context"), ([5, 10**6], "token ids")])
def test_bad_prompts(engine, prompt, message):
    with pytest.raises(cli.UserError, match=message):
        next(engine.stream([prompt], [GREEDY]))


@pytest.mark.parametrize("field, value", [("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                          ("min_p", 2.0), ("repetition_penalty", 0.0), ("max_new_tokens", 0),
                                          ("presence_penalty", 3.0), ("stop", [""])])
def test_bad_sampling_params(field, value):
    with pytest.raises(cli.UserError, match=field):
        SamplingParams(**{field: value}).validate()


# -----------------------------------------------------------------------------
# Samplers against their definitions and against transformers' processors

# Logits with many exact ties (bf16 has 8 bits of mantissa, so a 32k vocabulary repeats values often): nothing
# is added to break them, because which tied tokens stay is exactly where implementations differ.
TIED = st.lists(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 0.5, 1.0, 2.0]) | st.floats(-10, 10), min_size=8,
                max_size=40).map(lambda v: torch.tensor([v]).bfloat16().float())


def kept(logits: torch.Tensor, k: int, p: float) -> torch.Tensor:
    logits = sampling.top_k_filter(logits, torch.tensor([[k]]))
    logits = sampling.top_p_filter(logits, torch.tensor([[p]], dtype=torch.float64))
    return torch.isfinite(logits)[0]


@settings(max_examples=80, deadline=None)
@given(TIED, st.integers(1, 10), st.floats(0.05, 1.0))
def test_top_k_and_top_p_keep_what_their_definitions_say(logits, k, p):
    V = logits.size(1)
    kth_best = logits[0].sort(descending=True).values[min(k, V) - 1]
    assert torch.equal(kept(logits, k, 1.0), logits[0] >= kth_best)  # every token tied with the k-th stays
    probs = logits.softmax(-1)[0]
    keep = kept(logits, V, p)
    mass = probs[keep].sum()
    assert mass >= p - 1e-6 or keep.sum() == V  # the kept set reaches p ...
    assert mass - probs[keep].min() < p + 1e-6  # ... and is the smallest such set: without its weakest it does not
    assert probs[keep].min() >= torch.cat([probs[~keep], torch.zeros(1)]).max()  # made of the most likely tokens


def transformers_processed(logits: torch.Tensor, seen_ids: torch.Tensor, temperature: float, k: int, p: float,
                           min_p: float, rep: float) -> torch.Tensor:
    """One row through transformers' own processors, in the order generate() applies them."""
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    out = RepetitionPenaltyLogitsProcessor(rep)(seen_ids, logits.clone()) if rep != 1 else logits.clone()
    out = TemperatureLogitsWarper(temperature)(seen_ids, out)
    for on, processor in ((k, lambda: TopKLogitsWarper(k)), (p < 1, lambda: TopPLogitsWarper(p)),
                          (min_p, lambda: MinPLogitsWarper(min_p))):
        if on:
            out = processor()(seen_ids, out)
    return out


def test_processors_equal_transformers_on_bf16_logits_of_a_32k_vocabulary():
    """200 rows of a 32k vocabulary rounded to bf16 (ties everywhere near the top-k and top-p boundaries), each
    row with its own settings in one batch, as the engine samples them: the processed logits equal
    transformers' to the bit, -inf (removed) included."""
    V, B = 32000, 8
    gen = torch.Generator().manual_seed(0)
    settings_grid = [(t, k, p, m, r) for t in (0.7, 1.0, 1.3) for k in (0, 1, 5, 40, 1000)
                     for p in (1.0, 0.5, 0.9, 0.95) for m in (0.0, 0.05) for r in (1.0, 1.3)]
    differing = 0
    for draw in range(200 // B):
        logits = (torch.randn(B, V, generator=gen) * 3).bfloat16().float()
        rows = [settings_grid[int(i)] for i in torch.randint(len(settings_grid), (B,), generator=gen)]
        seen_ids = torch.randint(0, V, (B, 20), generator=gen)
        params = [sampling.SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=r)
                  for t, k, p, m, r in rows]
        sampler = sampling.Sampler(B, V, torch.device("cpu"), torch.Generator())
        for row, seen in zip(params, seen_ids.tolist()):
            sampler.add(row, seen)
        sampler.columns()
        ours = sampling.apply_penalties(logits, sampler.seen, None, sampler.repetition, None, None)
        ours = ours / sampler.temperature
        ours = sampling.top_p_filter(sampling.top_k_filter(ours, sampler.top_k), sampler.top_p)
        ours = sampling.min_p_filter(ours, sampler.min_p)
        for i, setting in enumerate(rows):
            theirs = transformers_processed(logits[i:i + 1], seen_ids[i:i + 1], *setting)
            assert torch.equal(ours[i:i + 1], theirs), (draw, i, setting)
            k = setting[1]
            differing += bool(k) and int(torch.isfinite(theirs).sum()) != k and setting[2:] == (1.0, 0.0, 1.0)
    assert differing  # ties at the k-th value did occur: keeping exactly k tokens would have failed


def test_sampling_stays_inside_top_k_and_min_p(engine, prompts):
    """End to end: every sampled token was among the k best (resp. above min_p x best) of the full model's
    logits at that point."""
    for params, allowed in ((SamplingParams(max_new_tokens=12, temperature=2.0, top_k=3, seed=1),
                             lambda lg: lg.topk(3).indices.tolist()),
                            (SamplingParams(max_new_tokens=12, temperature=1.0, min_p=0.2, seed=2),
                             lambda lg: (lg.softmax(-1) >= 0.2 * lg.softmax(-1).max()).nonzero().flatten().tolist())):
        seq = list(prompts[0])
        for token in engine.generate([prompts[0]], [params])[0].token_ids:
            with torch.no_grad():
                logits = engine.model(torch.tensor([seq]))[0, -1]
            assert token in allowed(logits)
            seq.append(token)


# -----------------------------------------------------------------------------
# Text pieces


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 399), min_size=1, max_size=30))
def test_text_stream_pieces_join_to_the_decoded_text(tiny_tokenizer, ids):
    ids = [i for i in ids if i not in tiny_tokenizer.all_special_ids] or [100]
    stream = TextStream(tiny_tokenizer, [])
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids)


def test_text_stream_never_splits_a_character(tiny_tokenizer):
    text = "日本語 🎉 ünïcödé"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # characters really span several tokens
    stream = TextStream(tiny_tokenizer, tiny_tokenizer.encode("Say: ", add_special_tokens=False))
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# -----------------------------------------------------------------------------
# Weight-only int8


def test_int8_close_to_fp32_and_its_checkpoint_round_trips(engine, tiny_checkpoint, sharp_checkpoint, prompts,
                                                            tmp_path):
    # logits: a model at its initial weight scale (as trained models are); tolerance 1% of the largest logit,
    # ~4x what per-channel rounding gives here (each weight moves by at most half a step, 0.4% of its row's max)
    seq = torch.tensor([prompts[3] * 3])
    with torch.no_grad():
        model = checkpoint.load_model(tiny_checkpoint)
        ref = model(seq)
        assert (checkpoint.quantize_int8(model)(seq) - ref).abs().max() <= 0.01 * ref.abs().max()
    # greedy choices: the sharp model (x10 weights amplifies any error) along its own fp32 greedy text
    model = checkpoint.load_model(sharp_checkpoint)
    seq = torch.tensor([prompts[0] + engine.generate(prompts[:1], [SamplingParams(64, temperature=0)])[0].token_ids])
    with torch.no_grad():
        ref = model(seq)
        int8 = checkpoint.quantize_int8(model)
        out = int8(seq)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85  # measured ~0.93
    path = checkpoint.save_int8_checkpoint(int8, tmp_path / "int8", extra=engine.tokenizer.save_pretrained)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "int8_weight_only"
    loaded = checkpoint.load_model(path)
    assert checkpoint.is_int8(loaded) and loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(loaded(seq), out)
    fp32 = engine.generate(prompts, [GREEDY] * len(prompts))
    q = Engine(path, device="cpu").generate(prompts, [GREEDY] * len(prompts))
    agree = [sum(a == b for a, b in zip(x.token_ids, y.token_ids)) / len(x.token_ids) for x, y in zip(fp32, q)]
    assert sum(agree) / len(agree) >= 0.5  # free-running: one different token changes everything after it
    assert all(c.token_ids == full_recompute_greedy(loaded, p, 16, engine.end_tokens) for p, c in zip(prompts, q))


def test_unknown_quantization_is_refused(sharp_checkpoint, tmp_path):
    import shutil

    shutil.copytree(sharp_checkpoint, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="gptq"):
        checkpoint.load_model(tmp_path / "c")
    with pytest.raises(cli.UserError, match="int4"):
        Engine(sharp_checkpoint, device="cpu", quantize="int4")


# -----------------------------------------------------------------------------
# Command line and interactive prompt


def test_one_shot_prompts(sharp_checkpoint, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("To\n\nThe quick\n")
    tg.main([f"--checkpoint={sharp_checkpoint}", "--prompt=Héllo", f"--prompts_file={f}", "--max_new_tokens=5",
             "--temperature=0"])
    out = capsys.readouterr().out
    assert "--- 1: Héllo" in out and "--- 3: The quick" in out and "--- 4" not in out
    tg.main([f"--checkpoint={sharp_checkpoint}", "--prompt=To", "--max_new_tokens=5", "--temperature=0"])
    alone = capsys.readouterr().out
    assert alone.strip() and alone.strip() in out  # batched and alone: the same continuation


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint=/nonexistent/run"], "does not exist"),
    (["--top_p=1.5"], "top_p"),
    (["--temperature=-1"], "temperature"),
    (["--prompt= "], "empty"),
    (["--quantize=int3"], "int3"),
    (["--draft=x", "--temperature=0.7"], "temperature=0"),
])
def test_cli_errors(sharp_checkpoint, flags, message):
    argv = ([] if any(f.startswith("--checkpoint") for f in flags) else [f"--checkpoint={sharp_checkpoint}"]) + flags
    if "--prompt= " not in flags:
        argv.append("--prompt=To")
    with pytest.raises(cli.UserError, match=message):
        tg.main(argv)


def test_missing_default_checkpoint_exits_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "text_generator.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=ONE_THREAD_ENV)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no checkpoint found" in r.stderr and "--checkpoint=DIR" in r.stderr


def test_interactive_session_through_a_terminal(sharp_checkpoint):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, [str(ROOT / "text_generator.py"), f"--checkpoint={sharp_checkpoint}",
                                           "--max_new_tokens=6"], encoding="utf-8", timeout=60, env=ONE_THREAD_ENV)
    try:
        child.expect_exact(">>> ")
        for line, reply in [("/temp 0", "temperature = 0.0"), ("/bogus", "unknown command /bogus"),
                            ("", "empty prompt"), ("/top_p 2", "top_p must be in (0, 1]"),
                            ("The quick brown", "[6 tokens,"), ("x " * 200, "context is 128")]:
            child.sendline(line)
            child.expect_exact(reply)
            child.expect_exact(">>> ")  # the session goes on after each of them
        child.sendline("/chat")
        child.expect_exact("chat> ")
        child.sendline("Hi!")
        child.expect_exact("tokens/s]")
        child.expect_exact("chat> ")
        child.sendline("/settings")
        child.expect_exact("temperature = 0.0")
        child.expect_exact("chat> ")
        child.sendintr()  # Ctrl-C at the prompt does not end the program
        child.expect_exact("/quit or Ctrl-D")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_compiled_decode_step_same_tokens_no_recompile_per_token(sharp_checkpoint, engine, prompts):
    compiled = Engine(sharp_checkpoint, device="cpu", compile=True)
    batch, params = [prompts[0], prompts[1]], [SamplingParams(max_new_tokens=12, temperature=0)] * 2
    assert compiled.generate(batch, params) == engine.generate(batch, params)
    # other prompts, same batch size and cache bucket: the compiled step is reused, token after token
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled.generate([prompts[2], prompts[0]], params)
    assert again == engine.generate([prompts[2], prompts[0]], params)


# -----------------------------------------------------------------------------
# Speculative decoding


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory, tiny_tokenizer):
    """Another random tiny model with the same tokenizer: a draft that guesses wrong most of the time."""
    return make_checkpoint(tmp_path_factory.mktemp("draft") / "ckpt", tiny_tokenizer, seed=1)


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_speculative_equals_plain_greedy(engine, sharp_checkpoint, other_draft, prompts, draft_tokens):
    """With a poor draft (most guesses rejected) and with the target as its own draft (every guess kept),
    the tokens and the reason to stop are plain greedy's, up to the end of the context."""
    same = Engine(sharp_checkpoint, device="cpu")
    for draft in (Engine(other_draft, device="cpu"), same):
        for prompt, n in ((prompts[0], 40), (prompts[1], 1), (prompts[3], engine.max_seq_len)):
            params = SamplingParams(max_new_tokens=n, temperature=0)
            plain = engine.generate([prompt], [params])[0]
            stats = DraftStats()
            events = list(speculative_stream(engine, draft, prompt, params, draft_tokens, stats))
            assert [e.token_id for e in events] == plain.token_ids
            assert "".join(e.text_delta for e in events) == plain.text
            assert events[-1].finish_reason == plain.finish_reason
            if draft is same and len(plain.token_ids) > draft_tokens + 1:
                assert stats.acceptance == 1 and stats.target_passes < len(plain.token_ids)


def test_speculative_command_line(sharp_checkpoint, other_draft, capsys):
    argv = [f"--checkpoint={sharp_checkpoint}", "--prompt=The quick brown fox", "--max_new_tokens=12",
            "--temperature=0"]
    tg.main(argv)
    plain = capsys.readouterr().out
    tg.main(argv + [f"--draft={other_draft}", "--draft_tokens=3"])
    out, err = capsys.readouterr()
    assert out == plain and "guesses kept" in err
