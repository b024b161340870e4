"""``tsf claims``: the papers' headline claims re-tested on the digits tasks, each with its uncertainty and a
verdict (README, "Claims of the papers, re-tested").

It runs (or, with ``--skip_runs``, only reads) per task (``digits``: the log-probability target, which
saturates at 0; ``hard``: the MLP's log-odds, which does not):

* every diffusion config of the task's folder (500 samples, T = 50; SVDD-MC's value network is fitted
  first if its checkpoint is missing), and DAS and TDS at ``pressure_alpha`` where the task sets one;
* Best-of-16 and Best-of-64 on 256 samples (the headroom);
* every flow config at each budget, as ``tsf scaling`` does (T = 10); RBF and SVDD at 500 NFE with T = 20
  and 50, and RBF with ``proposal_batch: 1`` (what separates the step count from the method);
* the over-optimisation comparison of ``tsf overopt`` and one sampling run on each fine-tuned adapter
  (per-sample rewards on the samplers' ids).

Every run goes through the runner of ``tsf compare`` with ``--resume true``: run again, the command keeps
finished runs. The claims table is written to ``OUTPUT_DIR/claims.md`` and printed.

The verdict of a comparison ``A > B``: the mean paired difference over the shared sample ids with a 95%
interval (``1.96`` standard errors of the paired differences; for diversity and fd, a 95% bootstrap
interval over the same resampled ids). A claim **holds** when every one of its comparisons is resolved
in its direction (the interval excludes 0), **fails** when any is resolved against it, and is
**unresolved** otherwise. No hyper-parameter is set per claim: the configs are the task folders' own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from tsf.commands import ToolParser

ROOT = Path(__file__).resolve().parents[2]
CROSS = "digit_holdout"


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    diffusion: str       # configs/<folder> of the diffusion model (T = 50)
    flow: str            # configs/<folder> of the flow model (T = 10)
    overopt: str         # the tsf overopt domain
    target: str          # the target reward's name
    budgets: tuple       # the flow budgets (NFE per sample)
    pressure_alpha: Optional[float] = None  # DAS and TDS again at this alpha (diagnostic: the pressure, not the reward)


TASKS = {
    "digits": Task("digits", "digits: log p(class) under the MLP (max 0)", "digits", "digits_flow", "diffusion",
                   "digit", (100, 500)),
    "hard": Task("hard", "hard digits: log-odds of the class under the MLP (unbounded)", "digits_hard",
                 "digits_flow_hard", "hard", "digit_log_odds", (50, 100, 200, 500, 1000), pressure_alpha=0.1),
}
DIFFUSION = ("base", "best_of_n", "dps", "smc", "svdd_mc", "svdd_pm", "tds", "fk", "das")
FLOW = ("ode_bon", "zo_search", "sop", "sde_bon", "smc_linear", "code", "svdd_linear", "rbf_linear", "rbf_vp")
HEADROOM = (16, 64)
HEADROOM_SAMPLES = 256
RBF_STEPS = (20, 50)
RBF_BUDGET = 500
QUIET = ("--wandb_mode=disabled", "--trainer.enable_progress_bar=false")


# ----------------------------------------------------------------------------- the runs
def _run(out: Path, *args: str) -> Path:
    from tsf.commands.compare import run_tsf

    run_dir = run_tsf("sample", out, *args, *QUIET)
    if run_dir is None:
        sys.exit(f"tsf claims: a run failed: tsf sample {' '.join(args)} (output directory {out})")
    return run_dir


def fit_value(task: Task) -> None:
    """SVDD-MC's value network for the task, fitted once (``tsf fit`` on the folder's value.yaml)."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / task.diffusion / "svdd_mc.yaml").read_text())
    checkpoint = Path(cfg["model"]["init_args"]["sampler"]["init_args"]["value"]["init_args"]["checkpoint"])
    if checkpoint.is_file():
        return
    cmd = [sys.executable, "-m", "tsf.cli", "fit", f"--config={ROOT / 'configs' / task.diffusion / 'value.yaml'}"]
    print("+", "tsf", *cmd[3:], flush=True)
    if subprocess.run(cmd).returncode != 0 or not checkpoint.is_file():
        sys.exit(f"tsf claims: the value fit for {task.name} failed (no {checkpoint})")


def run_all(task: Task, out: Path) -> None:
    """Every run the task's claims read (finished runs are kept)."""
    from tsf.commands import overopt, scaling

    cfg = ROOT / "configs"
    fit_value(task)
    for name in DIFFUSION:
        _run(out / "diffusion", f"--config={cfg / task.diffusion / f'{name}.yaml'}", f"--run_name={name}")
    if task.pressure_alpha is not None:
        for name in ("tds", "das"):
            _run(out / "diffusion", f"--config={cfg / task.diffusion / f'{name}.yaml'}",
                 f"--run_name={name}_alpha{task.pressure_alpha:g}",
                 f"--model.init_args.sampler.init_args.alpha={task.pressure_alpha}")
    for n in HEADROOM:
        _run(out / "headroom", f"--config={cfg / task.diffusion / 'best_of_n.yaml'}", f"--run_name=best_of_n_N{n}",
             f"--model.init_args.sampler.init_args.num_particles={n}",
             f"--data.init_args.num_samples={HEADROOM_SAMPLES}")
    scaling.main([*(str(cfg / task.flow / f"{m}.yaml") for m in FLOW), "--budgets", *map(str, task.budgets),
                  "--output_dir", str(out / "flow"), "--", *QUIET])
    for m in ("rbf_linear", "rbf_vp", "svdd_linear"):
        path = cfg / task.flow / f"{m}.yaml"
        for steps in RBF_STEPS:
            _run(out / "flow", f"--config={path}", f"--run_name={m}_T{steps}_nfe{RBF_BUDGET}",
                 f"--model.init_args.base.init_args.num_steps={steps}",
                 *scaling.budget_overrides(path, RBF_BUDGET, steps=steps))
    for m in ("rbf_linear", "rbf_vp"):
        _run(out / "flow", f"--config={cfg / task.flow / f'{m}.yaml'}", f"--run_name={m}_pb1_nfe{RBF_BUDGET}",
             *scaling.budget_overrides(cfg / task.flow / f"{m}.yaml", RBF_BUDGET),
             "--model.init_args.sampler.init_args.proposal_batch=1")
    overopt.main(["--domain", task.overopt, "--output_dir", str(out / "overopt")])
    samplers, tunes, _, _ = overopt.DOMAINS[task.overopt]
    for m in tunes:
        _run(out / "overopt_adapters", f"--config={cfg / samplers / 'base.yaml'}", f"--run_name={m}",
             f"--model.init_args.base.init_args.adapter={out / 'overopt' / f'finetune_{m}' / 'adapter'}")


# ----------------------------------------------------------------------------- the statistics
@lru_cache(maxsize=None)
def samples(run_dir: Path) -> dict:
    from tsf.cli import load_samples

    if not (run_dir / "samples.pt").is_file():
        raise FileNotFoundError(f"{run_dir} has no samples.pt (run tsf claims without --skip_runs)")
    s = load_samples(run_dir)
    order = s["sample_id"].argsort()
    return {"ids": s["sample_id"][order].numpy(), "images": s["images"][order],
            "rewards": {k: v[order].double().numpy() for k, v in s["rewards"].items()}}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _shared(a: Path, b: Path) -> tuple[np.ndarray, np.ndarray]:
    ia, ib = samples(a)["ids"], samples(b)["ids"]
    common = np.intersect1d(ia, ib)
    return np.searchsorted(ia, common), np.searchsorted(ib, common)


@dataclass
class Diff:
    """``a - b`` in the claim's direction (``sign`` -1 when lower is better), with a 95% interval."""

    a: float
    b: float
    diff: float
    lo: float
    hi: float

    @property
    def se(self) -> float:
        """The standard error behind the 95% interval (its half-width / 1.96)."""
        return (self.hi - self.lo) / (2 * 1.96)

    @property
    def resolved(self) -> int:
        return 1 if self.lo > 0 else -1 if self.hi < 0 else 0


def paired(a: Path, b: Path, reward: str) -> Diff:
    """The mean per-sample ``reward`` of ``a`` minus that of ``b`` over their shared sample ids, with
    1.96 standard errors of the paired differences (non-finite rewards left out, as the evaluator does)."""
    ra, rb = (samples(r)["rewards"][reward] for r in (a, b))
    ia, ib = _shared(a, b)
    x, y = ra[ia], rb[ib]
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    se = d.std(ddof=1) / np.sqrt(len(d))
    return Diff(float(x[ok].mean()), float(y[ok].mean()), float(d.mean()), float(d.mean() - 1.96 * se),
                float(d.mean() + 1.96 * se))


@lru_cache(maxsize=None)
def _feature_net():
    from tsf.rewards import build_reward

    r = build_reward(CROSS)
    r.load()
    return r


@lru_cache(maxsize=None)
def features(run_dir: Path):
    import torch

    with torch.no_grad():
        return _feature_net().features(samples(run_dir)["images"].float() / 255).double()


@lru_cache(maxsize=None)
def reference_features(run_dir: Path):
    """The evaluator's fd reference for ``run_dir``'s model and conditions (the same plain base samples,
    drawn with the same seed as :meth:`tsf.lightning.SamplingModule.reference_images`)."""
    import torch
    import yaml

    from tsf.commands.bench import build
    from tsf.lightning.sampling import REFERENCE_SEED
    from tsf.samplers import BaseSampler

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    init = cfg["model"]["init_args"]
    base = build(init["base"])
    n = int(init.get("fidelity_samples", 1000))
    conditions = cfg["data"]["init_args"].get("conditions") or [None]
    conds = [conditions[i % len(conditions)] for i in range(n)]
    with torch.no_grad():
        batch = BaseSampler().sample(base, None, conds, torch.arange(n), seed=REFERENCE_SEED)
        images = batch.images if batch.images is not None else batch.x0
        return _feature_net().features(images.float()).double()


def set_metric(a: Path, b: Path, which: str, num_resamples: int = 200, seed: int = 0) -> Diff:
    """``diversity`` (pairwise cosine distance, higher kept) or ``fd`` (lower kept, so the sign is flipped:
    ``b - a``) of ``a`` against ``b``, with a 95% bootstrap interval over jointly resampled shared ids."""
    import torch

    from tsf.evaluation import frechet_distance, pairwise_cosine_distance

    ia, ib = _shared(a, b)
    fa, fb = features(a)[torch.as_tensor(ia)], features(b)[torch.as_tensor(ib)]
    ref = reference_features(a) if which == "fd" else None

    def stat(f):
        return pairwise_cosine_distance(f) if which == "diversity" else frechet_distance(f, ref)

    sign = 1.0 if which == "diversity" else -1.0
    va, vb = stat(fa), stat(fb)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(num_resamples):
        idx = torch.as_tensor(rng.integers(0, len(ia), len(ia)))
        diffs.append(sign * (stat(fa[idx]) - stat(fb[idx])))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return Diff(va, vb, sign * (va - vb), float(lo), float(hi))


# ----------------------------------------------------------------------------- the claims
def verdict(diffs: list) -> str:
    """holds: every comparison resolved in the claim's direction; fails: any resolved against it. An entry is
    a :class:`Diff` or its outcome already decided (1 for, -1 against, 0 unresolved)."""
    signs = [d if isinstance(d, int) else d.resolved for d in diffs]
    return "holds" if all(s > 0 for s in signs) else "fails" if any(s < 0 for s in signs) else "unresolved"


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def describe(name_a: str, name_b: str, d: Diff, what: str = "", judged: bool = True) -> str:
    """``A a vs B b: a - b ± half-interval``, marked where a judged comparison is not resolved for the claim."""
    half = (d.hi - d.lo) / 2
    mark = {1: "", -1: " (against)", 0: " (unresolved)"}[d.resolved] if judged else ""
    return (f"{name_a} {_fmt(d.a)} vs {name_b} {_fmt(d.b)}{what}: {'+' if d.diff >= 0 else ''}{_fmt(d.diff)} "
            f"± {_fmt(half)}{mark}")


@dataclass
class Claim:
    claim: str
    task: str
    measured: list[str]
    verdict: str


def chain(dirs: dict[str, Path], order: list[str], reward: str) -> tuple[list[Diff], list[str]]:
    """Adjacent comparisons of a claimed order ``order[0] < order[1] < ...`` (by mean ``reward``)."""
    diffs, text = [], []
    for lo, hi in zip(order, order[1:]):
        d = paired(dirs[hi], dirs[lo], reward)
        diffs.append(d)
        text.append(describe(hi, lo, d))
    return diffs, text


def kept(a: Path, b: Path, la: str, lb: str, target: str, diffs: list[Diff], text: list[str]) -> None:
    """What ``a`` keeps that ``b`` loses: cross-reward, diversity, fd (appended to ``diffs``), with both
    targets beside them (in ``text`` only: the claim is about what comes with the target)."""
    text.append(describe(la, lb, paired(a, b, target), " (target)", judged=False))
    for d, what in ((paired(a, b, CROSS), " (cross)"), (set_metric(a, b, "diversity"), " (diversity)"),
                    (set_metric(a, b, "fd"), " (fd, lower kept)")):
        diffs.append(d)
        text.append(describe(la, lb, d, what))


def claims(task: Task, out: Path) -> list[Claim]:
    t = task.target
    diff = {m: out / "diffusion" / m for m in DIFFUSION}
    flow = lambda m, b=RBF_BUDGET: out / "flow" / f"{m}_nfe{b}"  # noqa: E731
    rows = []

    # SVDD, Table 2: BoN < DPS < SMC < SVDD-MC < SVDD-PM
    d, text = chain(diff, ["best_of_n", "dps", "smc", "svdd_mc", "svdd_pm"], t)
    rows.append(Claim("SVDD Table 2: BoN < DPS < SMC < SVDD-MC < SVDD-PM (target mean; NFE 400, 50, 400, 50, 393)",
                      task.name, text, verdict(d)))

    # DAS against over-optimisation
    ds, text = [], []
    for other in ("tds", "svdd_pm"):
        kept(diff["das"], diff[other], "das", other, t, ds, text)
    rows.append(Claim("DAS: TDS (no tempering) and SVDD-PM (argmax) lose cross-reward, diversity and fd where DAS "
                      "keeps them (400 / 400 / 393 NFE)", task.name, text, verdict(ds)))
    if task.pressure_alpha is not None:  # the same comparison at another alpha: what the pressure does
        a, b = (out / "diffusion" / f"{m}_alpha{task.pressure_alpha:g}" for m in ("das", "tds"))
        ds, text = [], []
        kept(a, b, "das", "tds", t, ds, text)
        rows.append(Claim(f"DAS against TDS at alpha = {task.pressure_alpha:g} (diagnostic: 20 times the pressure)",
                          task.name, text, verdict(ds)))

    # test-time samplers against fine-tuning at equal target
    from tsf.commands.overopt import DOMAINS

    ds, text = [], []
    points = [p for p in sorted((out / "overopt").glob("*_K*")) if not p.name.startswith("base_")]
    for m in DOMAINS[task.overopt][1]:
        f = out / "overopt_adapters" / m
        reach = [p for p in points if paired(p, f, t).resolved >= 0]  # at least the fine-tuned model's target
        if reach:  # the sampler of highest cross among them: does it keep more cross-reward?
            s = max(reach, key=lambda p: samples(p)["rewards"][CROSS].mean())
            label = s.name.split("_K")[0]
            d = paired(s, f, CROSS)
            ds.append(d)
            text += [describe(label, m, paired(s, f, t), " (target)", judged=False), describe(label, m, d, " (cross)")]
            continue
        # every sampler stays below the fine-tuned model's target: it fails only if the fine-tuned model
        # loses no cross-reward against the highest-target sampler (it then dominates), else unresolved
        s = max(points, key=lambda p: samples(p)["rewards"][t].mean())
        label = s.name.split("_K")[0]
        d = paired(s, f, CROSS)
        ds.append(0 if d.resolved > 0 else -1)
        text += [f"no sampler reaches {m}'s target; the highest-target one:",
                 describe(label, m, paired(s, f, t), " (target)", judged=False), describe(label, m, d, " (cross)"),
                 describe(label, m, set_metric(s, f, "diversity"), " (diversity)"),
                 describe(label, m, set_metric(s, f, "fd"), " (fd, lower kept)")]
    rows.append(Claim("Samplers against DRaFT / DDPO at equal target: the samplers keep cross-reward (the sampler "
                      "of highest cross among those whose target is not below the fine-tuned model's; where none "
                      "reaches it, the claim fails if the fine-tuned model loses no cross-reward to the "
                      "highest-target sampler)", task.name, text, verdict(ds)))

    # RBF's table at 500 NFE (Linear-SDE) and SDE > ODE for BoN
    runs = {m: flow(m) for m in FLOW}
    d, text = chain(runs, ["sde_bon", "smc_linear", "code", "svdd_linear", "rbf_linear"], t)
    rows.append(Claim("RBF Table 1 at 500 NFE (Linear-SDE): BoN < SMC < CoDe < SVDD < RBF", task.name, text, verdict(d)))
    d = paired(runs["sde_bon"], runs["ode_bon"], t)
    rows.append(Claim("RBF: Best-of-N on the SDE beats Best-of-N on the ODE (500 NFE)", task.name,
                      [describe("sde_bon", "ode_bon", d)], verdict([d])))

    # RBF: VP-SDE against Linear-SDE, at T = 10 and, to separate the step count, T = 20 and 50
    d = paired(runs["rbf_vp"], runs["rbf_linear"], t)
    rows.append(Claim("RBF: the VP-SDE beats the Linear-SDE (500 NFE, T = 10)", task.name,
                      [describe("rbf_vp", "rbf_linear", d)], verdict([d])))
    at = lambda m, steps: out / "flow" / f"{m}_T{steps}_nfe{RBF_BUDGET}"  # noqa: E731
    for steps in RBF_STEPS:
        d = paired(at("rbf_vp", steps), at("rbf_linear", steps), t)
        rows.append(Claim(f"RBF: the VP-SDE beats the Linear-SDE at T = {steps} (500 NFE; diagnostic)", task.name,
                          [describe("rbf_vp", "rbf_linear", d)], verdict([d])))
    ds, text = [], []
    for steps in RBF_STEPS:
        d = paired(at("rbf_linear", steps), at("svdd_linear", steps), t)
        ds.append(d)
        text.append(describe(f"rbf_linear@T{steps}", "svdd_linear", d))
    rows.append(Claim("RBF beats SVDD on the Linear-SDE at T = 20 and 50 (500 NFE; diagnostic: the step count)",
                      task.name, text, verdict(ds)))
    text, ds = [], []
    for k in ("linear", "vp"):
        d = paired(out / "flow" / f"rbf_{k}_pb1_nfe{RBF_BUDGET}", runs[f"rbf_{k}"], t)
        ds.append(d)
        text.append(describe(f"rbf_{k} batch 1", "batch 4", d))
    rows.append(Claim("RBF: proposal_batch 1 (the reference) beats 4 at 500 NFE (diagnostic)", task.name, text,
                      verdict(ds)))

    # FK with max against BoN
    d = paired(diff["fk"], diff["best_of_n"], t)
    rows.append(Claim("FK steering (max potential) beats Best-of-N at equal NFE (400)", task.name,
                      [describe("fk", "best_of_n", d)], verdict([d])))

    # Ma et al.: random search scales; zero-order beats random search at equal NFE
    budgets = list(task.budgets)
    d, text = chain({b: flow("ode_bon", b) for b in budgets}, budgets, t)
    rows.append(Claim("Ma et al.: random search (ODE Best-of-N) improves with verifier calls, budget to budget "
                      f"({', '.join(map(str, budgets))} NFE)", task.name, text, verdict(d)))
    ds, text = [], []
    for b in budgets:
        d = paired(flow("zo_search", b), flow("ode_bon", b), t)
        ds.append(d)
        text.append(describe(f"zo_search@{b}", "ode_bon", d))
    rows.append(Claim("Ma et al.: zero-order search beats random search at equal NFE", task.name, text, verdict(ds)))
    return rows


def headroom(task: Task, out: Path) -> list[str]:
    """Best-of-64 against Best-of-16 (256 samples), and the best flow method's slope from 500 to 1000 NFE."""
    lines = []
    a, b = (out / "headroom" / f"best_of_n_N{n}" for n in reversed(HEADROOM))
    d = paired(a, b, task.target)
    lines.append(f"{task.name}: Best-of-64 {_fmt(d.a)} vs Best-of-16 {_fmt(d.b)} ({HEADROOM_SAMPLES} samples, T = 50): "
                 f"+{_fmt(d.diff)} ± {_fmt(d.se)} (1 s.e.), {d.diff / d.se:.1f} standard errors")
    if 1000 in task.budgets and 500 in task.budgets:
        best = max(FLOW, key=lambda m: metrics(out / "flow" / f"{m}_nfe1000")["target/mean"])
        d = paired(out / "flow" / f"{best}_nfe1000", out / "flow" / f"{best}_nfe500", task.target)
        lines.append(f"{task.name}: best flow method at 1,000 NFE: {best}, {_fmt(d.b)} at 500 -> {_fmt(d.a)} at 1,000: "
                     f"slope {_fmt(d.diff / 500 * 100)} per 100 NFE ({_fmt(d.diff)} ± {_fmt(d.se)} over the 500 NFE, "
                     f"{d.diff / d.se:.1f} standard errors)")
    return lines


def markdown(rows: list[Claim]) -> str:
    lines = ["| claim | task | measured (mean A vs mean B: A - B ± 95% interval) | verdict |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.claim} | {r.task} | {'<br>'.join(r.measured)} | **{r.verdict}** |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = ToolParser(prog="tsf claims", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["digits", "hard"])
    p.add_argument("--output_dir", type=Path, default=Path("runs/claims"))
    p.add_argument("--skip_runs", action="store_true", help="only read the run directories (no sampling)")
    args = p.parse_args(argv)
    rows, head = [], []
    for name in args.tasks:
        task, out = TASKS[name], args.output_dir / name
        if not args.skip_runs:
            run_all(task, out)
        head += headroom(task, out)
        rows += claims(task, out)
    text = "Headroom:\n\n" + "\n".join(f"- {h}" for h in head) + "\n\n" + markdown(rows) + "\n"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "claims.md").write_text(text)
    print(text)
    print(f"written: {args.output_dir / 'claims.md'}")
