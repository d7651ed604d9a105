"""The model matches transformers' Llama, the KV cache matches a full forward, checkpoints are HF directories."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import checkpoint
import cli
import cross_entropy
import modern_llm as ml

GQA = dict(vocab_size=300, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, ffn_hidden=160, max_seq_len=64)
MHA = dict(GQA, n_kv_head=4)


def random_ids(cfg, batch=3, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("shape", [GQA, MHA, dict(GQA, tie_embeddings=False, head_dim=24, rope_theta=500000.0)],
                         ids=["gqa", "mha", "untied-headdim-theta"])
def test_our_checkpoint_loads_in_transformers_with_same_logits(tmp_path, shape):
    torch.manual_seed(0)
    cfg = ml.ModelConfig(**shape)
    ours = ml.LLM(cfg).eval()
    checkpoint.save_checkpoint(ours, tmp_path / "ckpt")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    x = random_ids(cfg)
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("shape", [GQA, MHA], ids=["gqa", "mha"])
def test_transformers_checkpoint_loads_here_with_same_logits(tmp_path, shape):
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["d_model"],
                         intermediate_size=shape["ffn_hidden"], num_hidden_layers=shape["n_layer"],
                         num_attention_heads=shape["n_head"], num_key_value_heads=shape["n_kv_head"],
                         head_dim=shape["head_dim"], max_position_embeddings=64, tie_word_embeddings=True,
                         rms_norm_eps=1e-5)
    theirs = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # make the norms non-trivial so a mis-mapped norm weight would show
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    theirs.save_pretrained(tmp_path / "hf")
    ours = checkpoint.load_model(tmp_path / "hf").eval()
    x = random_ids(ours.cfg)
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-5
    # and back again: our save of their weights is read by transformers with the same logits
    checkpoint.save_checkpoint(ours, tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(x).logits - theirs(x).logits).abs().max().item() <= 1e-5


def test_qk_norm_checkpoint_is_a_qwen3_directory(tmp_path):
    torch.manual_seed(0)
    cfg = ml.ModelConfig(**GQA, qk_norm=True)
    ours = ml.LLM(cfg).eval()
    with torch.no_grad():
        ours.model.layers[0].self_attn.q_norm.weight.uniform_(0.5, 1.5)
    checkpoint.save_checkpoint(ours, tmp_path / "ckpt")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    x = random_ids(cfg)
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-5
    assert checkpoint.load_model(tmp_path / "ckpt").cfg.qk_norm


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf_cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                         rope_theta=500000.0, rope_scaling=scaling)
    theirs = LlamaForCausalLM(hf_cfg).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours = checkpoint.load_model(tmp_path / "hf").eval()
    assert ours.cfg.rope_scaling["rope_type"] == "llama3"
    x = random_ids(ours.cfg, length=60)
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() <= 1e-5


def test_kv_cache_prefill_then_decode_equals_full_forward():
    torch.manual_seed(0)
    cfg = ml.ModelConfig(**GQA)
    model = ml.LLM(cfg).eval()
    x = random_ids(cfg)
    with torch.no_grad():
        full = model(x)
        model.setup_cache(batch_size=x.shape[0], max_len=cfg.max_seq_len)
        steps = [model(x[:, :12], pos=torch.arange(12))]
        for t in range(12, x.shape[1]):
            steps.append(model(x[:, t:t + 1], pos=torch.tensor([t])))
        model.clear_cache()
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_left_padded_rows_with_positions_and_mask_equal_unpadded():
    """The batched-generation contract: per-row positions and a padding mask make a left-padded row compute
    exactly what it computes alone."""
    torch.manual_seed(0)
    cfg = ml.ModelConfig(**GQA)
    model = ml.LLM(cfg).eval()
    short, long_ = random_ids(cfg, 1, 5, seed=2), random_ids(cfg, 1, 9, seed=3)
    pad = long_.shape[1] - short.shape[1]
    batch = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long_])
    pos = torch.stack([(torch.arange(9) - pad).clamp(min=0), torch.arange(9)])
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, :pad] = False
    with torch.no_grad():
        model.setup_cache(2, 16)
        mask = (torch.arange(16)[None, :] <= torch.arange(9)[:, None])[None, None] & \
            torch.cat([keep, torch.ones(2, 7, dtype=torch.bool)], 1)[:, None, None, :]
        out = model(batch, pos=pos, slots=torch.arange(9), mask=mask)
        model.clear_cache()
        assert (out[0, pad:] - model(short)[0]).abs().max().item() <= 1e-5
        assert (out[1] - model(long_)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("shape", [GQA, dict(GQA, tie_embeddings=False)], ids=["tied", "untied"])
def test_chunked_loss_equals_the_plain_loss_and_gradients(monkeypatch, shape, autocast):
    """Training's loss (ChunkedLinearCrossEntropy, a chunk of logits at a time, gradients taken in the forward
    pass) gives the plain cross-entropy's loss and gradients: over several chunks, with ignored targets."""
    monkeypatch.setattr(cross_entropy, "LOSS_CHUNK_ELEMENTS", 16 * 300)  # 16-row chunks: 120 tokens make 8, the last short
    torch.manual_seed(0)
    cfg = ml.ModelConfig(**shape)
    model = ml.LLM(cfg)
    x, y = random_ids(cfg), random_ids(cfg, seed=2)
    y[0, :7] = -100
    results = []
    for loss_of in (lambda: model(x, y),
                    lambda: F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), ignore_index=-100)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, grads))
    (loss, grads), (plain, plain_grads) = results
    assert loss.item() == pytest.approx(plain.item(), rel=1e-3 if autocast else 1e-6)
    for g, ref in zip(grads, plain_grads):  # bf16: each chunk's weight gradient is rounded on its own
        torch.testing.assert_close(g, ref, rtol=0, atol=(1e-2 if autocast else 1e-5) * ref.abs().max().item())
    with torch.no_grad():  # evaluation takes the same path without computing gradients
        assert model(x, y).item() == pytest.approx(results[0][0].item(), rel=1e-3 if autocast else 1e-6)


def test_the_loss_never_holds_the_full_logits(monkeypatch):
    """256 tokens x 4,096 vocabulary: 4 MiB of fp32 logits, 8 MiB with their gradient on the plain path; the
    chunked loss's whole forward and backward peaks far below even the logits alone."""
    from speed_optimizations_2025 import allocations

    monkeypatch.setattr(cross_entropy, "LOSS_CHUNK_ELEMENTS", 2**16)
    h = torch.randn(256, 64, requires_grad=True)
    weight = torch.randn(4096, 64, requires_grad=True)
    targets = torch.randint(0, 4096, (256,))
    peak, _ = allocations(lambda: cross_entropy.linear_cross_entropy(h, weight, targets).backward())
    assert peak < 256 * 4096 * 4 * 0.85
    assert h.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(ml.PRESETS))
def test_preset_parameter_count_matches_built_model(name):
    cfg = ml.PRESETS[name]
    with torch.device("meta"):  # the 730m and bigger presets are counted without allocating them
        model = ml.LLM(cfg)
    assert ml.count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert name != "tiny" or ml.count_params(cfg) < 1_000_000


def test_730m_reference_shape_and_the_name():
    cfg = ml.PRESETS["730m"]
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.max_seq_len) == \
        (12, 1536, 24, 6, 64, 384)
    assert 710e6 < ml.count_params(ml.model_preset("730m", vocab_size=128256)) < 740e6


def test_flops_per_token_follows_palm():
    cfg = ml.ModelConfig(**GQA)
    n = ml.count_params(cfg)  # tied: the embedding matrix is also the output head's matmul
    assert ml.flops_per_token(cfg, 64) == 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 64


def test_memory_estimate_responds_to_the_knobs():
    cfg = ml.PRESETS["730m"]
    base = ml.estimate_training_memory(cfg, 5, 384)
    assert base["weights"] == 4 * ml.count_params(cfg) and base["optimizer"] == 2 * base["weights"]
    ckpt = ml.estimate_training_memory(cfg, 5, 384, activation_checkpointing=True)
    assert ckpt["activations"] < base["activations"] / 2  # the bf16 weight copies stay until forward ends
    # activations grow with the batch, by the same step each time (the bf16 weight copies do not grow)
    grow = [ml.estimate_training_memory(cfg, b, 384)["activations"] for b in (5, 10, 15)]
    assert grow[2] - grow[1] == grow[1] - grow[0] > 0
    assert ml.estimate_training_memory(cfg, 5, 384, optimizer="muon")["optimizer"] < base["optimizer"]
    sharded = ml.estimate_training_memory(cfg, 5, 384, world_size=4, shard=True)
    assert sharded["weights"] == base["weights"] // 4


# -- checkpoint files ----------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return checkpoint.save_checkpoint(ml.LLM(ml.ModelConfig(**GQA)), tmp_path / "ckpt")


def one_line_error(path):
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_model(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_config_is_named(saved):
    os.remove(saved / "config.json")
    assert "config.json is missing" in one_line_error(saved)


def test_missing_weights_are_named(saved):
    os.remove(saved / "model.safetensors")
    assert "no weights" in one_line_error(saved)


def test_truncated_weights_are_named(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in one_line_error(saved)


def test_foreign_architecture_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (saved / "config.json").write_text(json.dumps(cfg))
    assert "GPT2LMHeadModel" in one_line_error(saved)


def test_unsupported_field_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["attention_bias"] = True
    (saved / "config.json").write_text(json.dumps(cfg))
    assert "attention_bias" in one_line_error(saved)


def test_shape_mismatch_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (saved / "config.json").write_text(json.dumps(cfg))
    assert "mlp.down_proj.weight has shape (64, 160)" in one_line_error(saved)


def test_missing_directory_is_named(tmp_path):
    assert "does not exist" in one_line_error(tmp_path / "nope")


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    torch.manual_seed(0)
    theirs = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    x = random_ids(ml.ModelConfig(**GQA))
    with torch.no_grad():
        assert (checkpoint.load_model(tmp_path / "hf")(x) - theirs(x).logits).abs().max() <= 1e-5
    shards[0].unlink()
    assert shards[0].name in one_line_error(tmp_path / "hf")


def test_save_replaces_atomically_and_leaves_no_temp_dirs(tmp_path, saved):
    model = checkpoint.load_model(saved)
    with pytest.raises(RuntimeError):
        checkpoint.save_checkpoint(model, saved, extra=lambda d: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert checkpoint.load_model(saved) is not None  # the old checkpoint is intact
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]  # the temporary directory was removed


def test_resolve_checkpoint_picks_newest_step(tmp_path):
    torch.manual_seed(0)
    model = ml.LLM(ml.ModelConfig(**GQA))

    def state(step):
        return lambda d: (d / checkpoint.STATE_FILE).write_text(json.dumps({"global_step": step}))

    for step in (10, 20):
        checkpoint.save_checkpoint(model, tmp_path / f"checkpoint-{step}", extra=state(step))
    (tmp_path / ".checkpoint-30.tmp-x").mkdir()  # a half-written one is ignored
    assert checkpoint.resolve_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    checkpoint.save_checkpoint(model, tmp_path, extra=state(20))  # the final model at OUT_DIR itself
    assert checkpoint.resolve_checkpoint(tmp_path) == tmp_path
    checkpoint.save_checkpoint(model, tmp_path / "checkpoint-40", extra=state(40))  # resumed and trained further
    assert checkpoint.resolve_checkpoint(tmp_path) == tmp_path / "checkpoint-40"


# -- the command-line convention -----------------------------------------------------------------------------

DEFAULTS = {"MAX_STEPS": 100, "LR": 3e-4, "COMPILE": True, "OUT_DIR": "out", "PROMPT": [], "TOKENIZER": None}


def test_flags_override_with_types():
    cfg, given = cli.parse_flags(DEFAULTS, ["--max_steps=5", "--lr", "1e-3", "--compile=false", "--prompt=a",
                                           "--prompt=b", "--tokenizer=gpt2"])
    assert cfg == {"max_steps": 5, "lr": 1e-3, "compile": False, "out_dir": "out", "prompt": ["a", "b"],
                   "tokenizer": "gpt2"}
    assert given == {"max_steps", "lr", "compile", "prompt", "tokenizer"}


@pytest.mark.parametrize("argv,words", [
    (["--max_step=5"], "unknown flag --max_step"),
    (["--max_steps=five"], "expects an integer"),
    (["--lr=fast"], "expects a number"),
    (["--compile=maybe"], "expects true or false"),
    (["stray"], "unexpected argument"),
    (["--out_dir"], "needs a value"),
])
def test_bad_flags_are_one_line_user_errors(argv, words):
    with pytest.raises(cli.UserError) as e:
        cli.parse_flags(DEFAULTS, argv)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_help_lists_constants_with_their_comments(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text('MAX_STEPS = 7  # how long to train\nLR: float = 3e-4  # peak learning rate\n')
    constants = {"__file__": str(script)}
    exec(script.read_text(), constants)
    with pytest.raises(SystemExit) as e:
        cli.parse_flags(cli.settings_block(constants), ["--help"], str(script))
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--max_steps=7" in out and "how long to train" in out and "peak learning rate" in out
