"""The README's "VP finish" table: base samples of two Gaussian mixtures as flow models, for each
path, time grid, T and ``last_step``, against the mixture (component weights, means, variances).

    python docs/vp_finish.py [num_samples]      # 20000 by default, about a minute on 2 CPU cores
"""

import itertools
import sys

import torch

from tsf.models.gmm import GaussianMixtureFlow
from tsf.samplers import BaseSampler

MIXES = {
 "2-mode": dict(weights=[0.3, 0.7], means=[[-2.0, 0.0], [2.0, 0.5]], covariances=[0.25, [0.3, 0.1]]),
 "3-mode": dict(weights=[0.2, 0.3, 0.5], means=[[-3.0, 1.0], [0.0, -2.0], [3.0, 1.5]], covariances=[0.5, [0.2, 0.8], 0.3]),
}
n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
print("| mixture | path | T | grid | last step | weights err (max) | mean err (max, rel. to sd) | variance ratio (min-max) |")
print("|---|---|---|---|---|---|---|---|")
for (mname, mix), interp, T, grid, last in itertools.product(MIXES.items(), ["vp", "linear"], [10, 50], ["uniform", "reference"], ["euler", "tweedie"]):
    if interp == "linear" and grid == "reference":
        continue
    m = GaussianMixtureFlow(**mix, num_steps=T, interpolant=interp, time_grid=grid, last_step=last)
    x = BaseSampler(max_batch=10**6).sample(m, None, [None] * n, range(n), seed=0).x0.double()
    comp = m.component_of(x)
    w = torch.tensor(mix["weights"], dtype=torch.float64)
    werr, merr, vr = 0.0, 0.0, []
    for k in range(len(w)):
        sel = comp == k
        werr = max(werr, abs(sel.double().mean().item() - w[k].item()))
        cov = torch.as_tensor(mix["covariances"][k], dtype=torch.float64)
        var = cov * torch.ones(2, dtype=torch.float64) if cov.dim() <= 1 else cov.diagonal()
        xm = x[sel]
        merr = max(merr, ((xm.mean(0) - torch.tensor(mix["means"][k], dtype=torch.float64)).abs() / var.sqrt()).max().item())
        vr += (xm.var(0) / var).tolist()
    print(f"| {mname} | {interp} | {T} | {grid} | {last} | {werr:.3f} | {merr:.3f} | {min(vr):.2f}-{max(vr):.2f} |", flush=True)
