"""Vocabulary-parallel cross-entropy: ``torchrun --nproc-per-node 2 examples/vocab_parallel.py``.

Each rank holds its rows of a language model's output projection (its slice of
the vocabulary, of unequal sizes here) and computes the loss of the full
logits without gathering them; every rank checks its loss and its gradients
against xent_ext's single-process loss of the full logits. Runs on CPUs (gloo);
with one GPU per rank it uses NCCL.
"""

import os

import torch
import torch.distributed as dist

import xent_ext

use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
dist.init_process_group("nccl" if use_cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
if use_cuda:
    torch.cuda.set_device(device)

# The same full model on every rank (same seed); each rank keeps its rows of the projection.
N, H, V = 64, 32, 1003
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(N, H, generator=gen).to(device)
head = (torch.randn(V, H, generator=gen) / H**0.5).to(device)
class_weight = torch.rand(V, generator=gen).to(device) + 0.5
target = torch.randint(V, (N,), generator=gen).to(device)
target[::7] = -100  # some ignored rows
sizes = [V // world + (r < V % world) for r in range(world)]  # uneven shards, in rank order
start = sum(sizes[:rank])
rows = slice(start, start + sizes[rank])
options = dict(label_smoothing=0.1, z_loss=1e-4)

# 1. From this rank's slice of the logits.
local_logits = (hidden @ head[rows].t()).requires_grad_(True)
loss = xent_ext.distributed.vocab_parallel_cross_entropy(
    local_logits, target, weight=class_weight[rows], **options)  # vocab_start=None: found from the sizes
loss.backward()

# 2. The fused linear form: this rank's rows of the projection, the input replicated.
x = hidden.clone().requires_grad_(True)
w_r = head[rows].clone().requires_grad_(True)
loss_lin = xent_ext.distributed.vocab_parallel_linear_cross_entropy(
    x, w_r, target, weight=class_weight[rows], **options)
loss_lin.backward()  # x.grad: the full input gradient, all-reduced; w_r.grad: this rank's rows

# The same on one process, with the full logits.
full_logits = (hidden @ head.t()).requires_grad_(True)
ref = xent_ext.cross_entropy(full_logits, target, weight=class_weight, **options)
ref.backward()
ref_x = hidden.clone().requires_grad_(True)
ref_w = head.clone().requires_grad_(True)
xent_ext.cross_entropy(ref_x @ ref_w.t(), target, weight=class_weight, **options).backward()

checks = {
    "loss": (loss, ref),
    "logits' grad (this rank's columns)": (local_logits.grad, full_logits.grad[:, rows]),
    "linear loss": (loss_lin, ref),
    "input grad (full, every rank)": (x.grad, ref_x.grad),
    "weight grad (this rank's rows)": (w_r.grad, ref_w.grad[rows]),
}
for name, (got, want) in checks.items():
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank}, {name}: {m}")
print(f"rank {rank} of {world}: classes [{start}, {start + sizes[rank]}) of {V}, loss {loss.item():.6f} "
      f"(one process: {ref.item():.6f}); loss and gradients match")
dist.destroy_process_group()
