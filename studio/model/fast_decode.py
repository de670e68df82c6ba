"""Faster token-by-token decoding on a GPU: a static KV cache, optionally captured in CUDA graphs.

Batch-1 decoding of a 4-bit 7B model is bound by Python and kernel-launch overhead, not by the GPU:
each token runs thousands of small kernels. A static cache of fixed size lets the decode step be
compiled once; `cudagraphs` replays the same kernels (the same numbers as eager), `inductor` also
fuses them. Prefill stays eager. Cache sizes are rounded up to buckets so a new prompt length does
not trigger a new compilation.
"""

from __future__ import annotations

from studio.model.graph_decode import cache_length

DECODE_MODES = ("graphs", "eager", "static", "cudagraphs", "inductor")


def allow_compiled_decoding(model) -> None:
    """transformers refuses to auto-compile bitsandbytes models; the 4-bit kernels are custom ops that
    torch.compile handles, so declare this model's quantizer compileable (this model only)."""
    from studio.model.card import base_of

    base = base_of(model)
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is None or getattr(quantizer, "is_compileable", False):
        return
    cls = quantizer.__class__
    quantizer.__class__ = type(f"Compileable{cls.__name__}", (cls,), {"is_compileable": property(lambda self: True)})


def decode_kwargs(model, mode: str, prompt_tokens: int, max_new_tokens: int) -> dict:
    """Extra generate() arguments for a decode mode ('eager' adds nothing; 'graphs' does not use
    generate() at all, see studio.model.graph_decode)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}")
    if mode in ("eager", "graphs") or getattr(model, "device", None) is None or model.device.type != "cuda":
        return {}
    from transformers import CompileConfig

    cache_len = cache_length(prompt_tokens, max_new_tokens)
    kwargs = {"cache_implementation": "static", "cache_config": {"max_cache_len": cache_len}}
    if mode == "static":
        kwargs["disable_compile"] = True
        return kwargs
    allow_compiled_decoding(model)
    if mode == "inductor":
        import torch._inductor.config as inductor_config

        # cudagraph trees keep state in thread-local storage and fail in the worker threads that stream replies
        inductor_config.triton.cudagraph_trees = False
    backend = "cudagraphs" if mode == "cudagraphs" else "inductor"
    kwargs["compile_config"] = CompileConfig(backend=backend, mode=None if backend == "cudagraphs" else "reduce-overhead",
                                             fullgraph=False, dynamic=False)
    return kwargs
