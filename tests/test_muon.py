"""Muon: the Newton-Schulz iteration, the update formula, distributed runs, checkpoints, the parameter split."""

import io
import math
import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import modern_llm
import benchmarks.muon as muon_bench
import muon_optimizer as mo
from cli import UserError


def polar(m: torch.Tensor) -> torch.Tensor:
    """The exact polar factor U V^T, from an SVD in float64."""
    u, _, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return u @ vh


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a * b).sum() / (a.norm() * b.norm())).item()


def with_spectrum(rows: int, cols: int, singular_values: torch.Tensor) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values)))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values)))
    return u @ torch.diag(singular_values) @ v.T


# -----------------------------------------------------------------------------
# Newton-Schulz


@pytest.mark.parametrize("shape", [(64, 64), (48, 160), (160, 48)])
def test_newton_schulz_gives_the_polar_factors_singular_vectors(shape):
    torch.manual_seed(0)
    rows, cols = shape
    if rows == cols:
        # A square Gaussian matrix has singular values near 0, which 5 steps cannot lift into the band (each
        # step multiplies a small one by ~3.4); a gradient-like spread of 10x is what the band is promised for.
        g = with_spectrum(rows, cols, torch.linspace(0.1, 1.0, rows))
    else:
        g = torch.randn(shape)
    x = mo.newton_schulz(g, steps=5)
    assert x.shape == g.shape and x.dtype == torch.bfloat16
    s = torch.linalg.svdvals(x.double())
    assert 0.5 < s.min() and s.max() < 1.5, (s.min(), s.max())
    # Same singular vectors as U V^T: the polar factor of the output is the polar factor of the input ...
    assert cosine(polar(x), polar(g)) > 0.99
    # ... while the output itself differs from U V^T only by singular values spread around 1 (by design).
    assert cosine(x, polar(g)) > 0.97


def test_newton_schulz_needs_its_steps_to_reach_the_band():
    torch.manual_seed(1)
    g = torch.randn(48, 96)
    one, five = (torch.linalg.svdvals(mo.newton_schulz(g, steps=k).double()) for k in (1, 5))
    assert one.min() < 0.5 < five.min()  # one step from a Frobenius-normalised start leaves small ones small


def test_a_stack_is_orthogonalised_as_each_matrix_alone():
    torch.manual_seed(4)
    mats = [torch.randn(24, 40) for _ in range(3)]
    for coefficients in mo.NS_COEFFICIENTS:
        stacked = mo.newton_schulz(torch.stack(mats), coefficients=coefficients)
        for i, m in enumerate(mats):
            assert torch.equal(stacked[i], mo.newton_schulz(m, coefficients=coefficients))
        tall = mo.newton_schulz(torch.stack([m.T for m in mats]), coefficients=coefficients)
        assert torch.equal(tall, stacked.mT)  # a stack of tall matrices is done as its wide transposes


def test_muon_groups_tall_and_wide_matrices_of_one_shape_into_one_batch():
    shapes = [torch.Size(s) for s in [(8, 4), (4, 8), (4, 4), (8, 4), (4, 4)]]
    assert mo.same_shape_chunks(shapes, world=1) == [[0, 1, 3], [2, 4]]
    assert mo.same_shape_chunks(shapes, world=2) == [[0, 1], [3], [2, 4]]


def test_polar_express_lands_nearer_the_polar_factor_than_the_repeated_quintic():
    torch.manual_seed(5)
    g = with_spectrum(96, 256, torch.logspace(-2, 0, 96))  # singular values spread over 100x
    low, error = {}, {}
    for coefficients in ("keller_jordan", "polar_express"):
        s = torch.linalg.svdvals(mo.newton_schulz(g, steps=5, coefficients=coefficients).double())
        low[coefficients], error[coefficients] = s.min().item(), (s - 1).abs().mean().item()
    # In the same 5 steps (measured: min 0.68 vs 0.86, mean distance to 1 0.17 vs 0.08): Polar Express's
    # per-step quintics lift the small singular values further and end about twice as near U V^T.
    assert low["keller_jordan"] < 0.75 < 0.8 < low["polar_express"], low
    assert error["polar_express"] < 0.6 * error["keller_jordan"], error


def test_normuon_evens_out_the_rows_and_keeps_the_size():
    torch.manual_seed(6)
    update = torch.randn(16, 8) * torch.linspace(0.1, 2.0, 16)[:, None]  # rows of very different size
    second_moment = torch.zeros(16, 1)
    out = mo.normalise_rows(update, second_moment, beta2=0.0)  # beta2 0: this update's statistics alone
    row_rms = out.square().mean(dim=1).sqrt()
    assert torch.allclose(row_rms, row_rms.mean().expand(16), rtol=1e-4)
    assert out.norm().item() == pytest.approx(update.norm().item(), rel=1e-5)
    torch.testing.assert_close(second_moment, update.square().mean(dim=1, keepdim=True))
    wide = torch.zeros(1, 16)
    assert mo.normalise_rows(update.T, wide, beta2=0.0).shape == (8, 16) and wide.min() > 0  # per column


def test_cautious_weight_decay_only_decays_where_the_step_agrees():
    torch.manual_seed(7)
    w0 = torch.randn(6, 6)
    steps = {}
    for cautious in (False, True):
        w = w0.clone().requires_grad_()
        w.grad = torch.randn(6, 6, generator=torch.Generator().manual_seed(8))
        mo.Muon([w], lr=0.1, weight_decay=0.5, cautious_weight_decay=cautious, nesterov=False, momentum=0.0).step()
        steps[cautious] = w.detach()
    decay = w0 * 0.1 * 0.5
    # The two runs differ by exactly the decay of the entries where the update and the weight differ in sign.
    mask = (steps[False] + decay - w0) * w0 < 0  # -lr * update and w of opposite signs <=> update * w >= 0
    torch.testing.assert_close(steps[True] - steps[False], torch.where(mask, torch.zeros_like(w0), decay))


# -----------------------------------------------------------------------------
# The update formula


def newton_schulz_float64(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The default (Polar Express) iteration written out on a float64 matrix (no transposes: it is wide here)."""
    x = g.double() / (g.double().norm() * 1.01)
    for a, b, c in mo.NS_COEFFICIENTS["polar_express"][:steps]:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


@pytest.mark.parametrize("scaling", ["match_rms_adamw", "original"])
def test_two_muon_steps_equal_the_formula_in_float64(scaling):
    torch.manual_seed(2)
    rows, cols = 24, 16  # tall: exercises the transpose and the original shape factor sqrt(24/16)
    w0 = torch.randn(rows, cols)
    grads = [torch.randn(rows, cols), torch.randn(rows, cols)]
    lr, wd, mu = 0.05, 0.1, 0.9
    w = w0.clone().requires_grad_()
    opt = mo.Muon([w], lr=lr, momentum=mu, weight_decay=wd, ns_steps=5, scaling=scaling)

    buf = torch.zeros(rows, cols, dtype=torch.float64)
    scale = 0.2 * math.sqrt(max(rows, cols)) if scaling == "match_rms_adamw" else math.sqrt(rows / cols)
    for g in grads:
        before = w.detach().double().clone()
        w.grad = g.clone()
        opt.step()
        g = g.double()
        buf = mu * buf + (1 - mu) * g
        nesterov = (1 - mu) * g + mu * buf
        update = -lr * scale * newton_schulz_float64(nesterov.T, 5).T
        # Weight decay and the update's direction are exact; the iteration runs in bf16 (8-bit mantissa), and
        # Polar Express's first quintic has coefficients up to 22 that amplify its rounding, so agreement to
        # ~3.5% of the update is what it can give (Keller Jordan's quintic gives ~2%).
        error = (w.detach().double() - before * (1 - lr * wd) - update).norm() / update.norm()
        assert error < 0.05, error
        torch.testing.assert_close(opt.state[w]["momentum_buffer"].double(), buf, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch 2.9+")
@pytest.mark.parametrize("scaling", ["match_rms_adamw", "original"])
def test_single_device_muon_is_bit_identical_to_torch_optim_muon(scaling):
    torch.manual_seed(3)
    shapes = [(32, 48), (48, 32), (40, 40)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = mo.Muon(ours, lr=0.02, weight_decay=0.1, scaling=scaling, ns_coefficients="keller_jordan")
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn=scaling)  # Keller Jordan's quintic
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))


# -----------------------------------------------------------------------------
# Distributed: 2 gloo processes against one

SHAPES = [(24, 40), (24, 40), (24, 40), (40, 24), (33, 24)]  # 3 of a shape over 2 ranks; 33 rows shard unevenly
STEPS = 4


def run_muon(params: list[torch.Tensor], grad_for) -> list[torch.Tensor]:
    opt = mo.Muon(params, lr=0.02, weight_decay=0.1, scaling="original")
    for step in range(STEPS):
        for i, p in enumerate(params):
            p.grad = grad_for(step, i, p)
        opt.step()
    return [p.detach() for p in params]


def full_grad(step: int, i: int) -> torch.Tensor:
    return torch.randn(SHAPES[i], generator=torch.Generator().manual_seed(1000 * step + i))


def initial_weights() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def distributed_worker(rank: int, world: int, tmp: str) -> None:
    """One torchrun-like rank: Muon on plain tensors (DDP) and on Shard(0) DTensors (FSDP2)."""
    code = 0
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
        plain = run_muon([w.requires_grad_() for w in initial_weights()], lambda s, i, p: full_grad(s, i))
        mesh = init_device_mesh("cpu", (world,))
        sharded = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in initial_weights()]
        sharded = run_muon(sharded, lambda s, i, p: distribute_tensor(full_grad(s, i), mesh, p.placements))
        sharded = [p.full_tensor() for p in sharded]
        if rank == 0:
            torch.save({"plain": plain, "sharded": sharded}, os.path.join(tmp, "result.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo can abort at interpreter exit after the work is done; skip that exit


def test_two_gloo_processes_give_the_same_parameters_as_one(tmp_path):
    mp.spawn(distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "result.pt", weights_only=True)
    expected = run_muon([w.requires_grad_() for w in initial_weights()], lambda s, i, p: full_grad(s, i))
    for name in ("plain", "sharded"):
        for g, e in zip(got[name], expected):
            assert torch.equal(g, e), name


# -----------------------------------------------------------------------------
# The Muon + AdamW split and checkpoints


def tiny_model(seed: int = 0, **overrides) -> modern_llm.LLM:
    torch.manual_seed(seed)
    return modern_llm.LLM(modern_llm.model_preset("tiny", **overrides))


def train(model, opt, steps: int, first_step: int = 0) -> None:
    for step in range(first_step, first_step + steps):
        x = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step))
        for g in opt.param_groups:  # the training script's schedule, through base_lr
            g["lr"] = g["base_lr"] * (1 - step / 10)
        model(x, x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_resume_from_state_dict_is_bit_identical(name):
    model = tiny_model()
    opt = mo.build_optimizer(model, name, lr=3e-3, weight_decay=0.1)
    train(model, opt, 2)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    train(model, opt, 2, first_step=2)

    saved.seek(0)
    ckpt = torch.load(saved, weights_only=True)  # how the training script reads it: no pickled code
    resumed = tiny_model(seed=1)
    resumed.load_state_dict(ckpt["model"])
    opt2 = mo.build_optimizer(resumed, name, lr=1.0, weight_decay=0.5)  # the saved settings must win
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, 2, first_step=2)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_split_sends_block_matrices_to_muon_and_the_rest_to_adamw():
    model = tiny_model(tie_embeddings=False, qk_norm=True)
    opt = mo.build_optimizer(model, "muon", lr=2e-3, weight_decay=0.1, adamw_lr=5e-4)
    names = {p: n for n, p in model.named_parameters()}
    muon = [names[p] for g in opt.muon.param_groups for p in g["params"]]
    assert len(muon) == 7 * model.cfg.n_layer  # q, k, v, o, gate, up, down: whole matrices, never per head
    assert all(".layers." in n and n.endswith("proj.weight") for n in muon)
    assert sum(p.numel() for g in opt.muon.param_groups for p in g["params"]) == \
        modern_llm.count_block_matrices(model.cfg)
    decayed, undecayed = opt.adamw.param_groups
    assert {names[p] for p in decayed["params"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in undecayed["params"])  # norms, the qk norms included
    assert len(muon) + sum(len(g["params"]) for g in opt.adamw.param_groups) == len(list(model.parameters()))
    assert [g["base_lr"] for g in opt.param_groups] == [2e-3, 5e-4, 5e-4]
    assert opt.muon.param_groups[0]["scaling"] == "match_rms_adamw"


def test_adamw_decays_matrices_only_and_tied_head_once():
    model = tiny_model()
    opt = mo.build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    decayed, undecayed = opt.param_groups
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in undecayed["params"])
    assert len(decayed["params"]) == 7 * model.cfg.n_layer + 1  # the tied embedding/head counted once
    assert decayed["foreach"] and not decayed["fused"]  # fused kernels only on CUDA


def test_param_groups_are_live_for_the_schedule():
    model = tiny_model()
    opt = mo.build_optimizer(model, "muon", lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for g in opt.param_groups:
        g["lr"] = 0.0
    x = torch.randint(0, model.cfg.vocab_size, (2, 8))
    model(x, x).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("make", [
    lambda w: mo.Muon([w], lr=-1e-3),
    lambda w: mo.Muon([w], momentum=1.0),
    lambda w: mo.Muon([w], ns_steps=0),
    lambda w: mo.Muon([w], scaling="spectral"),
    lambda w: mo.Muon([w], weight_decay=-0.1),
    lambda w: mo.Muon([{"params": [w], "lr": float("nan")}]),
    lambda w: mo.Muon([torch.zeros(8, requires_grad=True)]),
    lambda w: mo.build_optimizer(tiny_model(), "sgd"),
    lambda w: mo.build_optimizer(tiny_model(), "muon", adamw_lr=-1.0),
    lambda w: mo.build_optimizer(torch.nn.Linear(4, 4), "muon"),
    lambda w: mo.build_optimizer(tiny_model(), "muon").load_state_dict(
        mo.build_optimizer(tiny_model(), "adamw").state_dict()),
], ids=["negative-lr", "momentum-1", "ns-steps-0", "scaling", "negative-wd", "nan-group-lr", "1-d-param",
        "unknown-optimizer", "negative-adamw-lr", "no-block-matrices", "adamw-state-into-muon"])
def test_bad_settings_raise_one_clear_error(make):
    with pytest.raises(UserError) as err:
        make(torch.zeros(4, 4, requires_grad=True))
    assert "\n" not in str(err.value) and err.value.section == "Muon settings rejected"


# -----------------------------------------------------------------------------
# The benchmark's arithmetic and flags (its training runs are minutes long: run by hand, see README: Muon)


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [(0, 9.0), (10, 7.0), (20, 6.0), (30, 5.5)]
    assert muon_bench.steps_to_reach(curve, 6.5) == pytest.approx(15.0)
    assert muon_bench.steps_to_reach(curve, 6.0) == pytest.approx(20.0)
    assert muon_bench.steps_to_reach(curve, 9.5) == 0
    assert muon_bench.steps_to_reach(curve, 5.0) is None


def test_report_compares_the_best_runs_and_draws_them(tmp_path):
    def run(name, lr, losses, ms):
        curve = list(zip(range(0, 10 * len(losses), 10), losses))
        return {"optimizer": name, "lr": lr, "curve": curve, "final": losses[-1], "ms_per_step": ms,
                "optimizer_ms": ms / 4, "cpu_ms_per_step": 2 * ms}
    runs = [run("adamw", 1e-3, [9, 7, 6.0], 100), run("adamw", 3e-3, [9, 6.5, 5.5], 100),
            run("muon", 1e-3, [9, 6.0, 5.0], 150), run("muon", 3e-3, [9, 8, 7.0], 150)]
    text = muon_bench.report(runs, tmp_path)
    assert "target = AdamW's final val loss 5.5000" in text
    assert "0.75x the steps" in text  # muon reaches 5.5 at step 15 of 20
    assert "1.50x AdamW's wall-clock" in text
    assert "needs 1.12x the wall-clock" in text  # 0.75 x 1.5: fewer steps, each dearer
    best_muon = [line.split() for line in text.splitlines() if line.startswith("muon")][-1]
    assert best_muon[3:] == ["15", "2.2", "4.5"]  # steps, then 15 x 150 ms wall-clock and 15 x 300 ms CPU
    assert (tmp_path / "muon_vs_adamw.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--muon_lrs=fast"], "--muon_lrs expects numbers"),
    (["--adamw_lrs=-1"], "each > 0"),
    (["--steps=0"], "--steps must be at least 1"),
])
def test_benchmark_refuses_bad_flags_before_any_work(argv, message):
    with pytest.raises(UserError, match=message):
        muon_bench.main(argv)
