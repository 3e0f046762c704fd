"""Device memory bandwidth, the denominator of every decode roofline here: a 4 GiB device-to-device
torch copy, 3 warm-ups then 10 timed with CUDA events; GB/s counts bytes read + written (1 GB = 1e9 B).
Also the bf16 GEMM rate, the denominator of every compute limit: torch.matmul of 8192 x 8192 x 8192
bf16 (cuBLAS, f32 accumulate), 3 warm-ups then 20 timed.

usage: python3 bench/gpu/bandwidth.py [JSON_OUT]   (prints one line; writes the details to JSON_OUT)
"""
import json
import sys

import torch

n = 4 << 30
x = torch.empty(n, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
s, e = torch.cuda.Event(True), torch.cuda.Event(True)
torch.cuda.synchronize()
s.record()
for _ in range(10):
    y.copy_(x)
e.record()
torch.cuda.synchronize()
gbs = 2 * 10 * n / (s.elapsed_time(e) / 1e3) / 1e9
del x, y
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
s.record()
for _ in range(20):
    a @ b
e.record()
torch.cuda.synchronize()
tflops = 20 * 2 * 8192**3 / (s.elapsed_time(e) / 1e3) / 1e12
if len(sys.argv) > 1:
    json.dump({"copy_gb_s": round(gbs, 1), "bf16_gemm_tflops": round(tflops, 1),
               "gemm_method": "torch.matmul 8192^3 bf16, 3 warm-ups then 20 timed with CUDA events", "bytes_per_copy": n, "timed_copies": 10,
               "method": "torch device-to-device copy_ of 4 GiB, 3 warm-ups then 10 timed with CUDA events; "
                         "GB/s counts bytes read + written (1 GB = 1e9 B)", "device": torch.cuda.get_device_name(0)},
              open(sys.argv[1], "w"), indent=1)
print(f"device copy bandwidth (read+write): {gbs:.0f} GB/s; bf16 GEMM 8192^3: {tflops:.0f} TFLOP/s")
