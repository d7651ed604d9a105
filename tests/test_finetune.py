"""Starting from a pretrained model (--init_from) and chat fine-tuning (SFT): a Llama saved by transformers loads
with the same logits and trains into a directory transformers loads back; the loss mask covers exactly the
assistant's tokens; a short SFT run teaches answers; bad inputs are one-line errors. Tiny models, fp32, one
thread."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import checkpoint
import gpu_training_optimized as train
import modern_llm
import prepare_data
from conftest import ROOT, SAMPLE_TEXT, make_checkpoint
from cli import UserError

SCRIPT = str(ROOT / "gpu_training_optimized.py")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
QA = [("What colour is the sky?", "Blue, on a clear day."), ("Who wrote Hamlet?", "William Shakespeare."),
      ("What is two plus two?", "Four."), ("Name a prime number.", "Seven is prime."),
      ("Which planet is red?", "Mars is the red planet."), ("What do bees make?", "Bees make honey."),
      ("How many legs has a spider?", "Eight legs.")]
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi, who are you?"},
                {"role": "assistant", "content": "A tiny model."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "It is 4."}]


def write_jsonl(path, conversations) -> str:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return str(path)


def run_flags(tmp_path, init, dataset, *extra) -> list[str]:
    return [f"--init_from={init}", f"--dataset={dataset}", f"--data_root={tmp_path / 'data'}",
            f"--out_dir={tmp_path / 'out'}", "--batch_size=4", "--seq_len=32", "--dtype=float32", "--compile=false",
            "--max_minutes=0", "--eval_steps=1", "--eval_interval=1000", "--log_interval=1000", *extra]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory, tiny_tokenizer):
    """A random LlamaForCausalLM saved by transformers in two shards: untied head, GQA (4 query heads, 2 KV),
    head_dim 24 != 64 / 4, rope_theta 500000, rms_norm_eps 1e-6, non-trivial norm weights; our tokenizer beside."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=500000.0,
                      rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # a mis-mapped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path, max_shard_size="200KB")
    tiny_tokenizer.save_pretrained(path)
    assert (path / checkpoint.INDEX_FILE).is_file() and len(list(path.glob("*.safetensors"))) >= 2
    return path, model


def test_init_from_matches_transformers_then_trains_into_a_directory_transformers_loads(hf_llama, tmp_path):
    path, theirs = hf_llama
    ids = torch.randint(0, theirs.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    cfg = {k.lower(): v for k, v in train._FLAG_DEFAULTS.items()} | {"init_from": str(path)}
    init = train.resolve_init_from(str(path))
    model_cfg = checkpoint.read_config(init)
    assert (model_cfg.tie_embeddings, model_cfg.n_kv_head, model_cfg.head_dim, model_cfg.rope_theta,
            model_cfg.norm_eps) == (False, 2, 24, 500000.0, 1e-6)
    ours = train.build_model(model_cfg, torch.device("cpu"), cfg, checkpoint.load_state_dict(init)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(SAMPLE_TEXT))
    assert train.main(run_flags(tmp_path, path, text, "--max_steps=3", "--seq_len=16", "--freeze_embeddings=true")) == 0
    out = tmp_path / "out"
    state = json.loads((out / "checkpoint-3" / checkpoint.STATE_FILE).read_text())["config"]
    assert (state["lr"], state["min_lr"], state["warmup_steps"]) == (5e-5, 5e-6, 20)  # fine-tune defaults
    assert checkpoint.saved_state(out)["task"] == "pretrain" and not checkpoint.trained_on_chats(out)  # plain text
    saved, before = load_file(out / checkpoint.WEIGHTS_FILE), theirs.state_dict()
    assert torch.equal(saved["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(saved["lm_head.weight"], before["lm_head.weight"])  # the untied head trained
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.tie_word_embeddings is False and reloaded.config.head_dim == 24
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.load_model(out).eval()(ids), reloaded(ids).logits, atol=1e-5, rtol=0)


def test_the_data_cache_key_includes_the_tokenizer_and_its_chat_template(tmp_path, tiny_tokenizer):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(SAMPLE_TEXT))
    other = prepare_data.train_tokenizer(SAMPLE_TEXT, 300)
    dirs = {prepare_data.prepare(str(text), tmp_path, tokenizer=t) for t in (tiny_tokenizer, other)}
    assert len(dirs) == 2
    chats = write_jsonl(tmp_path / "chats.jsonl", [CONVERSATION] * 2)
    plain = plain_template(tiny_tokenizer)
    dirs = {prepare_data.prepare_chat(chats, tmp_path, tokenizer=t, val_fraction=0.5) for t in (tiny_tokenizer, plain)}
    assert len(dirs) == 2


def plain_template(tokenizer, template=None):
    """A copy of the tokenizer whose chat template has no {% generation %} markers, like most pretrained ones."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template or prepare_data.CHAT_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    return tok


def test_assistant_tokens_are_exactly_those_the_template_marks(tiny_tokenizer):
    ids, mask = prepare_data.chat_tokens(tiny_tokenizer, CONVERSATION)
    marked = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
    assert ids == list(marked["input_ids"]) and mask == list(marked["assistant_masks"])
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "A tiny model.<|im_end|>It is 4.<|im_end|>"
    # without markers the spans are found by rendering prefixes: the same tokens
    assert prepare_data.chat_tokens(plain_template(tiny_tokenizer), CONVERSATION) == (ids, mask)
    # another marker-less template (Zephyr-style turns ending in the EOS token)
    zephyr = plain_template(tiny_tokenizer, "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
                                            "eos_token + '\n' }}{% endfor %}"
                                            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    ids, mask = prepare_data.chat_tokens(zephyr, CONVERSATION)
    assert zephyr.decode([i for i, m in zip(ids, mask) if m]) == "A tiny model.<|eos|>It is 4.<|eos|>"


def test_user_turns_are_masked_out_of_the_loss_and_its_gradient(tmp_path, tiny_tokenizer):
    """Two conversations that differ only in their user turns: the same targets (the assistant's tokens), and
    the loss gradient is zero at every position that predicts a user token, whatever that text is."""
    other = [dict(m, content="Say more, friend?") if m["role"] == "user" else m
             for m in CONVERSATION]
    torch.manual_seed(0)
    model = modern_llm.LLM(modern_llm.model_preset("tiny", vocab_size=len(tiny_tokenizer)))
    targets = []
    for i, conv in enumerate((CONVERSATION, other)):
        folder = prepare_data.prepare_chat(write_jsonl(tmp_path / f"{i}.jsonl", [conv] * 2), tmp_path / "data",
                                           tokenizer=tiny_tokenizer, val_fraction=0.5)
        x, y = prepare_data.ChatBatchLoader(folder, "train", 1, 120).get_batch(0)
        logits = model(x).detach().requires_grad_()
        F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100).backward()
        trained = logits.grad[0].abs().sum(-1) > 0
        assert torch.equal(trained, y[0] != -100)
        _, mask = prepare_data.chat_tokens(tiny_tokenizer, conv)
        assert int(trained.sum()) == sum(mask)  # every assistant token a target, nothing else
        targets.append(y[y != -100].tolist())
    assert targets[0] == targets[1]
    assert tiny_tokenizer.decode(targets[0]) == "A tiny model.<|im_end|>It is 4.<|im_end|>"


def greedy_answers(model, tokenizer, conversations) -> list[str]:
    """Each conversation's reply as the model writes it greedily after the prompt (the template's generation
    prompt), as long as the expected reply plus its end-of-turn token."""
    answers = []
    for conv in conversations:
        prompt = tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        n = len(tokenizer(conv[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
        out = model.generate(torch.tensor([prompt]), n, temperature=0)
        answers.append(tokenizer.decode(out[0, len(prompt):].tolist()))
    return answers


def test_short_sft_run_teaches_the_answers_it_trained_on(tmp_path, tiny_tokenizer):
    init = make_checkpoint(tmp_path / "init", tiny_tokenizer, seed=3)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
    chats = write_jsonl(tmp_path / "chats.jsonl", convs)
    assert train.main(run_flags(tmp_path, init, chats, "--max_steps=80", "--batch_size=8", "--seq_len=96",
                                "--lr=1e-2", "--warmup_steps=5", "--task=sft")) == 0
    meta = prepare_data.load_meta(next((tmp_path / "data").iterdir()))
    held_out = {int(w.rsplit(" ", 1)[1]) for w in meta["val_conversations"]}
    trained = [c for n, c in enumerate(convs, 1) if n not in held_out]
    assert len(trained) == len(convs) - 1
    expected = [c[-1]["content"] + "<|im_end|>" for c in trained]
    before = greedy_answers(checkpoint.load_model(init).eval(), tiny_tokenizer, trained)
    after = greedy_answers(checkpoint.load_model(tmp_path / "out").eval(), tiny_tokenizer, trained)
    assert not set(before) & set(expected)
    assert after == expected
    assert checkpoint.trained_on_chats(tmp_path / "out")  # the final model records it; the chat page reads it


@pytest.mark.parametrize("problem", ["architecture", "shard", "role", "content", "task", "hub", "model"])
def test_bad_inputs_are_one_line_errors_before_out_dir_is_made(problem, hf_llama, tmp_path):
    init, _ = hf_llama
    dataset = write_jsonl(tmp_path / "chats.jsonl", [CONVERSATION] * 3)
    extra, expected = [], {"architecture": "model_type='gpt2'", "shard": "is missing",
                           "role": "line 2: message 2 has role 'robot'", "content": "line 3: message 1 (system) has no "
                           "text", "task": "--task=sft needs", "hub": "cannot be reached",
                           "model": "--model and --init_from"}[problem]
    if problem in ("architecture", "shard"):
        init = shutil.copytree(init, tmp_path / "llama")
        if problem == "architecture":
            config = json.loads((init / "config.json").read_text())
            config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
            (init / "config.json").write_text(json.dumps(config))
        else:
            sorted(init.glob("model-*.safetensors"))[-1].unlink()
    elif problem in ("role", "content"):
        broken = [dict(m) for m in CONVERSATION]
        if problem == "role":
            broken[1]["role"] = "robot"
        else:
            del broken[0]["content"]
        line = 2 if problem == "role" else 3
        dataset = write_jsonl(tmp_path / "chats.jsonl", [broken if n == line else CONVERSATION for n in (1, 2, 3)])
    elif problem == "task":
        (tmp_path / "text.txt").write_text("\n\n".join(SAMPLE_TEXT))
        dataset, extra = tmp_path / "text.txt", ["--task=sft"]
    elif problem == "hub":
        init = "nobody-here/no-such-model"
    else:
        extra = ["--model=tiny"]
    with pytest.raises(UserError) as e:
        train.main(run_flags(tmp_path, init, dataset, "--max_steps=2", *extra))
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_the_script_prints_one_line_and_exits_2(hf_llama, tmp_path):
    init = shutil.copytree(hf_llama[0], tmp_path / "llama")
    sorted(init.glob("model-*.safetensors"))[0].unlink()
    r = subprocess.run([sys.executable, SCRIPT, f"--init_from={init}", "--dataset=nothing.txt", "--max_steps=1",
                        f"--out_dir={tmp_path / 'out'}", f"--data_root={tmp_path / 'data'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and "is missing" in r.stderr and r.stderr.count("\n") == 1
