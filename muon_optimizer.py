"""
Muon for the hidden weight matrices of a transformer, AdamW for everything else.

Muon (Keller Jordan, 2024) keeps a Nesterov momentum of each matrix's gradient and, instead of stepping along it,
steps along its orthogonalised version: the same singular vectors with every singular value pushed to ~1, so
rare directions of the update move as far as common ones. Five steps of a quintic Newton-Schulz iteration
compute that in bf16 (by default with the Polar Express coefficients, one quintic per step), batched over the
matrices of one shape. NorMuon (per-neuron normalisation of that update) and cautious weight decay are
options. Public results (the modded-nanoGPT speedrun, Moonshot's "Muon is Scalable for
LLM Training") report about 1.35x-2x better token efficiency than AdamW at small scale.

Muon is for 2-D hidden matrices only. Embeddings (the tied output head too), norms and any vectors go to AdamW:
an embedding row is only touched by its own token, so orthogonalising across rows mixes unrelated tokens.

Update scaling (`scaling=`):
- "match_rms_adamw" (default): lr * 0.2 * sqrt(max(rows, cols)) makes the update's RMS ~0.2, the RMS of a
  typical AdamW update (Moonshot). Muon then reuses AdamW's learning rate and weight decay, so one --lr and
  one --weight_decay serve both halves of the optimizer, and switching --optimizer needs no retuning.
- "original": lr * sqrt(max(1, rows/cols)), Keller Jordan's factor; its learning rates are ~0.02 and the
  AdamW half needs its own (adamw_lr=).
The names are torch.optim.Muon's `adjust_lr_fn` values (PyTorch 2.9+), whose single-device update this one
equals; this file adds the Muon+AdamW split, distributed orthogonalisation and FSDP2 (DTensor) parameters.

Distributed: under torchrun every rank keeps the momentum of every matrix it holds (cheap, and with DDP any
rank's state_dict is a whole checkpoint), orthogonalises only its share of the matrices, then all_gather hands
every rank all updates: the parameters end identical to a one-process run. With FSDP2 (DTensor shards) each
momentum is gathered whole, world_size matrices at a time, and each rank keeps its shard of the update.
Every rank must step the same parameters (a matrix without a gradient on one rank only would hang the rest).

`python muon_optimizer.py` runs its benchmark (benchmarks/muon.py): the `small` model trained with Muon+AdamW
and with AdamW, each over a short learning-rate sweep, their validation losses printed and drawn (README: Muon).
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from cli import UserError

# -----------------------------------------------------------------------------
# Newton-Schulz orthogonalisation

# Per-iteration (a, b, c) of the odd quintic a*s + b*s^3 + c*s^5 applied to every singular value s.
NS_COEFFICIENTS = {
    # one quintic, repeated, chosen to maximise the slope at zero (Keller Jordan's Muon, torch.optim.Muon)
    "keller_jordan": [(3.4445, -4.7750, 2.0315)],
    # Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932; 5 iterations, safety factor 2e-2,
    # cushion 2): each iteration's quintic is the minimax-optimal one for the interval the singular values are
    # in by then, so 5 steps end much nearer 1 than the repeated quintic does. modded-nanogpt and nanochat use it.
    "polar_express": [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)],
}
# The Frobenius norm is divided by this much more, so rounding cannot push a singular value past 1, where the
# Polar Express quintics diverge (the coefficients' safety factor assumes it).
NS_NORM_MARGIN = {"keller_jordan": 1.0, "polar_express": 1.01}
SCALINGS = ("match_rms_adamw", "original")


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients: str = "polar_express",
                  eps: float = 1e-7) -> torch.Tensor:
    """An approximation of the polar factor U V^T of g = U S V^T (or of each matrix of a stack), in bf16.

    Each step maps every singular value s to a*s + b*s^3 + c*s^5, leaving the singular vectors alone; dividing
    by the Frobenius norm first puts every singular value in [0, 1], where the iteration converges. A stack
    (..., rows, cols) is one batched matrix product per step instead of one per matrix. A tall matrix is
    transposed so the Gram matrix X X^T is the smaller one. bf16 is the fastest precision measured: ~2.2x
    fp32's CPU time on the 2-core reference CPU (AVX512-BF16), and the precision GPU Muon runs in.
    """
    table = NS_COEFFICIENTS[coefficients]
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * NS_NORM_MARGIN[coefficients]).clamp(min=eps)
    multiply_add = torch.baddbmm if x.ndim == 3 else torch.addmm  # beta * m + alpha * (m1 @ m2), one kernel
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]  # past the table, its last (most converged) quintic repeats
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def normalise_rows(update: torch.Tensor, second_moment: torch.Tensor, beta2: float,
                   eps: float = 1e-10) -> torch.Tensor:
    """NorMuon (Li et al. 2025, arXiv:2510.05491): an orthogonalised update whose neurons still differ in
    size is divided by a running RMS of each neuron's (each row of the longer side's) update, then rescaled to
    its own Frobenius norm, so the update's size stays Muon's and only its spread across neurons evens out.
    second_moment (rows x 1 for a tall or square matrix, 1 x cols for a wide one) is updated in place."""
    dim = -1 if update.size(-2) >= update.size(-1) else -2
    u = update.float()
    mean_square = u.square().mean(dim=dim, keepdim=True)
    second_moment.lerp_(mean_square, 1 - beta2)
    u = u * second_moment.clamp(min=eps).rsqrt()
    return (u * (update.float().norm() / u.norm().clamp(min=eps))).to(update.dtype)


def update_scale(shape: torch.Size | tuple[int, ...], scaling: str) -> float:
    """The factor the learning rate is multiplied by for a matrix of this shape (module docstring)."""
    rows, cols = shape[0], shape[1]
    if scaling == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def check_settings(lr: float, weight_decay: float, momentum: float | None = None, ns_steps: int | None = None,
                   scaling: str | None = None, ns_coefficients: str | None = None, beta2: float | None = None) -> None:
    """One clear error per impossible setting, before any work is done."""
    if not lr >= 0:  # also refuses NaN
        raise UserError(f"learning rate must be >= 0, got {lr}", "Muon settings rejected")
    if not weight_decay >= 0:
        raise UserError(f"weight decay must be >= 0, got {weight_decay}", "Muon settings rejected")
    if momentum is not None and not 0 <= momentum < 1:
        raise UserError(f"Muon momentum must be in [0, 1), got {momentum}", "Muon settings rejected")
    if ns_steps is not None and (not isinstance(ns_steps, int) or ns_steps < 1):
        raise UserError(f"Muon ns_steps must be an integer >= 1, got {ns_steps}", "Muon settings rejected")
    if scaling is not None and scaling not in SCALINGS:
        raise UserError(f"Muon scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}",
                        "Muon settings rejected")
    if ns_coefficients is not None and ns_coefficients not in NS_COEFFICIENTS:
        raise UserError(f"Muon ns_coefficients must be one of {', '.join(NS_COEFFICIENTS)}, got {ns_coefficients!r}",
                        "Muon settings rejected")
    if beta2 is not None and not 0 <= beta2 < 1:
        raise UserError(f"NorMuon beta2 must be in [0, 1), got {beta2}", "Muon settings rejected")


# -----------------------------------------------------------------------------
# Muon


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # without importing torch.distributed.tensor on every step


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole matrix: an FSDP2 shard (DTensor) is gathered from every rank, a plain tensor is itself."""
    return t.full_tensor() if _is_dtensor(t) else t


def _like_param(update: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The full update laid out as the parameter is: for a DTensor, this rank's shard of it (no communication,
    every rank holds the full update)."""
    if not _is_dtensor(p):
        return update
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(update, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False)
    return replicated.redistribute(p.device_mesh, p.placements)


def same_shape_chunks(shapes: list[torch.Size], world: int) -> list[list[int]]:
    """Indices of the matrices, grouped by shape up to a transpose (a tall matrix is orthogonalised as its wide
    transpose, so gate/up 1024x384 and down 384x1024 share one batch), then cut into chunks: one chunk per
    shape in one process (one batched product per shape), world at a time under torchrun (rank r does the r-th
    matrix of each chunk; all_gather needs one shape on every rank). Every rank computes the same list."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, shape in enumerate(shapes):
        by_shape[tuple(sorted(shape))].append(i)
    size = world if world > 1 else max(map(len, by_shape.values()), default=1)
    return [indices[start:start + size] for indices in by_shape.values() for start in range(0, len(indices), size)]


def orthogonalise_chunk(mats: list[torch.Tensor], ns_steps: int, coefficients: str) -> list[torch.Tensor]:
    """newton_schulz of same-shape (up to a transpose) matrices: in one process as one stack; under torchrun
    each rank does its own and all_gather shares them, so the expensive part is split world_size ways and every
    rank ends with every result. Both ways stack, so both run the same kernels and give the same bits."""
    rank, world = _rank_and_world()
    tall = [m.size(0) > m.size(1) for m in mats]
    wide = [m.mT if t else m for m, t in zip(mats, tall)]
    if world == 1:
        done = list(newton_schulz(torch.stack(wide), ns_steps, coefficients).unbind(0))
    else:
        if rank < len(wide):
            mine = newton_schulz(torch.stack(wide[rank:rank + 1]), ns_steps, coefficients)[0].contiguous()
        else:  # fewer matrices than ranks left: send a placeholder nobody reads
            mine = wide[0].new_zeros(wide[0].shape, dtype=torch.bfloat16)
        done = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(done, mine)
    return [d.mT if t else d for d, t in zip(done, tall)]


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D matrices (see the module docstring).

    Per matrix W with gradient G:  B <- momentum*B + (1-momentum)*G;  U <- (1-momentum)*G + momentum*B
    (Nesterov; U <- B without it);  O <- newton_schulz(U), with normuon O <- normalise_rows(O);
    W <- W*(1 - lr*weight_decay) - lr*update_scale(W)*O. With cautious_weight_decay the decay applies only
    where O and W have the same sign, where the step already moves W towards 0 (Chen et al. 2025, as in
    modded-nanogpt and nanochat). Works alone, under torchrun (DDP: plain tensors) and with FSDP2 (DTensor
    shards, gathered for the orthogonalisation, only the local shard updated).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.1,
                 nesterov: bool = True, ns_steps: int = 5, scaling: str = "match_rms_adamw",
                 ns_coefficients: str = "polar_express", normuon: bool = False, beta2: float = 0.95,
                 cautious_weight_decay: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps,
                        scaling=scaling, ns_coefficients=ns_coefficients, normuon=normuon, beta2=beta2,
                        cautious_weight_decay=cautious_weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults, so the group is checked complete
        group = self.param_groups[-1]
        try:
            check_settings(group["lr"], group["weight_decay"], group["momentum"], group["ns_steps"],
                           group["scaling"], group["ns_coefficients"], group["beta2"])
            for p in group["params"]:
                if p.ndim != 2:
                    raise UserError(f"Muon optimises 2-D matrices only, got a parameter of shape "
                                    f"{tuple(p.shape)}: give embeddings, norms and vectors to AdamW "
                                    "(build_optimizer does)", "Muon settings rejected")
        except UserError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _, world = _rank_and_world()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            # A chunk at a time, so an FSDP2 run holds only world_size gathered matrices at once.
            for chunk in same_shape_chunks([p.shape for p in params], world):
                directions = [_full(self._momentum_direction(params[i], group)) for i in chunk]
                for i, update in zip(chunk, orthogonalise_chunk(directions, group["ns_steps"],
                                                                group["ns_coefficients"])):
                    self._apply(params[i], update, group)
        return loss

    def _apply(self, p: torch.Tensor, update: torch.Tensor, group: dict) -> None:
        """Weight decay (cautious or not), then the orthogonalised step (NorMuon-normalised if asked)."""
        if group["normuon"]:  # on the full update, so every row's statistics are whole under FSDP2 too
            state = self.state[p]
            if "second_moment" not in state:
                rows, cols = update.shape
                state["second_moment"] = update.new_zeros((rows, 1) if rows >= cols else (1, cols),
                                                          dtype=torch.float32)
            update = normalise_rows(update, state["second_moment"], group["beta2"])
        update = _like_param(update, p)
        decay = group["lr"] * group["weight_decay"]
        if group["cautious_weight_decay"]:
            p.sub_(p * ((update * p) >= 0) * decay)
        else:
            p.mul_(1 - decay)
        p.add_(update, alpha=-group["lr"] * update_scale(p.shape, group["scaling"]))

    def _momentum_direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Update p's momentum buffer with its gradient; the direction to orthogonalise (Nesterov or plain)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf


# -----------------------------------------------------------------------------
# The Muon + AdamW split the training script uses


class MuonWithAdamW:
    """Muon for the hidden matrices and AdamW for the rest, stepped, zeroed and checkpointed as one optimizer.

    param_groups lists Muon's groups then AdamW's (the same dicts, so setting g["lr"] reaches the optimizer);
    state_dict() is {"muon": ..., "adamw": ...}, tensors and numbers only (loads with weights_only=True).
    """

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"muon", "adamw"}:
            raise UserError("the saved optimizer state is not a Muon+AdamW state (was that run trained with "
                            "--optimizer=adamw?)", "Muon settings rejected")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])

    def __repr__(self) -> str:
        return f"MuonWithAdamW(\n{self.muon!r},\n{self.adamw!r})"


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight inside a transformer block (q/k/v/o, gate/up/down): what Muon optimises.

    Decided by name (`layers.`) so it holds under any wrapper prefix (DDP's module., compile's _orig_mod.).
    q, k and v are separate whole matrices here, never split per head.
    """
    return p.ndim == 2 and ".layers." in f".{name}"


def adamw(params: list[torch.Tensor], lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
          fused: bool | None) -> torch.optim.AdamW:
    """torch's AdamW with weight decay on matrices only (decaying a norm's gain towards 0 only hurts), fused
    kernels on CUDA (one launch for all tensors), foreach elsewhere."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "base_lr": lr},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "base_lr": lr}]
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None,
                             foreach=None if fused else True)


def build_optimizer(model: torch.nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95,
                    ns_steps: int = 5, scaling: str = "match_rms_adamw", adamw_lr: float | None = None,
                    fused: bool | None = None, ns_coefficients: str = "polar_express", normuon: bool = False,
                    cautious_weight_decay: bool = False):
    """The training script's optimizer: "adamw" -> torch.optim.AdamW; "muon" -> MuonWithAdamW.

    Weight decay applies to 2-D matrices only (norm gains and vectors are left alone). Every param group
    carries "base_lr" so a schedule can set g["lr"] = g["base_lr"] * factor. With "muon", adamw_lr is the
    AdamW half's learning rate (default: lr, right for match_rms_adamw scaling; give it with "original");
    ns_coefficients, normuon and cautious_weight_decay are Muon's options (see Muon).
    """
    if name not in ("adamw", "muon"):
        raise UserError(f"unknown optimizer {name!r}; choose adamw or muon", "Muon settings rejected")
    check_settings(lr, weight_decay)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if name == "adamw":
        return adamw([p for _, p in named], lr, weight_decay, betas, eps, fused)
    adamw_lr = lr if adamw_lr is None else adamw_lr
    check_settings(adamw_lr, weight_decay)
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    if not hidden:
        raise UserError("--optimizer=muon found no 2-D matrices inside transformer blocks (model.layers.N) to "
                        "optimise", "Muon settings rejected")
    muon = Muon([{"params": hidden, "base_lr": lr}], lr=lr, momentum=momentum, weight_decay=weight_decay,
                ns_steps=ns_steps, scaling=scaling, ns_coefficients=ns_coefficients, normuon=normuon,
                cautious_weight_decay=cautious_weight_decay)
    rest = [p for n, p in named if not is_hidden_matrix(n, p)]
    return MuonWithAdamW(muon, adamw(rest, adamw_lr, weight_decay, betas, eps, fused))


def main(argv: list[str]) -> int:
    """`python muon_optimizer.py`: the optimizer's evidence, measured by benchmarks/muon.py (README: Muon)."""
    from benchmarks.muon import main as benchmark

    return benchmark(argv)


if __name__ == "__main__":
    from cli import run_main

    run_main(main)
