"""The CUDA and half-precision paths (skipped without a GPU): tiny random SD1, SDXL, SD3 and FLUX
pipelines with float16/bfloat16 weights, every sampler family, gradients through the VAE and a tiny
CLIP aesthetic reward; the embedded digits samplers on the GPU."""

import pytest
import torch

from tiny import clip_model_dir, tiny_pipeline
from tsf.models import DigitsDiffusion, DigitsFlow, Flux, StableDiffusion, StableDiffusion3
from tsf.rewards import build_reward
from tsf.rewards.clip import AestheticHead, AestheticScore
from tsf.samplers import RBF, SMC, SVDD, BestOfN, DPS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAMILIES = {"sd15": StableDiffusion, "sdxl": StableDiffusion, "sd3": StableDiffusion3, "flux": Flux}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    clip = clip_model_dir(root / "clip")
    torch.manual_seed(0)
    torch.save(AestheticHead(16).state_dict(), clip / "head.pth")
    return {**{k: tiny_pipeline(k, root / k) for k in FAMILIES}, "clip": clip}


def samplers(kind):
    out = [BestOfN(num_particles=2), SVDD(num_particles=2),
           SMC(num_particles=2, proposal="gradient", tempering="gamma", alpha=0.01, grad_batch=2)]
    return out + ([RBF(budget=12, n0=2, proposal_batch=2)] if kind in ("sd3", "flux") else [])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_half_precision_pipelines_on_cuda(assets, kind, dtype):
    extra = {"height": 16, "width": 16} if kind == "flux" else {}
    half = FAMILIES[kind](pretrained=str(assets[kind]), num_steps=3, dtype=dtype, gradient_checkpointing=True,
                          **extra).load().cuda()
    full = FAMILIES[kind](pretrained=str(assets[kind]), num_steps=3, **extra).load().cuda()
    reward = AestheticScore(head=str(assets["clip"] / "head.pth"), model=str(assets["clip"]), dtype=dtype).load().cuda()
    prompts = ["a photo of a cat", "a dog"]
    for s in samplers(kind):
        out = s.sample(half, reward, prompts, range(2))
        assert out.x0.is_cuda and out.x0.dtype == torch.float32 and torch.isfinite(out.x0).all(), type(s).__name__
        assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.rewards).all()
        if isinstance(s, SMC):
            assert out.compute["nfe_grad"] > 0
    # the same seeds in fp32: half precision moves the images only a little
    from tsf.samplers.base import BaseSampler

    h = BaseSampler().sample(half, None, prompts, range(2), seed=1).images
    f = BaseSampler().sample(full, None, prompts, range(2), seed=1).images
    assert (h - f).abs().mean() < 0.05, (h - f).abs().mean()


@pytest.mark.parametrize("method", ["best_of_n", "svdd", "das", "dps", "rbf"])
def test_digits_samplers_on_cuda_beat_the_base(method):
    reward = build_reward("digit").load().cuda()
    conds, ids = [i % 10 for i in range(64)], range(64)
    if method == "rbf":
        model = DigitsFlow(num_steps=10).load().cuda()
        sampler = RBF(budget=100)
    else:
        model = DigitsDiffusion(num_steps=20).load().cuda()
        sampler = {"best_of_n": BestOfN(num_particles=8), "svdd": SVDD(num_particles=8),
                   "das": SMC(num_particles=8, proposal="gradient", tempering="fraction", alpha=0.1),
                   "dps": DPS(guidance_scale=1.0)}[method]
    from tsf.samplers.base import BaseSampler

    base = BaseSampler().sample(model, reward, conds, ids)
    out = sampler.sample(model, reward, conds, ids)
    assert out.x0.is_cuda and torch.isfinite(out.x0).all()
    assert reward(out.images, conds).mean() > reward(base.images, conds).mean()
