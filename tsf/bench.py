"""``tsf bench``: framework overhead, throughput and memory of the samplers on the embedded digits models.

* ``tsf bench overhead``: wall time of each sampler (the settings of ``configs/digits/*.yaml`` and
  ``configs/digits_flow/rbf_linear.yaml``, K particles) divided by the wall time of the same network
  and reward calls done bare, side by side in the same process. The calls are recorded while the
  sampler runs (forward hooks on the base model's network, a learned value's network and the
  reward: their inputs, and whether they built a graph for a backward) and replayed on the same
  inputs: a forward under ``no_grad``, or a forward and a backward for the gradient ones (network
  output -> reward -> ``autograd.grad`` to the network's input, as the sampler does). Everything
  else the sampler does (kernel algebra, per-sample noise, weights, resampling, chunking, hooks,
  decoding the outputs) is the overhead. Warm-up first, then ``--repeats`` alternating
  measurements of each, medians, their ratio.
* ``tsf bench throughput``: output samples per second against K (at the configs' batch size) and
  against the batch size (outputs per ``sampler.sample`` call, the data module's ``batch_size``).
* ``tsf bench memory``: peak memory of the gradient samplers (DAS) against K at a fixed
  ``grad_batch``, each measurement in a fresh process. On a GPU the peak is
  ``torch.cuda.max_memory_allocated``; on a CPU it is the process's peak resident set (sampled
  every millisecond from ``/proc/self/statm``) above its resident set just before sampling. Side by
  side: the same runs with one gradient chunk for all particles (``grad_batch = samples x K``),
  the memory that chunking saves.

Each prints a markdown table and the machine it ran on, and writes JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# ----------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    """What a benchmark ran on: CPU model and cores, torch threads, the GPU if any."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_line(info: dict) -> str:
    line = (f"machine: {info['cpu']}, {info['cpu_cores_usable']} of {info['cpu_cores']} cores usable, "
            f"{info['torch_threads']} torch threads, torch {info['torch']}, device {info['device']}")
    return line + (f" ({info['gpu']})" if "gpu" in info else "")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# ----------------------------------------------------------------------------- configs
#: the benchmarked samplers: key -> (label, config)
CONFIGS = {
    "best_of_n": ("Best-of-N", "configs/digits/best_of_n.yaml"),
    "svdd_pm": ("SVDD-PM", "configs/digits/svdd_pm.yaml"),
    "svdd_mc": ("SVDD-MC", "configs/digits/svdd_mc.yaml"),
    "smc": ("SMC", "configs/digits/smc.yaml"),
    "tds": ("TDS", "configs/digits/tds.yaml"),
    "fk": ("FK", "configs/digits/fk.yaml"),
    "das": ("DAS", "configs/digits/das.yaml"),
    "dps": ("DPS", "configs/digits/dps.yaml"),
    "rbf_linear": ("RBF (Linear-SDE)", "configs/digits_flow/rbf_linear.yaml"),
}


def config_path(rel: str) -> Path:
    """A config by its path relative to the working directory or, failing that, to the repository."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / rel).is_file():
            return root / rel
    raise FileNotFoundError(f"{rel} not found (run `tsf bench` from the repository root)")


def build(spec: Any) -> Any:
    """Instantiate ``class_path``/``init_args`` dicts (recursively), as LightningCLI does."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, name = spec["class_path"].rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: build(v) for k, v in (spec.get("init_args") or {}).items()})
    if isinstance(spec, dict):
        return {k: build(v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [build(v) for v in spec]
    return spec


_UNTRAINED_VALUE: dict[str, str] = {}


def untrained_value_checkpoint() -> str:
    """A value network of the shape ``configs/digits/value.yaml`` trains, with untrained weights
    (same cost per call): SVDD-MC is timed without training its value first."""
    if "path" not in _UNTRAINED_VALUE:
        import torch

        from tsf.models.digits import NUM_CLASSES, ResidualMLPDenoiser, save_network

        torch.manual_seed(0)
        net = ResidualMLPDenoiser(dim=64, num_classes=NUM_CLASSES, out_dim=1)
        path = Path(tempfile.mkdtemp(prefix="tsf-bench-")) / "value.safetensors"
        save_network(net, path)
        _UNTRAINED_VALUE["path"] = str(path)
    return _UNTRAINED_VALUE["path"]


@dataclass
class Setup:
    key: str
    label: str
    config: str
    model: Any
    reward: Any
    sampler: Any
    conditions: list
    batch_size: int
    notes: list[str] = field(default_factory=list)


def setup(key: str, k: Optional[int], device: str, steps: Optional[int] = None) -> Setup:
    """Model, reward and sampler of a config, with ``num_particles = k`` (where the sampler has particles)."""
    import yaml

    import tsf.rewards  # noqa: F401  (registers the rewards)
    from tsf.rewards import build_reward

    label, rel = CONFIGS[key]
    cfg = yaml.safe_load(config_path(rel).read_text())
    init = cfg["model"]["init_args"]
    base, sampler_spec = dict(init["base"]), json.loads(json.dumps(init["sampler"]))
    notes = []
    if steps is not None:
        base["init_args"] = {**base.get("init_args", {}), "num_steps": steps}
    sargs = sampler_spec.setdefault("init_args", {})
    if k is not None and sampler_spec["class_path"].rsplit(".", 1)[1] != "DPS":
        sargs["num_particles"] = k
    value = sargs.get("value")
    if isinstance(value, dict) and "checkpoint" in value.get("init_args", {}):
        if not Path(value["init_args"]["checkpoint"]).is_file():
            value["init_args"]["checkpoint"] = untrained_value_checkpoint()
            notes.append("untrained value network (no trained checkpoint here; same cost per call)")
    model = build(base).load().to(device)
    reward = build_reward(init["reward"]).load().to(device)
    sampler = build(sampler_spec)  # a learned value's network follows the states' device by itself
    data = cfg["data"]["init_args"]
    return Setup(key, label, rel, model, reward, sampler, list(data["conditions"]), int(data["batch_size"]), notes)


def run_sampler(s: Setup, n: int):
    conds = [s.conditions[i % len(s.conditions)] for i in range(n)]
    return s.sampler.sample(s.model, s.reward, conds, range(n), seed=0)


# ----------------------------------------------------------------------------- recording and replay
@dataclass
class Call:
    kind: str                 # "model" (base network), "value" (learned value network) or "reward"
    args: tuple               # the inputs, detached copies (a reward's conditions as a list)
    grad: bool                # whether the call built a graph (it was followed by a backward)
    padding: int              # rows of the call that were chunk padding (not counted as compute)

    @property
    def rows(self) -> int:
        return self.args[0].shape[0] - self.padding


def _copy(a: Any) -> Any:
    import torch

    if torch.is_tensor(a):
        return a.detach().clone()
    return list(a) if isinstance(a, (list, tuple)) else a


class CallRecorder:
    """Records every call of the base model's network, a learned value's network and the reward."""

    def __init__(self, modules: dict) -> None:
        self.modules = {k: m for k, m in modules.items() if m is not None}
        self.calls: list[Call] = []

    def _hook(self, kind: str) -> Callable:
        import torch

        from tsf.samplers.base import _PADDING

        def hook(module, args, kwargs, output):
            args = tuple(args) + tuple(kwargs.values())
            grad = torch.is_tensor(output) and output.requires_grad
            self.calls.append(Call(kind, tuple(_copy(a) for a in args), grad, _PADDING.get()))

        return hook

    def __enter__(self) -> "CallRecorder":
        self._handles = [m.register_forward_hook(self._hook(k), with_kwargs=True) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


def network_modules(s: Setup) -> dict:
    value_net = getattr(getattr(s.sampler, "value_fn", None), "net", None)
    return {"model": s.model.net, "value": value_net, "reward": s.reward}


def count(calls: list[Call]) -> dict:
    """Rows per kind as the sampler's compute counters count them (padding excluded)."""
    out = {"nfe": 0, "nfe_grad": 0, "value_calls": 0, "reward_calls": 0, "reward_grad_calls": 0}
    for c in calls:
        if c.kind == "model":
            out["nfe"] += c.rows
            out["nfe_grad"] += c.rows if c.grad else 0
        elif c.kind == "value":
            out["value_calls"] += c.rows
        else:
            out["reward_calls"] += c.rows
            out["reward_grad_calls"] += c.rows if c.grad else 0
    return out


def replay(calls: list[Call], modules: dict) -> dict:
    """The recorded calls, bare: network forwards (and, for gradient calls, network -> reward ->
    backward to the network's input) on the recorded inputs. Returns the rows replayed per kind."""
    import torch

    done: list[Call] = []
    pending = None  # (leaf input, output) of the last gradient network call, awaiting its reward

    def backward(leaf, out):
        torch.autograd.grad(out.sum(), leaf, allow_unused=True)

    for c in calls:
        fn = modules[c.kind]
        if c.kind != "reward":
            if not c.grad:
                with torch.no_grad():
                    fn(*c.args)
            else:
                if pending is not None:
                    backward(*pending)
                with torch.enable_grad():
                    leaf = c.args[0].detach().requires_grad_(True)
                    pending = (leaf, fn(leaf, *c.args[1:]))
        elif not c.grad:
            with torch.no_grad():
                fn(*c.args)
        else:
            with torch.enable_grad():
                if pending is not None and pending[1].numel() == c.args[0].numel():
                    leaf, images = pending[0], pending[1].reshape(c.args[0].shape)
                else:
                    if pending is not None:
                        backward(*pending)
                    leaf = images = c.args[0].detach().requires_grad_(True)
                backward(leaf, fn(images, *c.args[1:]))
            pending = None
        done.append(c)
    if pending is not None:
        backward(*pending)
    return count(done)


def timed(fn: Callable[[], Any], calls: int, device: str) -> float:
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


# ----------------------------------------------------------------------------- overhead
def overhead_one(s: Setup, n: int, repeats: int, min_seconds: float, device: str) -> dict:
    modules = network_modules(s)
    with CallRecorder(modules) as rec:
        out = run_sampler(s, n)  # also the first warm-up
    compute = {k: float(v) for k, v in out.compute.items()}
    replayed = replay(rec.calls, modules)  # warm-up of the replay
    run_s = timed(lambda: run_sampler(s, n), 1, device)
    timed(lambda: replay(rec.calls, modules), 1, device)
    per = max(1, math.ceil(min_seconds / max(run_s, 1e-6)))  # sample() calls per measurement
    t_sampler, t_replay = [], []
    for r in range(repeats):
        order = [("s", t_sampler), ("r", t_replay)]
        for what, dest in (order if r % 2 == 0 else order[::-1]):  # alternate which goes first
            fn = (lambda: run_sampler(s, n)) if what == "s" else (lambda: replay(rec.calls, modules))
            dest.append(timed(fn, per, device))
        progress(f"  repeat {r + 1}/{repeats}: sampler {t_sampler[-1]:.3f} s, bare calls {t_replay[-1]:.3f} s")
    ms, mr = statistics.median(t_sampler), statistics.median(t_replay)
    return {
        "sampler": s.label, "key": s.key, "config": s.config, "model": type(s.model).__name__,
        "num_steps": s.model.num_steps, "sampler_repr": repr(s.sampler), "samples": n,
        "K": getattr(s.sampler, "num_particles", 1), "calls_per_measurement": per, "repeats": repeats,
        "sampler_seconds": ms, "replay_seconds": mr, "ratio": ms / mr,
        "sampler_times": t_sampler, "replay_times": t_replay,
        "compute": compute, "replay_compute": replayed,
        "recorded_calls": {k: sum(c.kind == k for c in rec.calls) for k in ("model", "value", "reward")},
        "notes": s.notes,
    }


def overhead(args) -> dict:
    device = args.device or default_device()
    info = machine(device)
    progress(machine_line(info))
    rows = []
    for j, key in enumerate(args.samplers):
        progress(f"[{j + 1}/{len(args.samplers)}] {CONFIGS[key][0]}: {CONFIGS[key][1]}, K = {args.k}")
        s = setup(key, args.k, device, args.steps)
        n = args.samples or s.batch_size
        row = overhead_one(s, n, args.repeats, args.min_seconds, device)
        progress(f"  ratio {row['ratio']:.3f}")
        rows.append(row)
    print(f"\nFramework overhead, K = {args.k}: wall time of the sampler / the same model and reward calls done bare")
    print(machine_line(info))
    print("\n| sampler | model, T | samples | NFE | NFE grad | reward calls | network calls | sampler s | "
          "bare calls s | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, calls = r["compute"], r["recorded_calls"]
        net = f"{calls['model']}" + (f" + {calls['value']} value" if calls["value"] else "")
        print(f"| {r['sampler']} | {r['model']}, {r['num_steps']} | {r['samples']} | {c['nfe']:.0f} | "
              f"{c['nfe_grad']:.0f} | {c['reward_calls']:.0f} | {net} | {r['sampler_seconds']:.3f} | "
              f"{r['replay_seconds']:.3f} | {r['ratio']:.3f} |")
    for r in rows:
        for note in r["notes"]:
            print(f"\n{r['sampler']}: {note}")
    return {"benchmark": "overhead", "machine": info,
            "settings": {"K": args.k, "samples": args.samples, "steps": args.steps, "repeats": args.repeats,
                         "min_seconds": args.min_seconds},
            "rows": rows}


# ----------------------------------------------------------------------------- throughput
def throughput_one(s: Setup, n: int, min_seconds: float, device: str) -> dict:
    out = run_sampler(s, n)  # warm-up
    first = timed(lambda: run_sampler(s, n), 1, device)
    per = max(1, math.ceil(min_seconds / max(first, 1e-6)))
    secs = timed(lambda: run_sampler(s, n), per, device) if per > 1 or min_seconds > first else first
    return {"sampler": s.label, "key": s.key, "K": getattr(s.sampler, "num_particles", 1), "batch_size": n,
            "seconds_per_call": secs, "calls": per, "samples_per_second": n / secs,
            "nfe_per_second": out.compute["nfe"] / secs, "nfe_per_sample": out.compute["nfe"] / n}


def throughput(args) -> dict:
    device = args.device or default_device()
    info = machine(device)
    progress(machine_line(info))
    vs_k, vs_batch = [], []
    for key in args.samplers:
        for k in args.ks:
            s = setup(key, k, device, args.steps)
            n = args.batch or s.batch_size
            progress(f"{s.label}: K = {k}, batch {n}")
            vs_k.append(throughput_one(s, n, args.min_seconds, device))
        for b in args.batch_sizes:
            s = setup(key, args.k, device, args.steps)
            progress(f"{s.label}: K = {args.k}, batch {b}")
            vs_batch.append(throughput_one(s, b, args.min_seconds, device))
    print("\nThroughput (output samples per second; NFE per second in brackets)")
    print(machine_line(info))
    for title, rows, col, values in (("against K", vs_k, "K", args.ks),
                                     ("against the batch size", vs_batch, "batch_size", args.batch_sizes)):
        fixed = (f"batch {args.batch or 'of the config'}" if col == "K" else f"K = {args.k}")
        print(f"\n{title} ({fixed})\n")
        print("| sampler | " + " | ".join(f"{col.replace('_', ' ')} {v}" for v in values) + " |")
        print("|---|" + "---|" * len(values))
        for key in args.samplers:
            cells = [r for r in rows if r["key"] == key]
            label = cells[0]["sampler"]
            print(f"| {label} | " + " | ".join(f"{r['samples_per_second']:.1f} ({r['nfe_per_second']:.3g})"
                                                 for r in cells) + " |")
    return {"benchmark": "throughput", "machine": info,
            "settings": {"samplers": args.samplers, "ks": args.ks, "batch_sizes": args.batch_sizes, "K": args.k,
                         "batch": args.batch, "steps": args.steps, "min_seconds": args.min_seconds},
            "vs_k": vs_k, "vs_batch_size": vs_batch}


# ----------------------------------------------------------------------------- memory
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


def memory(args) -> dict:
    device = args.device or default_device()
    info = machine(device)
    what = "torch.cuda.max_memory_allocated" if device == "cuda" else "peak RSS above the RSS before sampling"
    print(f"DAS on digits, {args.samples} samples, T = {args.steps}, device {device}; peak memory = {what}")
    print(machine_line(info))
    print("| K | particle rows | grad_batch | peak MB (chunked) | peak MB (one chunk) | ratio | s (chunked) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for k in args.ks:
        progress(f"memory: K = {k}")
        rows_k = args.samples * k
        chunked = measure(k, args.grad_batch, args.samples, args.steps, device)
        whole = measure(k, rows_k, args.samples, args.steps, device)
        rows.append({"K": k, "grad_batch": args.grad_batch, "chunked": chunked, "one_chunk": whole})
        print(f"| {k} | {rows_k} | {args.grad_batch} | {chunked['peak_mb']:.1f} | {whole['peak_mb']:.1f} | "
              f"{whole['peak_mb'] / max(chunked['peak_mb'], 1e-9):.1f} | {chunked['seconds']:.1f} |", flush=True)
    return {"benchmark": "memory", "device": device, "machine": info, "rows": rows}


# ----------------------------------------------------------------------------- command line
def run(argv=None) -> dict:
    """Run one benchmark (the command-line arguments of ``tsf bench``) and return its results."""
    p = argparse.ArgumentParser(prog="tsf bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)

    def common(q, json_help="also write the results to this file"):
        q.add_argument("--device", default=None, help="cuda if available, else cpu")
        q.add_argument("--json", default=None, help=json_help)

    o = sub.add_parser("overhead", help="sampler wall time / the same model and reward calls done bare")
    o.add_argument("--samplers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    o.add_argument("--k", type=int, default=8, help="particles K (DPS has none)")
    o.add_argument("--samples", type=int, default=None, help="outputs per sample() call (default: the config's "
                                                             "batch_size, 100)")
    o.add_argument("--steps", type=int, default=None, help="override the configs' num_steps")
    o.add_argument("--repeats", type=int, default=5, help="measurements of each (medians)")
    o.add_argument("--min-seconds", type=float, default=1.0,
                   help="each measurement repeats sample() until it lasts about this long")
    common(o)

    t = sub.add_parser("throughput", help="samples per second against K and against the batch size")
    t.add_argument("--samplers", nargs="+", default=["best_of_n", "smc", "das"], choices=list(CONFIGS))
    t.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    t.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 25, 50, 100, 200, 400])
    t.add_argument("--k", type=int, default=8, help="K of the batch-size sweep")
    t.add_argument("--batch", type=int, default=None, help="batch of the K sweep (default: the config's, 100)")
    t.add_argument("--steps", type=int, default=None, help="override the configs' num_steps")
    t.add_argument("--min-seconds", type=float, default=1.0)
    common(t)

    m = sub.add_parser("memory", help="peak memory of DAS against K at a fixed grad_batch")
    m.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    m.add_argument("--grad-batch", type=int, default=64)
    m.add_argument("--samples", type=int, default=64)
    m.add_argument("--steps", type=int, default=10)
    common(m, "also write the rows to this file")

    args = p.parse_args(argv)
    result = {"overhead": overhead, "throughput": throughput, "memory": memory}[args.what](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None) -> None:
    run(argv)
