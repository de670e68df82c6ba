"""Nsight Compute's view of the 4-bit kernels on one gate_proj weight (18944 x 3584, one row).

Calls the studio's kernel (`studio/model/nf4_cuda.py`), the byte-pair variant and the tensor-core
variant (`bench/nf4_variants.py`), each with its fastest setting from the 2026-11-30 sweeps, twice.
Run under Nsight Compute on the GPU machine, from the bench/ folder:

    ncu -k regex:"nf4_(rows|pairs|mma)" --section SpeedOfLight --section WarpStateStats \\
        --section Occupancy --metrics smsp__inst_executed.sum python3 nf4_ncu.py
"""

from __future__ import annotations


def main() -> None:
    import torch

    from nf4_kernels import quantized
    from nf4_variants import VariantKernels
    from studio.model import nf4_cuda

    param, _ = quantized(18944, 3584)
    layer = nf4_cuda.layer_args(param)
    x = torch.randn(1, 3584, dtype=torch.bfloat16, device="cuda")
    kernels = VariantKernels()
    for _ in range(2):
        kernels.products(layer, x)
        kernels.pairs_products(layer, x, shape=(1, 4, 2, 8, 2))
        kernels.mma_products(layer, x, shape=(8, 4, 8, 2))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
