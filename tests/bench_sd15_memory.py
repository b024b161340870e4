"""GPU memory and time per step of the SD 1.5 paper settings (DAS K = 4, Best-of-4, SVDD-PM M = 20) at
512 px in float16, on the real SD 1.5 and CLIP ViT-L/14 architectures with random weights built from
config (memory and time do not depend on the weights' values; nothing is downloaded; the architectures'
configs are tsf/commands/bench_gpu.py's, where ``tsf bench gpu`` measures every family). The pipeline is
saved and loaded through ``StableDiffusion(pretrained=DIR)``, the path a user's checkpoint takes.

    python tests/bench_sd15_memory.py [--small]   # --small: a CPU smoke run (tsf bench gpu's tiny shapes)
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from tsf.commands.bench_gpu import CLIP_L, REAL, TINY, clip_dir, sd15_pipeline
from tsf.models import StableDiffusion
from tsf.rewards.clip import AestheticScore
from tsf.samplers import SMC, SVDD, BestOfN


def build(root: Path, small: bool) -> tuple[Path, Path]:
    torch.manual_seed(0)
    scale = TINY if small else REAL
    sd15_pipeline(scale, root).save_pretrained(root / "sd15")
    return root / "sd15", clip_dir(scale, root, CLIP_L, head=True)


def main() -> None:
    small = "--small" in sys.argv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "float16" if device == "cuda" else "float32"
    size = 512 if not small else 64
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        sd, clip = build(Path(d), small)
        print(f"built random SD 1.5 + CLIP ViT-L/14 in {time.perf_counter() - t:.0f} s", flush=True)
        settings = {
            "best_of_n K=4 (T=100)": (BestOfN(num_particles=4, max_batch=8), False, 100),
            "svdd_pm M=20 (T=50)": (SVDD(num_particles=20, max_batch=20), False, 50),
            "das K=4 grad_batch=4 (T=100)": (SMC(num_particles=4, proposal="gradient", tempering="gamma",
                                                 gamma=0.008, alpha=0.005, grad_batch=4, max_batch=8), True, 100),
            "das K=4 grad_batch=1 (T=100)": (SMC(num_particles=4, proposal="gradient", tempering="gamma",
                                                 gamma=0.008, alpha=0.005, grad_batch=1, max_batch=8), True, 100),
        }
        reward = AestheticScore(head=str(clip / "head.pth"), model=str(clip), dtype=dtype).load().to(device)
        rows = []
        print(f"| setting ({device}, {dtype}, {size} px, 1 prompt) | peak GiB | s / step | s / image at T |")
        print("|---|---|---|---|")
        for name, (sampler, ckpt, T) in settings.items():
            steps = 3
            model = StableDiffusion(pretrained=str(sd), num_steps=steps, eta=1.0, guidance_scale=5.0, dtype=dtype,
                                    gradient_checkpointing=ckpt, height=size, width=size, decode_batch=1).load().to(device)
            sampler.sample(model, reward, ["a cat"], [0])  # warm-up
            if device == "cuda":
                torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            sampler.sample(model, reward, ["a dog"], [1])
            if device == "cuda":
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - t) / steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            rows.append({"setting": name, "peak_gib": peak, "s_per_step": per_step, "s_per_image": per_step * T})
            print(f"| {name} | {peak:.1f} | {per_step:.2f} | {per_step * T:.0f} |", flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        print(json.dumps({"device": name, "rows": rows}))


if __name__ == "__main__":
    main()
