"""Device memory bandwidth, the denominator of every decode roofline here: a 4 GiB device-to-device
torch copy, 3 warm-ups then 10 timed with CUDA events; GB/s counts bytes read + written (1 GB = 1e9 B).

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
if len(sys.argv) > 1:
    json.dump({"copy_gb_s": round(gbs, 1), "bytes_per_copy": n, "timed_copies": 10,
               "method": "torch device-to-device copy_ of 4 GiB, 3 warm-ups then 10 timed with CUDA events; "
                         "GB/s counts bytes read + written (1 GB = 1e9 B)", "device": torch.cuda.get_device_name(0)},
              open(sys.argv[1], "w"), indent=1)
print(f"device copy bandwidth (read+write): {gbs:.0f} GB/s")
