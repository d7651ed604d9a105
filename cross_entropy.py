"""
The training loss without the full [tokens x vocabulary] logits: at 32k-128k vocabularies the fp32 logits, their
softmax and their gradient are the largest tensors of a step, so the output head and the cross-entropy run
together, a chunk of rows at a time. Liger kernels' fused Triton version runs on CUDA where `liger-kernel` is
installed; ChunkedLinearCrossEntropy everywhere else. modern_llm.LLM calls it when given targets, and
modern_llm.estimate_training_memory plans its memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# Rows of logits per chunk: chunk rows x vocabulary stays near this many elements (2^22 fp32 = 16 MiB, small
# beside a step's activations), so each chunk's matmuls still have hundreds of rows to run at full speed.
LOSS_CHUNK_ELEMENTS = 2**22


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk (read at call time, so a test can make chunks small)."""
    return max(16, LOSS_CHUNK_ELEMENTS // vocab_size)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight.T) against targets, a chunk of rows at a time. Each chunk's gradients
    (softmax - one-hot, times x and weight) are taken in the forward pass while its logits are at hand, so
    backward only scales them: the matmul FLOPs of the plain loss, no recomputation, and one chunk of logits
    in memory instead of all of them (plus a weight-sized fp32 gradient). Under autocast the matmuls run in
    its dtype, the softmax in fp32, as the plain path does."""

    @staticmethod
    def forward(ctx, x, weight, targets, with_grads):
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else weight.dtype
        xm, wm = x.to(dtype), weight.to(dtype)  # cast once, not once per chunk
        valid = targets != -100
        count = valid.sum().clamp(min=1)
        grad_x = torch.empty_like(x) if with_grads else None
        grad_w = torch.zeros_like(weight) if with_grads else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        rows = loss_chunk_rows(weight.size(0))
        for start in range(0, x.size(0), rows):
            end = start + rows
            logits = F.linear(xm[start:end], wm).float()
            target = targets[start:end].clamp(min=0)[:, None]
            picked = logits.gather(1, target)
            # log-sum-exp by hand, in place: the chunk's logits become its softmax with no second chunk-sized
            # temporary (torch.logsumexp allocates one)
            top = logits.amax(dim=-1, keepdim=True)
            g = logits.sub_(top).exp_()
            norm = g.sum(dim=-1, keepdim=True)
            total += torch.where(valid[start:end], (top + norm.log() - picked).squeeze(1), 0.0).sum()
            if with_grads:  # d loss / d logits = (softmax - one-hot) / count on the valid rows
                g.div_(norm).scatter_add_(1, target, torch.full_like(picked, -1.0))
                g = g.mul_((valid[start:end] / count)[:, None]).to(dtype)
                del logits  # the fp32 buffer g was made in: gone before the gradient matmuls
                grad_x[start:end] = g @ wm
                grad_w += g.t() @ xm[start:end]
        ctx.save_for_backward(grad_x, grad_w)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, grad_w * grad_out, None, None


def loss_memory(tokens: int, d_model: int, vocab_size: int, autocast: bool) -> int:
    """Peak bytes of ChunkedLinearCrossEntropy's forward: the fp32 gradients of x and of the weight it keeps for
    backward, and while it runs the bf16 copies of both and, at most, a chunk's bf16 logits and their fp32 copy,
    or its bf16 gradient with the weight gradient's bf16 share and that share's fp32 copy for the sum."""
    chunk = min(tokens, loss_chunk_rows(vocab_size)) * vocab_size
    if autocast:
        transient = 2 * (tokens + vocab_size) * d_model + max(6 * chunk, 2 * chunk + 6 * vocab_size * d_model)
    else:
        transient = 4 * chunk + 4 * vocab_size * d_model
    return 4 * (tokens + vocab_size) * d_model + transient


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of the output head (x @ weight.T) against targets (-100 ignored), never holding
    the full logits: Liger kernels' fused Triton version on CUDA where `liger-kernel` is installed, else
    ChunkedLinearCrossEntropy."""
    if x.is_cuda and liger_loss is not None:
        if torch.is_autocast_enabled("cuda"):  # Liger's kernel takes one dtype for both inputs
            dtype = torch.get_autocast_dtype("cuda")
            x, weight = x.to(dtype), weight.to(dtype)
        return liger_loss(weight, x, targets)
    with_grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return ChunkedLinearCrossEntropy.apply(x, weight, targets, with_grads)


try:
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
except ImportError:  # optional: pip install liger-kernel (CUDA)
    liger_loss = None
