"""Every sampler on the Gaussian kernels (digits diffusion, digits flow, the mixture), small enough to run in seconds.

``tests/test_kernels.py`` compares what these give with ``tests/data/gaussian_kernel_samples.pt``, written by
``python tests/kernel_cases.py`` before the kernel became a distribution object (commit d389188): the Gaussian
samples must not change. Run it again only on purpose (it overwrites the file).
"""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "data" / "gaussian_kernel_samples.pt"


def cases():
    """``{name: (model factory, sampler factory, reward factory)}``."""
    from tsf.models import DigitsDiffusion, DigitsFlow
    from tsf.models.gmm import GaussianMixture
    from tsf.rewards import LinearReward, build_reward
    from tsf.samplers import DPS, RBF, SMC, SVDD, BaseSampler, BestOfN, CoDe, SoP, ZeroOrderSearch

    digits = lambda: DigitsDiffusion(num_steps=8)  # noqa: E731
    flow = lambda: DigitsFlow(num_steps=8)  # noqa: E731
    gmm = lambda: GaussianMixture(weights=[0.5, 0.5], means=[[-2.0, 0.0], [2.0, 0.0]], covariances=[0.1, 0.1],  # noqa: E731
                                  num_steps=20)
    digit = lambda: build_reward("digit")  # noqa: E731
    linear = lambda: LinearReward([0.5, 0.25])  # noqa: E731
    return {
        "digits/base": (digits, lambda: BaseSampler(), digit),
        "digits/best_of_n": (digits, lambda: BestOfN(num_particles=3), digit),
        "digits/svdd": (digits, lambda: SVDD(num_particles=3), digit),
        "digits/svdd_soft": (digits, lambda: SVDD(num_particles=3, alpha=0.5), digit),
        "digits/smc": (digits, lambda: SMC(num_particles=4, alpha=0.5), digit),
        "digits/fk": (digits, lambda: SMC(num_particles=4, alpha=0.5, potential="max", resample_steps=[2, 4]), digit),
        "digits/das": (digits, lambda: SMC(num_particles=4, alpha=0.5, proposal="gradient", tempering="fraction"),
                       digit),
        "digits/das_tweedie": (digits, lambda: SMC(num_particles=4, alpha=0.5, proposal="gradient",
                                                   gradient_through="tweedie"), digit),
        "digits/dps": (digits, lambda: DPS(guidance_scale=0.5), digit),
        "digits/code": (digits, lambda: CoDe(num_particles=3, num_paths=2, block_size=2), digit),
        "flow/sop": (lambda: DigitsFlow(num_steps=8, diffusion="none"), lambda: SoP(num_particles=2, num_paths=2),
                     digit),
        "flow/rbf": (flow, lambda: RBF(num_particles=2, budget=40, n0=2), digit),
        "flow/rbf_batch": (flow, lambda: RBF(num_particles=2, budget=40, n0=2, proposal_batch=3), digit),
        "flow/zo_search": (lambda: DigitsFlow(num_steps=8, diffusion="none"),
                           lambda: ZeroOrderSearch(num_particles=2, num_initial=2, num_rounds=2), digit),
        "flow/svdd": (flow, lambda: SVDD(num_particles=3), digit),
        "flow/smc": (flow, lambda: SMC(num_particles=4, alpha=0.5), digit),
        "gmm/smc_exact": (gmm, lambda: SMC(num_particles=8, alpha=1.0, value="exact"), linear),
        "gmm/tds": (gmm, lambda: SMC(num_particles=8, alpha=1.0, proposal="gradient"), linear),
        "gmm/svdd": (gmm, lambda: SVDD(num_particles=4, alpha=1.0, value="exact"), linear),
        "gmm/best_of_n": (gmm, lambda: BestOfN(num_particles=4), linear),
    }


def run(name: str) -> torch.Tensor:
    model_fn, sampler_fn, reward_fn = cases()[name]
    n = 6
    out = sampler_fn().sample(model_fn().load(), reward_fn().load(), [i % 10 for i in range(n)], range(n), seed=3)
    return out.x0


if __name__ == "__main__":
    FIXTURE.parent.mkdir(exist_ok=True)
    torch.save({name: run(name) for name in cases()}, FIXTURE)
    print(f"wrote {FIXTURE}")
