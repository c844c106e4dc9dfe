"""Do NCCL collectives captured in a CUDA graph work with lorafit's in-backward all-reduce, and does the
process group go away afterwards? (The diagnostic behind docs/distributed.md's destroy_process_group hang.)

    torchrun --nproc_per_node 2 benchmarks/diag_nccl_graph.py global        # or thread_local (capture mode)

Eight 1024x1024 linears, `dist.BackwardReduce` over their gradients, two warm-up passes without
collectives, one capture with them, 21 replays; prints whether both ranks hold the same reduced
gradients, then frees the graph before `destroy_process_group` (session 6 saw it wait forever while the
graph was alive). A 45 s faulthandler timer dumps every thread if anything hangs.
"""
import faulthandler, os, sys, time
import torch, torch.distributed as dist
from lorafit.training.dist import BackwardReduce

mode = sys.argv[1]
faulthandler.dump_traceback_later(45, exit=True)
rank = int(os.environ["RANK"]); torch.cuda.set_device(rank)
dist.init_process_group("nccl")
dev = torch.device("cuda", rank)
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)]).to(dev)
params = list(model.parameters())
flat = torch.zeros(sum(p.numel() for p in params), device=dev)
off = 0
for p in params:
    p.grad = flat[off:off + p.numel()].view_as(p); off += p.numel()
dist.all_reduce(torch.ones(1, device=dev))  # comm up
red = BackwardReduce(params, flat, min_elems=1 << 18)
x = torch.full((64, 1024), float(rank + 1), device=dev)
def fb(reduce):
    if reduce: red.begin()
    model(x).square().mean().backward()
    if reduce: red.finish()
side = torch.cuda.Stream(); side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(2): fb(False)
torch.cuda.current_stream().wait_stream(side)
flat.zero_()
g = torch.cuda.CUDAGraph()
print(rank, "capturing", mode, len(red.chunks), "chunks", flush=True)
t = time.time()
with torch.cuda.graph(g, capture_error_mode=mode):
    fb(True)
print(rank, "captured", round(time.time() - t, 2), flush=True)
flat.zero_(); g.replay(); torch.cuda.synchronize()
ref = flat.clone(); dist.all_reduce(ref); ref /= 2  # flat on every rank should already be the sum (same on both)
chk = flat.clone(); dist.broadcast(chk, 0)
print(rank, "replayed; equal across ranks:", torch.equal(chk, flat), "nonzero:", bool(flat.abs().sum() > 0), flush=True)
for _ in range(20): flat.zero_(); g.replay()
torch.cuda.synchronize(); print(rank, "20 replays ok", flush=True)
del g
torch.cuda.synchronize()
dist.destroy_process_group()
print(rank, "destroyed", flush=True)
