"""The training loss of a causal LM computed chunk by chunk, never keeping the full float32 logits, and
without reading anything back to the host, so a CUDA graph can hold it (`studio.train.graphs`).

The model's own loss builds the logits of every position over the whole vocabulary (152k columns on
Qwen2.5), casts them to float32, takes their log-softmax, and walks the same tensors back in the
backward: a dozen passes over gigabytes per step, the same on every model size, so on the 0.5B shape
it is a sixth of a CUDA-graphed step. Liger's fused linear cross-entropy avoids that but counts the
labels on the host (`.item()`), which a graph cannot replay.

Here, per chunk of positions: the logits in the compute dtype (one matrix product), one kernel that
takes each row's log-sum-exp and writes the gradient of the row's loss over its own logits
(softmax minus one-hot) in place, and the product of that gradient with the output head, which is
the gradient of the hidden states. The backward only scales it by the incoming gradient over the
number of labels, a tensor. On a CUDA GPU the per-row kernel is Triton's (bundled with PyTorch); on
the CPU, or without Triton, the same arithmetic runs as PyTorch operations.

Used for training passes in CUDA graphs, on models whose forward ends in a plain frozen linear head
without a bias and the shifted cross-entropy (`PLAIN_MODEL_TYPES`; `loss_problem` says why not
otherwise, and the model's own loss then stays).
"""

from __future__ import annotations

import functools
import types
from contextlib import contextmanager
from typing import Iterator

import torch  # imported by the training run only (studio.train.trainer imports this module lazily)

CHUNK_BYTES = 512 * 2**20  # logits of one chunk in the compute dtype, at most (a multiple of 256 rows)
IGNORE_INDEX = -100
# Model types whose causal-LM forward is the plain one this replaces: decoder, output head, shifted
# cross-entropy (others scale their logits, cap them or add a router loss after the head)
PLAIN_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
# Calls that ask for more than the loss keep the model's own forward
OWN_FORWARD_ARGUMENTS = ("inputs_embeds", "shift_labels", "output_hidden_states", "output_attentions")


def loss_problem(model) -> str | None:
    """Why the chunked loss cannot replace `model`'s own (None when it can)."""
    from studio.model.card import base_of

    base = base_of(model)
    head = getattr(base, "lm_head", None)
    if getattr(getattr(base, "config", None), "model_type", None) not in PLAIN_MODEL_TYPES:
        return "the studio computes it for Qwen2, Qwen3, Llama and Mistral models only"
    if not hasattr(base, "model") or type(head) is not torch.nn.Linear:
        return "the model's output head is not a plain linear layer"
    if head.bias is not None or head.weight.requires_grad:
        return "the output head has a bias or is trained"
    if getattr(base.config, "final_logit_softcapping", None):
        return "the model caps its logits"
    return None


@contextmanager
def fused_training_loss(model, notes: list) -> Iterator[bool]:
    """The model computes its training loss (a forward with labels and gradients) with `linear_cross_entropy`
    for the block; every other call runs its own forward. Yields whether it is on; `notes` says which."""
    from studio.model.card import base_of
    from studio.train.speedups import forget_instance_attributes

    problem = loss_problem(model)
    if problem:
        notes.append(f"Chunked loss skipped: {problem}.")
        yield False
        return
    base = base_of(model)
    instance_forward = base.__dict__.get("forward")  # a forward another patch put on this instance
    base.forward = types.MethodType(_forward_with_fused_loss(base.forward), base)
    notes.append("Chunked loss on: the logits are computed a chunk at a time and never kept whole.")
    try:
        yield True
    finally:
        forget_instance_attributes(base, ("forward",))
        if instance_forward is not None:
            base.forward = instance_forward


def _forward_with_fused_loss(own_forward):
    def forward(self, *args, labels=None, **kwargs):
        if (args or labels is None or not torch.is_grad_enabled() or kwargs.get("return_dict") is False
                or any(kwargs.get(name) not in (None, False) for name in OWN_FORWARD_ARGUMENTS)):
            return own_forward(*args, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs.pop("use_cache", None)
        outputs = self.model(use_cache=False, **kwargs)
        loss = linear_cross_entropy(outputs.last_hidden_state, self.lm_head.weight, labels,
                                    kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=None)

    return forward


def shifted_labels(labels, ignore_index: int = IGNORE_INDEX):
    """Each position's label is the next token (as transformers' `ForCausalLMLoss` shifts them)."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)


def linear_cross_entropy(hidden, weight, labels, num_items=None, chunk_rows: int | None = None):
    """The causal LM loss of `hidden` (batch, positions, width) under the output head `weight`
    (vocabulary, width): summed over the labels (`labels` shifted by one, -100 ignored) and divided by
    `num_items` (a tensor or number) or, without it, by the count of labels. Differentiable in `hidden`."""
    targets = shifted_labels(labels).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items is None:
        num_items = (targets != IGNORE_INDEX).sum()
    if not torch.is_tensor(num_items):
        num_items = torch.tensor(float(num_items), device=hidden.device)
    rows = chunk_rows or default_chunk_rows(weight)
    return LinearCrossEntropy.apply(flat, weight, targets, num_items.to(hidden.device), rows)


def default_chunk_rows(weight) -> int:
    """Rows a chunk holds: its logits at most `CHUNK_BYTES` in the compute dtype, a multiple of 256."""
    return chunk_rows_for(weight.shape[0])


def chunk_rows_for(vocab: int) -> int:
    """`default_chunk_rows` for an output head over `vocab` entries (bf16 or fp16 logits)."""
    return max(256, CHUNK_BYTES // (vocab * 2) // 256 * 256)


def _compute_dtype(weight, device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of `logsumexp(h W^T) - (h W^T)[label]`, divided by `num_items`; the gradient of the
    hidden rows is computed in the forward, chunk by chunk (see the module)."""

    @staticmethod
    def forward(ctx, flat, weight, targets, num_items, chunk_rows: int):
        dtype = _compute_dtype(weight, flat.device.type)
        with torch.autocast(flat.device.type, enabled=False):
            head = weight.detach().to(dtype)
            x = flat.detach().to(dtype)
            losses = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
            grad_hidden = torch.empty_like(x)
            for start in range(0, x.shape[0], chunk_rows):
                end = min(start + chunk_rows, x.shape[0])
                logits = x[start:end] @ head.t()
                row_losses_and_grads(logits, targets[start:end], losses[start:end])
                torch.mm(logits, head, out=grad_hidden[start:end])
                del logits  # freed before the next chunk's, so one chunk is held at a time
            total = losses.sum() / num_items
        ctx.save_for_backward(grad_hidden, num_items)
        ctx.flat_dtype = flat.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, num_items = ctx.saved_tensors
        scale = grad_total.float() / num_items.float()
        return grad_hidden.mul(scale).to(ctx.flat_dtype), None, None, None, None


def row_losses_and_grads(logits, targets, losses) -> None:
    """For each row: `losses[i]` = its loss (0 where the target is -100), and `logits` overwritten in
    place by the gradient of that loss over them (softmax minus one-hot; zeros where ignored)."""
    if logits.is_cuda and _triton_kernel() is not None:
        _rows_triton(logits, targets, losses)
    else:
        _rows_torch(logits, targets, losses)


def _rows_torch(logits, targets, losses) -> None:
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, 0)
    wide = logits.float()
    lse = torch.logsumexp(wide, dim=-1)
    picked = wide.gather(1, safe.unsqueeze(1)).squeeze(1)
    losses.copy_(torch.where(valid, lse - picked, 0.0))
    grad = torch.exp(wide - lse.unsqueeze(1))
    grad.scatter_add_(1, safe.unsqueeze(1), -valid.to(grad.dtype).unsqueeze(1))
    logits.copy_(grad * valid.unsqueeze(1))


def _rows_triton(logits, targets, losses) -> None:
    kernel = _triton_kernel()
    rows, columns = logits.shape
    if rows == 0:
        return
    kernel[(rows,)](logits, logits.stride(0), targets, losses, columns, IGNORE_INDEX, BLOCK=32768, num_warps=32)


@functools.cache
def _triton_kernel():
    """The per-row Triton kernel (compiled at its first launch), or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rows_kernel(logits_ptr, stride, targets_ptr, losses_ptr, n_cols, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * stride
        target = tl.load(targets_ptr + row)
        offsets = tl.arange(0, BLOCK)
        if target == ignore_index:
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                tl.store(logits_ptr + cols, tl.zeros([BLOCK], dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=cols < n_cols)
            tl.store(losses_ptr + row, 0.0)
            return
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            x = tl.load(logits_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, 0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        in_range = (target >= 0) & (target < n_cols)
        picked = tl.load(logits_ptr + tl.where(in_range, target, 0)).to(tl.float32)
        tl.store(losses_ptr + row, tl.where(in_range, lse - picked, float("nan")))
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            x = tl.load(logits_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            tl.store(logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < n_cols)

    return rows_kernel
