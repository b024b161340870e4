"""The README's blind-spot check of the hard digits task: pixel-space gradient ascent (Adam, lr 0.02,
pixels clamped to [0, 1]) on one classifier's log-odds of the true class, from 200 real test digits,
and what the other classifier says of the same images along the way.

    python docs/blind_spots.py      # a few seconds on 2 CPU cores
"""

import torch

from tsf.models.digits import load_digits_splits
from tsf.rewards import build_reward


def main(steps: int = 200, n: int = 200) -> None:
    s = load_digits_splits()
    x0, y = s.test_x[:n], s.test_y[:n].tolist()
    odds = {"MLP": build_reward("digit_log_odds").load(), "CNN": build_reward("digit_holdout_log_odds").load()}
    logp = {"MLP": build_reward("digit").load(), "CNN": build_reward("digit_holdout").load()}
    with torch.no_grad():
        real = odds["MLP"](s.test_x, s.test_y.tolist())
    print(f"real test digits ({len(real)}), MLP log-odds: mean {real.mean():.1f}, std {real.std():.1f}, "
          f"max {real.max():.1f}")
    print("| ascent on | step | its log-odds | other's log-odds | other's log p | RMS pixel change |")
    print("|---|---|---|---|---|---|")
    for name, other in (("MLP", "CNN"), ("CNN", "MLP")):
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.02)
        for step in range(steps + 1):
            if step % 50 == 0:
                with torch.no_grad():
                    print(f"| {name} | {step} | {odds[name](x, y).mean():.1f} | {odds[other](x, y).mean():.1f} | "
                          f"{logp[other](x, y).mean():.3f} | {(x - x0).square().mean().sqrt():.3f} |")
            opt.zero_grad()
            (-odds[name](x, y).sum()).backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(0, 1)


if __name__ == "__main__":
    main()
