import inspect, torch, sys
sys.path.insert(0, ".")
from studio.model.attention import varlen_kernel, attend_rows
k = varlen_kernel(); print("kernel", k, inspect.signature(k) if k else None)
q = torch.randn(1, 28, 600, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
kk = torch.randn(1, 4, 600, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 4, 600, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
starts = torch.tensor([0, 250, 600], dtype=torch.int32, device="cuda")
out = attend_rows(k, q, kk, v, starts, 350, 128 ** -0.5)
out.float().sum().backward()
ref = []
for a, b in ((0, 250), (250, 600)):
    ref.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], kk[:, :, a:b], v[:, :, a:b], is_causal=True, enable_gqa=True).transpose(1, 2))
ref = torch.cat(ref, 1)
print("shape", out.shape, "max diff", (out - ref).abs().max().item(), "grad", q.grad.abs().sum().item() > 0)
