"""The trained adapter's LoRA update in one autograd node: fewer, larger GPU kernels per training pass.

peft computes a LoRA layer's update as `lora_B(lora_A(dropout(x.to(float32)))) * scaling` and adds it
to the base output. Under bf16 autocast that is nine kernels forward for each projection (the input
cast to float32 and back, dropout in float32, both weights cast, two matrix products, the scaling and
the sum) and about twelve backward. On a small model those launches, not the arithmetic, are the
step: the 0.5B shape's packed pass runs about 5,000 kernels of a few microseconds each.

`lora_update` computes the same update in the compute dtype (the base output's): dropout once (one
kernel that also keeps its mask, or, in graphed runs, one that draws a mask the backward draws again,
`studio.model.lora_dropout`), the weights cast once, the down-projection, and the up-projection
with the scaling and the sum in one matrix product's epilogue (`addmm`); the backward is the matching
products. It rounds once where peft rounds three times (product, scaling, sum), so its values differ
from peft's in the last bits, and its dropout draws another mask than peft's float32 dropout: the
studio uses it for training passes only (`studio.model.routing.only_adapter`), never for the chats and
comparisons whose replies must equal a plain peft model's.
"""

from __future__ import annotations

import torch  # imported by the training forward only (studio.model.routing imports this module lazily)


class LoraUpdate(torch.autograd.Function):
    """`result + scaling * dropout(x) @ weight_a.T @ weight_b.T` in `result`'s dtype (see the module).
    With `casts` (a `FlatCasts` of this pass), the weights' compute-dtype copies are read from it and
    their gradients written into it, not returned."""

    @staticmethod
    def forward(ctx, x, result, weight_a, weight_b, scaling: float, dropout: float, casts=None, base=None,
                redrawn=None):
        """With `base` (a dense base weight and its bias or None) and `result` None, the base layer's
        product is computed here too, and the backward adds its input gradient in the same product. With
        `redrawn` (a `studio.model.lora_dropout.LayerDropout`), dropout draws a mask the backward draws
        again: the undropped input is kept, no mask."""
        dtype = result.dtype if base is None else base[0].dtype
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            if base is not None:
                weight, bias = base
                result = (torch.addmm(bias.to(dtype), flat, weight.t()) if bias is not None
                          else torch.mm(flat, weight.t()))
            mask, kept = None, flat
            if dropout > 0 and redrawn is not None:
                flat = redrawn(flat, dropout)
            elif dropout > 0:
                flat, mask = torch.native_dropout(flat, dropout, True)
                kept = flat
            if casts is not None:
                a, b = casts.weight(weight_a), casts.weight(weight_b)
            else:
                a, b = weight_a.to(dtype), weight_b.to(dtype)
            hidden = flat @ a.t()
            if base is not None:  # the base product is ours: summed into in place (no copy of it first)
                out = result.addmm_(hidden, b.t(), alpha=scaling)
            else:
                out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden, b.t(), alpha=scaling)
        ctx.save_for_backward(kept, hidden, a, b, mask, None if base is None else base[0])
        ctx.scaling, ctx.dropout, ctx.casts = scaling, dropout, casts
        ctx.redrawn = redrawn if dropout > 0 else None
        ctx.weights = (weight_a, weight_b) if casts is not None else None
        ctx.dtypes = (x.dtype, weight_a.dtype, weight_b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, hidden, a, b, mask, base_weight = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        casts, redrawn = ctx.casts, ctx.redrawn
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(hidden.dtype)
            g_hidden = _scaled_mm(g, b, ctx.scaling)
            g_x = torch.mm(g_hidden, a) if ctx.needs_input_grad[0] else None  # before dropout's mask
            if redrawn is not None:  # the forward's dropped input and the masked gradient, the mask drawn again
                flat, g_x = redrawn.pair(flat, g_x, ctx.dropout)
            if casts is not None:  # the weights' gradients: off the input gradient's path (`FlatCasts.aside`)
                weight_a, weight_b = ctx.weights
                grad_a, grad_b, scaling = casts.grad(weight_a), casts.grad(weight_b), ctx.scaling

                def weight_grads(g=g, hidden=hidden, g_hidden=g_hidden, flat=flat):
                    _scaled_mm(g.t(), hidden, scaling, out=grad_b)
                    torch.mm(g_hidden.t(), flat, out=grad_a)

                casts.aside(weight_grads, (g, hidden, g_hidden, flat))
                g_a = g_b = None
            else:
                g_b = _scaled_mm(g.t(), hidden, ctx.scaling).to(b_dtype)
                g_a = torch.mm(g_hidden.t(), flat).to(a_dtype)
            if g_x is not None:  # not for the first layer's projections over a frozen embedding
                if mask is not None:
                    g_x = torch.ops.aten.native_dropout_backward(g_x, mask, 1.0 / (1.0 - ctx.dropout))
                if base_weight is not None:
                    g_x.addmm_(g, base_weight)  # the base product's input gradient, summed in place
                g_x = g_x.view(*grad.shape[:-1], g_x.shape[-1]).to(x_dtype)
        return g_x, (grad if base_weight is None else None), g_a, g_b, None, None, None, None, None


def _scaled_mm(left, right, scale: float, out=None):
    """`scale * left @ right` in one kernel (the scaling in the product's epilogue, not a second pass)."""
    if out is None:
        out = left.new_empty(left.shape[0], right.shape[1])
    return torch.addmm(out, left, right, beta=0, alpha=scale, out=out)


def lora_update(x, result, weight_a, weight_b, scaling: float, dropout: float, casts=None, redrawn=None):
    """`result + scaling * dropout(x) @ weight_a.T @ weight_b.T`, in `result`'s dtype, differentiable in
    `x` and `result`, and in both weights (with `casts`: their gradients go into `casts`; with `redrawn`,
    a `LayerDropout`, the mask is drawn again in the backward, not kept)."""
    return LoraUpdate.apply(x, result, weight_a, weight_b, float(scaling), float(dropout), casts, None, redrawn)


def dense_lora_linear(x, base_weight, base_bias, weight_a, weight_b, scaling: float, dropout: float, casts=None,
                      redrawn=None):
    """`x @ base_weight.T + base_bias` plus the LoRA update, in `base_weight`'s dtype, in one autograd node:
    the backward computes the input's gradient through the base weight and the update in one product
    epilogue instead of two gradients autograd then adds (the base weight and bias get none: frozen)."""
    return LoraUpdate.apply(x, None, weight_a, weight_b, float(scaling), float(dropout), casts,
                            (base_weight, base_bias), redrawn)


class FlatCasts:
    """The trained weights of one pass in the compute dtype, cast in one go, and one buffer their
    gradients are written to, cast back to the weights' dtype in one go: four kernels a pass (the
    gather, its cast, the zeroed gradient buffer, its cast back) instead of one cast per weight each way
    (336 and 336 on the 0.5B shape with seven projections).

    `begin()` casts (call it at the start of a pass), `finish()` returns the gradient, as a view of one
    buffer in the weights' dtype, of each weight a layer took from here (`served`; a layer that computes
    in another dtype leaves its weights' gradients to autograd), `reset()` drops a pass that failed.
    Used inside a captured CUDA graph (`studio.train.graphs`), where the buffers are the graph's own.

    With a `side` CUDA stream, the weights' gradient products (`aside`) run there, beside the backward's
    input gradients, which are the pass's critical path and no longer wait for them: on a small model
    they are about a third of the backward's kernels (two products a layer, each with cuBLAS's split-K
    reduction and its zeroed workspace), each too small to fill the GPU alone. The tensors they read
    stay referenced until the critical path has waited for them, `SIDE_LAG` products later, so no later
    kernel reuses that memory too soon; `finish()` and `reset()` wait for all of them."""

    SIDE_LAG = 8  # gradient products in flight on the side stream: about one decoder layer's

    def __init__(self, weights: list, dtype, side=None, cuda=None):
        self.weights, self.dtype, self.side = weights, dtype, side
        self._cuda = cuda  # torch.cuda, or a stand-in with current_stream() and stream(s) (tests)
        self.in_flight: list = []  # (the side stream's event after a product, the tensors it reads)
        self.forked = False  # the side stream has work of this pass the main stream has not waited for
        self.index = {id(w): i for i, w in enumerate(weights)}
        self.offsets = [0]
        for weight in weights:
            self.offsets.append(self.offsets[-1] + weight.numel())
        self.casts: list = []
        self.grads = None
        self.grad_views: list = []
        self.served: set[int] = set()  # ids of the weights a layer took from here this pass

    def _views(self, flat) -> list:
        return [flat[start:end].view(w.shape) for w, start, end in zip(self.weights, self.offsets, self.offsets[1:])]

    def begin(self) -> None:
        flat = torch.cat([w.detach().reshape(-1) for w in self.weights]).to(self.dtype)
        self.casts = self._views(flat)
        self.grads = torch.zeros_like(flat)  # a weight no layer used this pass keeps a zero gradient
        self.grad_views = self._views(self.grads)

    def weight(self, weight):
        self.served.add(id(weight))
        return self.casts[self.index[id(weight)]]

    def grad(self, weight):
        return self.grad_views[self.index[id(weight)]]

    def aside(self, work, reads: tuple) -> None:
        """Run `work()` (gradient products that write only into this pass's gradient buffer and read
        `reads`) on the side stream where there is one, else now."""
        if self.side is None:
            work()
            return
        cuda = self._cuda or torch.cuda
        main = cuda.current_stream()
        self.forked = True  # from here the side stream must be joined back, even if `work` fails
        self.side.wait_stream(main)  # what `work` reads is written
        with cuda.stream(self.side):
            work()
        self.in_flight.append((self.side.record_event(), reads))
        while len(self.in_flight) > self.SIDE_LAG:
            event, _ = self.in_flight.pop(0)
            main.wait_event(event)  # what runs next on the main stream may reuse that product's tensors

    def _join(self) -> None:
        """The main stream waits for every product on the side stream (a capture must end joined)."""
        try:
            if self.side is not None and self.forked:
                (self._cuda or torch.cuda).current_stream().wait_stream(self.side)
        finally:
            self.in_flight, self.forked = [], False

    def finish(self) -> dict:
        """{id of a served weight: its gradient}."""
        try:
            self._join()
            views = self._views(self.grads.to(self.weights[0].dtype))
            return {id(w): view for w, view in zip(self.weights, views) if id(w) in self.served}
        finally:
            self.reset()

    def reset(self) -> None:
        try:
            self._join()
        finally:
            self.casts, self.grads, self.grad_views, self.served = [], None, [], set()
