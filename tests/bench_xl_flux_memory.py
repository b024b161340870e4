"""GPU memory and time of the SDXL (DAS, PickScore) and FLUX.1 [schnell] (RBF / ODE Best-of-N, aesthetic)
settings on the real architectures with random weights, built from config directly on the GPU in 16-bit
and handed to the model as its pipeline (no download, no multi-GB save). Memory and speed do not depend on
the weights' values. The architectures' configs are tsf/commands/bench_gpu.py's (``tsf bench gpu`` measures
every family); their VAEs now keep the checkpoints' ``force_upcast``, so SDXL's decodes in float32 as tsf
does with the real checkpoint under float16.

    python tests/bench_xl_flux_memory.py [--small]   # --small: a CPU smoke run
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from tsf.commands.bench_gpu import CLIP_H, CLIP_L, REAL, TINY, clip_dir, flux_pipeline, sdxl_pipeline
from tsf.models.pipelines import prepare_pipeline
from tsf.models import Flux, StableDiffusion
from tsf.rewards.clip import AestheticScore, PickScore
from tsf.samplers import RBF, SMC, BestOfN

SMALL = "--small" in sys.argv
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S = TINY if SMALL else REAL  # the CPU smoke run: tsf bench gpu's tiny widths and depths


def measure(name, model, reward, sampler, steps_of_image, unit_steps, rows):
    prompts = ["a photo of a cat"]
    sampler.sample(model, reward, prompts, [0])  # warm-up
    if DEVICE == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = sampler.sample(model, reward, prompts, [1])
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
    per = sec / (unit_steps or out.compute["nfe"])  # per step, or per counted NFE
    rows.append({"setting": name, "peak_gib": peak, "s_per_unit": per, "s_per_image": per * steps_of_image,
                 "nfe": out.compute["nfe"]})
    print(f"| {name} | {peak:.1f} | {per:.2f} | {per * steps_of_image:.0f} |", flush=True)


def main() -> None:
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        torch.manual_seed(0)
        t = time.perf_counter()
        clip_h = clip_dir(S, root, CLIP_H, head=False)
        clip_l = clip_dir(S, root, CLIP_L, head=True)
        print(f"rewards built in {time.perf_counter() - t:.0f} s", flush=True)
        print(f"| setting ({DEVICE}, 16-bit weights, 1 prompt) | peak GiB | s / unit | s / image |")
        print("|---|---|---|---|")
        size = 1024 if not SMALL else 64
        dn = "float16" if DEVICE == "cuda" else "float32"
        pick = PickScore(model=str(clip_h), processor=str(clip_h), dtype=dn).load().to(DEVICE)
        with torch.device(DEVICE):
            pipe = prepare_pipeline(sdxl_pipeline(S, root).to(DEVICE, dtype))
        for name, sampler, ckpt, T in [
            ("SDXL Best-of-4, 1024 px (unit: step, T = 100)", BestOfN(num_particles=4, max_batch=8), False, 100),
            ("SDXL DAS K = 4, grad_batch 1, checkpointing (unit: step, T = 100)",
             SMC(num_particles=4, proposal="gradient", tempering="gamma", gamma=0.008, alpha=0.01, grad_batch=1,
                 max_batch=8), True, 100)]:
            m = StableDiffusion(pretrained="random-sdxl", num_steps=2, guidance_scale=5.0, dtype=dn, height=size,
                                width=size, gradient_checkpointing=ckpt, decode_batch=1)
            m.load_pipeline = lambda: pipe
            measure(name, m.load().to(DEVICE), pick, sampler, T, 2, rows)
            del m
        del pipe, pick
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        aest = AestheticScore(head=str(clip_l / "head.pth"), model=str(clip_l), dtype=dn).load().to(DEVICE)
        with torch.device(DEVICE):
            pipe = prepare_pipeline(flux_pipeline(S, root).to(DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32))
        bdn = "bfloat16" if DEVICE == "cuda" else "float32"
        size = 512 if not SMALL else 64
        for name, sampler, kw, unit, total in [
            ("FLUX.1 schnell RBF, VP-SDE, 512 px (unit: NFE, budget 500)", RBF(budget=32, n0=4, proposal_batch=4),
             {"interpolant": "vp", "diffusion": "square"}, None, 500),
            ("FLUX.1 schnell ODE Best-of-N, max_batch 16, 512 px (unit: NFE, 500)",
             BestOfN(num_particles=16, max_batch=16), {"diffusion": "none"}, None, 500)]:
            m = Flux(pretrained="random-flux", num_steps=10, height=size, width=size, dtype=bdn, **kw)
            m.load_pipeline = lambda: pipe
            measure(name, m.load().to(DEVICE), aest, sampler, total, unit, rows)
            del m
        print(json.dumps({"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "rows": rows}))


if __name__ == "__main__":
    main()
