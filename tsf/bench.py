"""``tsf bench memory``: peak memory of the gradient samplers against K at a fixed ``grad_batch``.

Each measurement runs in a fresh process: DAS on the embedded digits model for
``--samples`` outputs with K particles. On a GPU the peak is
``torch.cuda.max_memory_allocated``; on a CPU it is the process's peak resident set
(sampled every millisecond from ``/proc/self/statm``) above its resident set just before
sampling. Side by side: the same
runs with one gradient chunk for all particles (``grad_batch = samples x K``), the
memory that chunking saves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, os, sys, threading, time, torch
from tsf.models import DigitsDiffusion
from tsf.rewards import build_reward
from tsf.samplers import SMC
K, grad_batch, n, steps, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = DigitsDiffusion(num_steps=steps).load().to(device)
reward = build_reward("digit").load().to(device)
sampler = SMC(num_particles=K, alpha=0.1, proposal="gradient", tempering="fraction", grad_batch=grad_batch,
              max_batch=grad_batch)
sampler.sample(model, reward, [i % 10 for i in range(2)], range(2))  # warm-up: allocator and kernels
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak_rss, done = [0], threading.Event()
def watch():  # the resident set, sampled every millisecond while the sampler runs
    while not done.is_set():
        peak_rss[0] = max(peak_rss[0], rss()); time.sleep(0.001)
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = rss(); threading.Thread(target=watch, daemon=True).start()
out = sampler.sample(model, reward, [i % 10 for i in range(n)], range(n))
if device == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    done.set(); time.sleep(0.01); peak = max(peak_rss[0], rss()) - base
print(json.dumps({"peak_mb": peak / 2**20, "nfe_grad": out.compute["nfe_grad"] / n, "seconds": out.compute["seconds"]}))
"""


def measure(k: int, grad_batch: int, samples: int, steps: int, device: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(k), str(grad_batch), str(samples), str(steps), device],
                         check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="tsf bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["memory"])
    p.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--grad-batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    what = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS above the RSS before sampling"
    print(f"DAS on digits, {args.samples} samples, T = {args.steps}, device {device}; peak memory = {what}")
    print("| K | particle rows | grad_batch | peak MB (chunked) | peak MB (one chunk) | ratio | s (chunked) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for k in args.ks:
        rows_k = args.samples * k
        chunked = measure(k, args.grad_batch, args.samples, args.steps, device)
        whole = measure(k, rows_k, args.samples, args.steps, device)
        rows.append({"K": k, "grad_batch": args.grad_batch, "chunked": chunked, "one_chunk": whole})
        print(f"| {k} | {rows_k} | {args.grad_batch} | {chunked['peak_mb']:.1f} | {whole['peak_mb']:.1f} | "
              f"{whole['peak_mb'] / max(chunked['peak_mb'], 1e-9):.1f} | {chunked['seconds']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=2)
