"""Back-to-back fwd+bwd timing (each implementation in its own block of calls), 1 and 2 threads.

Complements `python -m xent_ext.bench`, whose interleaved fwd+bwd rows are dominated on these VMs
by first-touch costs of just-freed memory (benchmarks/NOTES.md). Prints median ms and ratios.
"""
import statistics, sys, time
import torch, torch.nn.functional as F
import xent_ext

SHAPES = [((4096, 32000), torch.float32), ((4096, 32000), torch.bfloat16), ((4096, 128256), torch.bfloat16),
          ((8192, 50257), torch.float32), ((65536, 1000), torch.float32), ((1048576, 10), torch.float32),
          ((16, 21, 128, 128), torch.float32), ((8, 256000), torch.float32)]

def block(fn, x, y, n):
    def step():
        x.grad = None
        fn(x, y).backward()
    step()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3

print(f"torch {torch.__version__}, xent_ext isa {xent_ext.cpu_capability()}")
print(f"{'shape':18s} {'dtype':9s} thr  xent ms  eager ms  eager/xent")
for threads in (1, 2):
    torch.set_num_threads(threads)
    for shape, dt in SHAPES:
        x = torch.randn(*shape, dtype=dt).requires_grad_()
        y = torch.randint(shape[1], (shape[0],) + shape[2:])
        n = 3 if x.numel() > 2e8 else 5
        a = block(xent_ext.cross_entropy, x, y, n)
        b = block(F.cross_entropy, x, y, n)
        print(f"{'x'.join(map(str, shape)):18s} {str(dt)[6:]:9s} {threads:3d} {a:8.1f} {b:9.1f} {b / a:10.2f}", flush=True)
        del x, y
