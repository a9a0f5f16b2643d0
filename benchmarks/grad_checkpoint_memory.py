"""Peak memory of one CPU training step at 512x512, with and without gradient checkpointing.

Each (model, setting) runs in a fresh subprocess with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_=65536), so freed tensors go back to the OS and the resident set
tracks live memory. In the subprocess: build the model and an AdamW optimizer, run one
warm-up step (allocates gradients and optimizer state), then reset the kernel's peak-RSS
mark (/proc/self/clear_refs = 5) and run a second step (forward, backward, optimizer step).
Reported: the peak RSS of that step above the RSS before it, and the bytes autograd held
for backward (distinct storages of the tensors saved outside checkpointed regions, parameters
excluded, counted with saved_tensors_hooks).

    python benchmarks/grad_checkpoint_memory.py [--models spatialformer_tiny ...] [--batch 2] [--size 512]
"""
import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import contextlib, gc, json, sys, time, torch, timm, spatialformer
name, ckpt, batch, size = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
torch.manual_seed(0)
model = timm.create_model(name).train()
model.set_grad_checkpointing(ckpt)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))

param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

def step(count_saved=False):
    storages = {}
    def pack(t):  # distinct storages autograd keeps for backward, parameters excluded
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t
    ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved else contextlib.nullcontext()
    with ctx:
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad(set_to_none=False)
    loss.backward()
    opt.step()
    return sum(storages.values())

step()
gc.collect()
base = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
t = time.time()
saved = step(count_saved=True)
elapsed = time.time() - t
peak = rss("VmHWM:")
print(json.dumps(dict(model=name, checkpointing=ckpt, batch=batch, size=size, rss_before=base, peak_rss=peak,
                      step_peak_above_before=peak - base, saved_for_backward=saved, step_seconds=elapsed)))
'''


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["spatialformer_tiny", "spatialformer_small", "spatialformer_base"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    mib = 2**20
    print(f"{'model':20s} {'ckpt':5s} {'step peak above before (MiB)':>29s} {'peak RSS (MiB)':>15s} {'saved for bwd (MiB)':>20s} {'step s':>7s}")
    for name in args.models:
        for ckpt in (False, True):
            out = subprocess.run([sys.executable, "-c", CHILD, name, str(int(ckpt)), str(args.batch), str(args.size)],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:20s} {str(ckpt):5s} {r['step_peak_above_before'] / mib:29.0f} {r['peak_rss'] / mib:15.0f} "
                  f"{r['saved_for_backward'] / mib:20.0f} {r['step_seconds']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
