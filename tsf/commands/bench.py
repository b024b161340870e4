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
  measurements of each, back to back; the ratio is the median of the repeats' paired ratios (which a drift of
  the machine's speed between repeats leaves alone), beside the ratio of the two medians. ``--stub`` also times
  each sampler with near-free stand-ins for its networks and reward (the mean of each row's input, broadcast to
  the recorded output shape): its overhead alone, ``1 + that / the bare calls`` beside the ratio.
* ``tsf bench throughput``: output samples per second against K (at the configs' batch size) and
  against the batch size (outputs per ``sampler.sample`` call, the data module's ``batch_size``), timed by
  ``torch.utils.benchmark.Timer.blocked_autorange`` (the overhead's alternation keeps its own loop: ``timed``).
* ``tsf bench memory``: peak memory of the gradient samplers (DAS) against K at a fixed
  ``grad_batch``, each measurement in a fresh process. On a GPU the peak is
  ``torch.cuda.max_memory_allocated``; on a CPU it is the process's peak resident set (sampled
  every millisecond from ``/proc/self/statm``) above its resident set just before sampling. Side by
  side: the same runs with one gradient chunk for all particles (``grad_batch = samples x K``),
  the memory that chunking saves.
* ``tsf bench pipeline``: seconds per image of tsf's sampler on a diffusers Stable Diffusion 1.x / 2.x
  folder (or hub name), any reward and any sampler config, and with ``--diffusers``, of diffusers'
  own ``StableDiffusionPipeline.__call__`` (DDIM, the same steps, eta and guidance) side by side in
  the same process, alternating which goes first. The work really done is counted by hooks of its
  own (UNet forwards and their rows, CFG doubling included, and the rows that built a graph; VAE
  decode rows; reward rows), beside tsf's own ``SampleBatch.compute``; peak RSS of the timed runs
  (``VmHWM``, reset through ``/proc/self/clear_refs``) and the mean reward of the images. ``--sampler_args``
  given several times times several variants of the sampler side by side on the same seeds (their rewards are
  paired: e.g. DAS with ``gradient_through`` network and tweedie).

* ``tsf bench cli``: seconds until the ``tsf`` command answers (``--version``, ``--help``, a tool's ``--help``, a
  config error found before parsing, and for contrast ``tsf sample --help``, which builds the LightningCLI
  parser), each a fresh ``python -m tsf`` process, medians of ``--repeats``; and whether the answer imported
  torch or Lightning (it should not: only the LightningCLI subcommands do).

* ``tsf bench gpu`` (``bench_gpu.py``): seconds per image, peak CUDA memory and UNet / transformer rows of
  SD 1.5, SDXL, SD3 and FLUX at their real sizes with random weights, for the base sampler, Best-of-4,
  SVDD-PM, DAS (through the network and through the Tweedie estimate) and a DRaFT step (``--tiny``: tiny shapes,
  on a CPU).
* ``tsf bench flops`` (``bench_flops.py``): FLOPs per row of SD 1.5's and SDXL's UNet, VAE decoder and aesthetic
  reward, counted on the meta device, and the cost per particle-step of a gradient proposal through the network
  and through the Tweedie estimate.

Each prints a markdown table and the machine it ran on, and writes JSON with ``--json PATH`` (its ``machine``
holds ``torch.utils.collect_env``'s description too).
"""

from __future__ import annotations

import contextlib
import functools
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

from tsf.commands import ToolParser

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


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    """``torch.utils.collect_env``'s description of the machine (what PyTorch's bug reports carry): the versions
    of torch, CUDA, cuDNN, Python and the OS, the GPU models and driver, the CPU as ``lscpu`` gives it, the
    relevant pip packages."""
    from torch.utils.collect_env import get_env_info

    return {k: v for k, v in get_env_info()._asdict().items() if v is not None}


def machine(device: str) -> dict:
    """What a benchmark ran on: :func:`environment` (``torch.utils.collect_env``), and what it does not say
    but a timing depends on: the cores this process may use (its affinity), torch's threads, the device and
    its GPU; the CPU model and the versions again in one line (:func:`machine_line`)."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "device": device,
            "environment": environment()}
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
    "das_tweedie": ("DAS, gradient through Tweedie", "configs/digits/das_tweedie.yaml"),
    "dps": ("DPS", "configs/digits/dps.yaml"),
    "rbf_linear": ("RBF (Linear-SDE)", "configs/digits_flow/rbf_linear.yaml"),
}


def config_path(rel: str) -> Path:
    """A config by its path relative to the working directory or, failing that, to the repository."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / rel).is_file():
            return root / rel
    raise FileNotFoundError(f"{rel} not found (run `tsf bench` from the repository root)")


def _import(path: str) -> Any:
    from tsf.errors import ConfigError

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"cannot import {path!r} ({type(e).__name__}: {e})") from e


def build(spec: Any) -> Any:
    """Instantiate ``class_path``/``init_args`` dicts (recursively), as LightningCLI does."""
    if isinstance(spec, dict) and "class_path" in spec:
        cls = _import(spec["class_path"])
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
        self.output_shapes: dict[str, tuple] = {}  # per kind: an output's shape after the batch dimension

    def _hook(self, kind: str) -> Callable:
        import torch

        from tsf.samplers.base import _PADDING

        def hook(module, args, kwargs, output):
            args = tuple(args) + tuple(kwargs.values())
            grad = torch.is_tensor(output) and output.requires_grad
            self.calls.append(Call(kind, tuple(_copy(a) for a in args), grad, _PADDING.get()))
            if torch.is_tensor(output):
                self.output_shapes[kind] = tuple(output.shape[1:])

        return hook

    def __enter__(self) -> "CallRecorder":
        self._handles = [m.register_forward_hook(self._hook(k), with_kwargs=True) for k, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


@contextlib.contextmanager
def stubbed(modules: dict, output_shapes: dict):
    """Every recorded module's forward replaced by a near-free stand-in of the same output shape: the mean of its
    first input per row, broadcast (differentiable, so that gradient samplers run as they do). What a sampler then
    spends is its overhead alone (its behaviour changes with the stand-in values: resampling, RBF's acceptances)."""
    def stand_in(trail: tuple) -> Callable:
        def forward(x, *args, **kwargs):
            y = (x if x.is_floating_point() else x.float()).flatten(1).mean(1)
            return y.view(-1, *([1] * len(trail))).expand(-1, *trail).contiguous()
        return forward

    patched = [m for k, m in modules.items() if m is not None and k in output_shapes]
    for k in output_shapes:
        if modules.get(k) is not None:
            modules[k].forward = stand_in(output_shapes[k])
    try:
        yield
    finally:
        for m in patched:
            del m.forward


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
    """Seconds per call of ``calls`` calls. The overhead benchmark alternates two of these measurements with a
    fixed number of calls each, so it cannot use ``torch.utils.benchmark.Timer``: its ``timeit`` runs a warm-up
    of its own before every measurement (two more sampler runs each) and ``blocked_autorange`` chooses the
    number of calls itself; throughput, which does not alternate, uses the Timer (:func:`throughput_one`)."""
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / calls


# ----------------------------------------------------------------------------- overhead
def overhead_one(s: Setup, n: int, repeats: int, min_seconds: float, device: str, stub: bool = False) -> dict:
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
    # each repeat's sampler and bare measurement ran back to back, so a drift of the machine's speed (seen here: the
    # bare calls 30% apart between two invocations) moves both: the median of the paired ratios is the estimate
    paired = [a / b for a, b in zip(t_sampler, t_replay)]
    direct = {}
    if stub:  # the overhead itself: the sampler with near-free stand-ins for its networks and reward
        with stubbed(modules, rec.output_shapes):
            run_sampler(s, n)
            t_stub = [timed(lambda: run_sampler(s, n), 1, device) for _ in range(repeats)]
        direct = {"stub_seconds": statistics.median(t_stub), "stub_times": t_stub,
                  "direct_ratio": 1 + statistics.median(t_stub) / mr}
        progress(f"  overhead alone (stand-ins for the networks): {direct['stub_seconds'] * 1e3:.1f} ms, "
                 f"{direct['direct_ratio']:.3f} against the bare calls")
    return {
        "sampler": s.label, "key": s.key, "config": s.config, "model": type(s.model).__name__,
        "num_steps": s.model.num_steps, "sampler_repr": repr(s.sampler), "samples": n,
        "K": getattr(s.sampler, "num_particles", 1), "calls_per_measurement": per, "repeats": repeats,
        "sampler_seconds": ms, "replay_seconds": mr, "ratio": statistics.median(paired),
        "ratio_of_medians": ms / mr, "paired_ratios": paired,
        "sampler_times": t_sampler, "replay_times": t_replay,
        "compute": compute, "replay_compute": replayed,
        "recorded_calls": {k: sum(c.kind == k for c in rec.calls) for k in ("model", "value", "reward")},
        "notes": s.notes, **direct,
    }


def steady_allocator() -> bool:
    """Let glibc keep freed memory for reuse (mmap threshold 256 MiB, trim threshold 1 GiB), for the
    whole process: otherwise each tensor above its dynamic mmap threshold is mapped and unmapped anew,
    page faults included, and how often that happens varies from one process to the next (the bare calls
    alone varied by 15% between invocations). Both sides of a comparison then run under the same
    allocator. Returns whether the setting took (glibc only)."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 256 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def overhead(args) -> dict:
    device = args.device or default_device()
    info = machine(device)
    info["allocator"] = ("glibc, freed memory kept for reuse (both sides)"
                         if not args.default_allocator and steady_allocator() else "default")
    progress(machine_line(info) + f", allocator: {info['allocator']}")
    rows = []
    for j, key in enumerate(args.samplers):
        progress(f"[{j + 1}/{len(args.samplers)}] {CONFIGS[key][0]}: {CONFIGS[key][1]}, K = {args.k}")
        s = setup(key, args.k, device, args.steps)
        n = args.samples or s.batch_size
        row = overhead_one(s, n, args.repeats, args.min_seconds, device, stub=args.stub)
        progress(f"  ratio {row['ratio']:.3f}")
        rows.append(row)
    print(f"\nFramework overhead, K = {args.k}: wall time of the sampler / the same model and reward calls done bare")
    print(machine_line(info) + f", allocator: {info['allocator']}")
    extra = " overhead alone s | 1 + overhead / bare |" if args.stub else ""
    print("\n| sampler | model, T | samples | NFE | NFE grad | reward calls | network calls | sampler s | "
          "bare calls s | ratio (paired median) | ratio of medians |" + extra)
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if args.stub else ""))
    for r in rows:
        c, calls = r["compute"], r["recorded_calls"]
        net = f"{calls['model']}" + (f" + {calls['value']} value" if calls["value"] else "")
        direct = f" {r['stub_seconds']:.4f} | {r['direct_ratio']:.3f} |" if args.stub else ""
        print(f"| {r['sampler']} | {r['model']}, {r['num_steps']} | {r['samples']} | {c['nfe']:.0f} | "
              f"{c['nfe_grad']:.0f} | {c['reward_calls']:.0f} | {net} | {r['sampler_seconds']:.3f} | "
              f"{r['replay_seconds']:.3f} | {r['ratio']:.3f} | {r['ratio_of_medians']:.3f} |" + direct)
    for r in rows:
        for note in r["notes"]:
            print(f"\n{r['sampler']}: {note}")
    return {"benchmark": "overhead", "machine": info,
            "settings": {"K": args.k, "samples": args.samples, "steps": args.steps, "repeats": args.repeats,
                         "min_seconds": args.min_seconds},
            "rows": rows}


# ----------------------------------------------------------------------------- throughput
def throughput_one(s: Setup, n: int, min_seconds: float, device: str) -> dict:
    """Samples per second of one setting: ``torch.utils.benchmark.Timer.blocked_autorange`` (blocks of calls
    for at least ``min_seconds``, the median per call; it synchronises the accelerator), at torch's thread
    count (the Timer's default is one thread)."""
    import torch
    from torch.utils.benchmark import Timer

    out = run_sampler(s, n)  # warm-up
    gc.collect()
    m = Timer("run()", globals={"run": lambda: run_sampler(s, n)},
              num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=min_seconds)
    secs = m.median
    return {"sampler": s.label, "key": s.key, "K": getattr(s.sampler, "num_particles", 1), "batch_size": n,
            "seconds_per_call": secs, "calls": m.number_per_run * len(m.raw_times), "samples_per_second": n / secs,
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


# ----------------------------------------------------------------------------- pipeline
PIPELINE_PROMPTS = ("a photo of a cat", "a painting of a horse")


def _json_args(text: str, flag: str) -> dict:
    from tsf.errors import ConfigError

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} must be a JSON object, got {text!r} ({e})") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}")
    return value


def pipeline_reward(spec: str, init_args: Optional[dict] = None):
    """A registered reward name, or the class_path of a :class:`tsf.rewards.Reward` subclass, with ``init_args``."""
    import tsf.rewards  # noqa: F401  (registers the rewards)
    from tsf.errors import ConfigError
    from tsf.rewards import REWARDS, Reward, build_reward

    init_args = {k: build(v) for k, v in (init_args or {}).items()}
    if spec in REWARDS:
        return build_reward(REWARDS.build(spec, **init_args))
    if "." not in spec:
        REWARDS.check(spec)  # an unknown name: the error lists the known ones
    cls = _import(spec)
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ConfigError(f"--reward {spec!r} is not a tsf.rewards.Reward subclass")
    return build_reward(cls(**init_args))


def pipeline_sampler(spec: str, init_args: Optional[dict] = None):
    """A sampler from a YAML config (its ``model.init_args.sampler``), a class_path or a registered
    name, its init args updated with ``init_args``."""
    import yaml

    import tsf.samplers  # noqa: F401  (registers the samplers)
    from tsf.errors import ConfigError
    from tsf.samplers import SAMPLERS, Sampler

    if spec.endswith((".yaml", ".yml")) or Path(spec).is_file():
        cfg = yaml.safe_load(config_path(spec).read_text())
        try:
            sampler_spec = cfg["model"]["init_args"]["sampler"]
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{spec} has no model.init_args.sampler") from e
    else:
        sampler_spec = spec
    if isinstance(sampler_spec, str):
        sampler_spec = {"class_path": sampler_spec}
    path, base_args = sampler_spec["class_path"], dict(sampler_spec.get("init_args") or {})
    cls = _import(path) if "." in path else SAMPLERS.get(path)
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise ConfigError(f"--sampler {spec!r} is not a tsf.samplers.Sampler subclass")
    return cls(**{k: build(v) for k, v in {**base_args, **(init_args or {})}.items()})


def find_unet(net: Any) -> Any:
    """The ``UNet2DConditionModel`` inside ``net`` (itself, or under a peft wrapper); else ``net``."""
    from diffusers import UNet2DConditionModel

    for m in net.modules():
        if isinstance(m, UNet2DConditionModel):
            return m
    return net


def _first_tensor(x: Any) -> Any:
    import torch

    if torch.is_tensor(x):
        return x
    if hasattr(x, "sample") and torch.is_tensor(x.sample):  # diffusers' UNet / decoder outputs
        return x.sample
    if isinstance(x, (tuple, list)) and x:
        return _first_tensor(x[0])
    return None


class WorkCounter:
    """The work really done, by its own hooks (a cross-check of tsf's ComputeCounter): UNet forward
    calls, their rows (the batch of the sample input: classifier-free guidance doubles them) and the
    rows whose output requires grad; VAE decode calls and rows (a wrapper of ``vae.decode``, restored
    on exit); reward forward calls, rows and gradient rows."""

    KEYS = ("unet_calls", "unet_rows", "unet_grad_rows", "decode_calls", "decode_rows", "reward_calls",
            "reward_rows", "reward_grad_rows")

    def __init__(self, unet: Any, vae: Any, reward: Any = None) -> None:
        self.unet, self.vae, self.reward = unet, vae, reward
        self.counts = dict.fromkeys(self.KEYS, 0)

    def _hook(self, prefix: str, input_name: str) -> Callable:
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get(input_name, kwargs.get("hidden_states"))  # (SD3's, FLUX's name)
            rows = int(x.shape[0]) if hasattr(x, "shape") else len(x)
            out = _first_tensor(output)
            self.counts[f"{prefix}_calls"] += 1
            self.counts[f"{prefix}_rows"] += rows
            self.counts[f"{prefix}_grad_rows"] += rows if out is not None and out.requires_grad else 0

        return hook

    def _add_decoded(self, z: Any) -> None:
        self.counts["decode_calls"] += 1
        self.counts["decode_rows"] += int(z.shape[0])

    def __enter__(self) -> "WorkCounter":
        from tsf.samplers.base import counting_calls

        self._stack = contextlib.ExitStack()
        handles = [self.unet.register_forward_hook(self._hook("unet", "sample"), with_kwargs=True)]
        if self.reward is not None:
            handles.append(self.reward.register_forward_hook(self._hook("reward", "images"), with_kwargs=True))
        for h in handles:
            self._stack.callback(h.remove)
        self._stack.enter_context(counting_calls(self.vae, "decode", self._add_decoded))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def _proc_status_mb(key: str) -> Optional[float]:
    """``VmHWM`` / ``VmRSS`` of this process in MB, or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (``5`` to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Implementation:
    """One side of ``tsf bench pipeline``: ``call(sample_ids) -> (images, rewards or None, compute or None)``."""

    name: str
    call: Callable[[list], tuple]
    counter: WorkCounter
    rss_after_load_mb: Optional[float] = None
    times: list = field(default_factory=list)            # seconds per image, one per timed run
    compute: dict = field(default_factory=dict)          # tsf's own counters, summed over the timed runs
    rewards: list = field(default_factory=list)          # reward of every image of the timed runs
    peak_rss_mb: list = field(default_factory=list)      # VmHWM after each timed run (None: not measurable)
    peak_cuda_mb: list = field(default_factory=list)


def measure_pipeline(impl: Implementation, ids: list, prompts: list, reward: Any, device: str,
                     timed: bool) -> None:
    """One run of ``impl`` on ``prompts`` (sample ids ``ids``); a timed one is counted and recorded."""
    import torch

    gc.collect()
    sync(device)
    reset = timed and reset_peak_rss()
    if timed and device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    with (impl.counter if timed else contextlib.nullcontext()):
        sync(device)
        t0 = time.perf_counter()
        images, rewards, compute = impl.call(ids)
        sync(device)
        seconds = time.perf_counter() - t0
    if not timed:
        return
    impl.times.append(seconds / len(prompts))
    impl.peak_rss_mb.append(_proc_status_mb("VmHWM") if reset else None)
    if device.startswith("cuda"):
        impl.peak_cuda_mb.append(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20)
    for k, v in (compute or {}).items():
        impl.compute[k] = impl.compute.get(k, 0.0) + float(v)
    if rewards is None:  # scored here, outside the counters and the clock
        with torch.no_grad():
            rewards = reward(images, prompts)
    impl.rewards.extend(float(v) for v in rewards.detach().float().cpu().reshape(-1))


def _opt_max(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def pipeline_row(impl: Implementation, n: int, runs: int) -> dict:
    images = n * runs
    return {
        "implementation": impl.name,
        "seconds_per_image": statistics.median(impl.times),
        "seconds_per_image_min": min(impl.times), "seconds_per_image_max": max(impl.times),
        "seconds_per_image_runs": impl.times,
        "counts_per_image": {k: v / images for k, v in impl.counter.counts.items()},
        "counts_total": dict(impl.counter.counts),
        "compute_per_image": {k: v / images for k, v in impl.compute.items()} if impl.compute else None,
        "rss_after_load_mb": impl.rss_after_load_mb,
        "peak_rss_mb": _opt_max(impl.peak_rss_mb), "peak_rss_mb_runs": impl.peak_rss_mb,
        "peak_cuda_mb": _opt_max(impl.peak_cuda_mb),
        "reward_mean": statistics.fmean(impl.rewards) if impl.rewards else None,
        "images": images,
    }


def _num(v: Optional[float], fmt: str = ".4g") -> str:
    return "-" if v is None else format(v, fmt)


def pipeline(args) -> dict:
    import warnings

    import torch

    from tsf.errors import ConfigError
    from tsf.loading import resolve_dtype
    from tsf.models import StableDiffusion
    from tsf.samplers.base import sample_seed

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for flag in ("runs", "steps"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be >= 1")
    if args.warmup < 0:
        raise ConfigError("--warmup must be >= 0")
    device = args.device or default_device()
    info = machine(device)
    progress(machine_line(info))
    prompts, n = list(args.prompts), len(args.prompts)
    reward_args = _json_args(args.reward_args, "--reward_args")
    variants = [_json_args(a, "--sampler_args") for a in (args.sampler_args or ["{}"])]

    progress(f"tsf: loading {args.pretrained}")
    model = StableDiffusion(pretrained=args.pretrained, num_steps=args.steps, eta=args.eta,
                            guidance_scale=args.guidance, dtype=args.dtype).load().to(device)
    reward = pipeline_reward(args.reward, reward_args).load().to(device)
    samplers = [pipeline_sampler(args.sampler, a) for a in variants]
    for sampler in samplers:
        progress(f"tsf: {sampler!r}, reward {type(reward).__name__}")

    def tsf_call(sampler):
        def call(ids):
            out = sampler.sample(model, reward, prompts, ids, seed=args.seed)
            return out.images, out.rewards, out.compute
        return call

    # several --sampler_args: one tsf implementation each, on the same seeds (their rewards are paired)
    names = ["tsf"] if len(variants) == 1 else [f"tsf {json.dumps(a, separators=(',', ':'))}" for a in variants]
    impls = [Implementation(name, tsf_call(sampler), WorkCounter(find_unet(model.net), model.vae, reward),
                            rss_after_load_mb=_proc_status_mb("VmRSS")) for name, sampler in zip(names, samplers)]
    if args.diffusers:
        import diffusers

        from tsf.models.pipelines import _quiet_loading

        progress(f"diffusers: loading {args.pretrained}")
        with warnings.catch_warnings(), _quiet_loading():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                args.pretrained, safety_checker=None, requires_safety_checker=False,
                torch_dtype=resolve_dtype(args.dtype))
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)

        per = args.images_per_prompt

        def diffusers_call(ids):
            gens = [torch.Generator().manual_seed(sample_seed(args.seed, i * per + j)) for i in ids for j in range(per)]
            out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, eta=args.eta,
                       output_type="pt", generator=gens, num_images_per_prompt=per)
            return out.images.float(), None, None

        impls.append(Implementation("diffusers", diffusers_call, WorkCounter(pipe.unet, pipe.vae, reward),
                                    rss_after_load_mb=_proc_status_mb("VmRSS")))

    def ids_of(run: int) -> list:
        return list(range(run * n, (run + 1) * n))

    for w in range(args.warmup):  # sample ids after the timed runs' ones
        for impl in impls:
            progress(f"  warm-up {w + 1}/{args.warmup}: {impl.name}")
            measure_pipeline(impl, ids_of(args.runs + w), prompts, reward, device, timed=False)
    for r in range(args.runs):
        order = impls if r % 2 == 0 else impls[::-1]  # alternate which goes first
        for impl in order:
            measure_pipeline(impl, ids_of(r), prompts, reward, device, timed=True)
        progress(f"  run {r + 1}/{args.runs}: " + ", ".join(f"{i.name} {i.times[-1]:.3f} s/image" for i in impls))
    rows = [pipeline_row(impl, n, args.runs) for impl in impls]
    by_name = {row["implementation"]: row for row in rows}
    ratio = (by_name[names[0]]["seconds_per_image"] / by_name["diffusers"]["seconds_per_image"]
             if "diffusers" in by_name else None)
    first = rows[0]
    for row, impl in zip(rows[1:len(names)], impls[1:len(names)]):  # against the first tsf variant, same seeds
        row["ratio_to_first"] = row["seconds_per_image"] / first["seconds_per_image"]
        diffs = [a - b for a, b in zip(impl.rewards, impls[0].rewards)]
        row["paired_reward_diff"] = statistics.fmean(diffs)
        row["paired_reward_diff_se"] = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None

    print(f"\nPipeline: {args.pretrained}, T = {args.steps}, eta = {args.eta}, guidance {args.guidance}, "
          f"{args.dtype}, {n} prompts, {args.runs} runs after {args.warmup} warm-up; tsf: "
          f"{'; '.join(repr(s) for s in samplers)}, reward {type(reward).__name__}")
    print(machine_line(info))
    print("\n| implementation | s/image (median, min-max) | UNet calls (rows) / image | UNet grad rows / image | "
          "VAE decode rows / image | reward rows / image | peak RSS MB | reward mean |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        c = row["counts_per_image"]
        print(f"| {row['implementation']} | {row['seconds_per_image']:.4g} ({row['seconds_per_image_min']:.4g}-"
              f"{row['seconds_per_image_max']:.4g}) | {c['unet_calls']:.4g} ({c['unet_rows']:.4g}) | "
              f"{c['unet_grad_rows']:.4g} | {c['decode_rows']:.4g} | {c['reward_rows']:.4g} | "
              f"{_num(row['peak_rss_mb'], '.0f')} | {_num(row['reward_mean'])} |")
    for row in rows[:len(names)]:
        compute = row["compute_per_image"] or {}
        print(f"\n{row['implementation']}: own compute counters, per image: "
              + ", ".join(f"{k} {v:.4g}" for k, v in compute.items()))
    for row in rows[1:len(names)]:
        se = row["paired_reward_diff_se"]
        print(f"{row['implementation']} / {names[0]}: time {row['ratio_to_first']:.3f}, reward difference on the same "
              f"seeds {row['paired_reward_diff']:+.4g}" + ("" if se is None else f" ± {se:.2g} (SE)"))
    if device.startswith("cuda"):
        print("peak CUDA memory MB: " + ", ".join(f"{r['implementation']} {_num(r['peak_cuda_mb'], '.0f')}"
                                                 for r in rows))
    if ratio is not None:
        print(f"\ntsf / diffusers time per image: {ratio:.3f}")
    return {"benchmark": "pipeline", "machine": info,
            "settings": {"pretrained": args.pretrained, "reward": args.reward, "reward_args": reward_args,
                         "sampler": args.sampler, "sampler_args": variants, "prompts": prompts,
                         "steps": args.steps, "eta": args.eta, "guidance": args.guidance, "dtype": args.dtype,
                         "runs": args.runs, "warmup": args.warmup, "seed": args.seed, "threads": args.threads,
                         "diffusers": args.diffusers, "device": device},
            "sampler_repr": [repr(s) for s in samplers], "reward_class": f"{type(reward).__module__}.{type(reward).__qualname__}",
            "rows": rows, "ratio_tsf_to_diffusers": ratio}


# ----------------------------------------------------------------------------- cli
#: what ``tsf bench cli`` times: label -> the arguments of ``tsf``
CLI_COMMANDS = {"tsf --version": ["--version"], "tsf --help": ["--help"], "tsf compare --help": ["compare", "--help"],
                "a config error (tsf sample --config missing.yaml)": ["sample", "--config", "missing.yaml"],
                "tsf sample --help (the LightningCLI parser)": ["sample", "--help"]}
#: the answer that must come at once: every command above but the LightningCLI parser's help
CLI_TARGET_SECONDS = 2.0
PROBE = ("import runpy, sys; sys.argv = ['tsf', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('tsf', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "import json; print('\\nHEAVY', json.dumps(sorted(m for m in ('torch', 'lightning') if m in sys.modules)), "
         "file=sys.stderr)")


def cli_one(args: list[str], repeats: int, cwd: str) -> dict:
    """Median wall time of ``python -m tsf ARGS`` in fresh processes (in ``cwd``), and what it imported."""
    import tsf

    root = str(Path(tsf.__file__).resolve().parents[1])  # this tsf, wherever the processes run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    times, heavy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tsf", *args], capture_output=True, text=True, cwd=cwd, env=env)
        times.append(time.perf_counter() - t0)
    probe = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, env=env)
    for line in probe.stderr.splitlines():
        if line.startswith("HEAVY "):
            heavy = json.loads(line[len("HEAVY "):])
    return {"args": args, "seconds": statistics.median(times), "times": times, "imports": heavy}


def cli(args) -> dict:
    info = machine("cpu")
    print(f"Seconds until `tsf` answers (fresh processes, median of {args.repeats}); target: under "
          f"{CLI_TARGET_SECONDS:g} s for all but the LightningCLI parser")
    print(machine_line(info))
    print("\n| command | s | imports torch / Lightning |")
    print("|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as empty:  # "missing.yaml" is missing there
        for label, argv in CLI_COMMANDS.items():
            progress(f"cli: {label}")
            row = {"command": label, **cli_one(argv, args.repeats, empty)}
            rows.append(row)
            print(f"| {label} | {row['seconds']:.2f} | {', '.join(row['imports']) or 'no'} |", flush=True)
    return {"benchmark": "cli", "machine": info, "target_seconds": CLI_TARGET_SECONDS,
            "settings": {"repeats": args.repeats}, "rows": rows}


# ----------------------------------------------------------------------------- command line
def run(argv=None) -> dict:
    """Run one benchmark (the command-line arguments of ``tsf bench``) and return its results."""
    p = ToolParser(prog="tsf bench", description=__doc__.split("\n\n")[0])
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
    o.add_argument("--repeats", type=int, default=7, help="measurements of each (medians)")
    o.add_argument("--stub", action="store_true",
                   help="also time each sampler with near-free stand-ins for its networks and reward: its overhead "
                        "alone, in seconds and against the bare calls (less noisy than the ratio of two timings)")
    o.add_argument("--default_allocator", "--default-allocator", action="store_true",
                   help="leave glibc's malloc thresholds as they are (default: keep freed memory for reuse, "
                        "which makes the timings repeatable)")
    o.add_argument("--min_seconds", "--min-seconds", type=float, default=1.0,
                   help="each measurement repeats sample() until it lasts about this long")
    common(o)

    t = sub.add_parser("throughput", help="samples per second against K and against the batch size")
    t.add_argument("--samplers", nargs="+", default=["best_of_n", "smc", "das"], choices=list(CONFIGS))
    t.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    t.add_argument("--batch_sizes", "--batch-sizes", type=int, nargs="+", default=[10, 25, 50, 100, 200, 400])
    t.add_argument("--k", type=int, default=8, help="K of the batch-size sweep")
    t.add_argument("--batch", type=int, default=None, help="batch of the K sweep (default: the config's, 100)")
    t.add_argument("--steps", type=int, default=None, help="override the configs' num_steps")
    t.add_argument("--min_seconds", "--min-seconds", type=float, default=1.0)
    common(t)

    m = sub.add_parser("memory", help="peak memory of DAS against K at a fixed grad_batch")
    m.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    m.add_argument("--grad_batch", "--grad-batch", type=int, default=64)
    m.add_argument("--samples", type=int, default=64)
    m.add_argument("--steps", type=int, default=10)
    common(m, "also write the rows to this file")

    q = sub.add_parser("pipeline", help="seconds per image of tsf's sampler (and diffusers' pipeline) on a "
                                        "Stable Diffusion 1.x / 2.x checkpoint, with the work counted")
    q.add_argument("--pretrained", required=True, help="a diffusers SD 1.x / 2.x folder or hub name")
    q.add_argument("--reward", default="brightness",
                   help="a registered reward name (aesthetic, ...) or the class_path pkg.mod.Class of a "
                        "tsf.rewards.Reward subclass (default: brightness)")
    q.add_argument("--reward_args", default="{}", help="the reward's init args, JSON")
    q.add_argument("--sampler", default="tsf.samplers.BaseSampler",
                   help="a YAML config (its model.init_args.sampler), a class_path (tsf.samplers.SMC) or a "
                        "registered sampler name (default: tsf.samplers.BaseSampler)")
    q.add_argument("--sampler_args", action="append", default=None,
                   help="the sampler's init args, JSON (over the config's); give it several times to time several "
                        "variants side by side on the same seeds (e.g. gradient_through network and tweedie)")
    q.add_argument("--prompts", nargs="+", default=list(PIPELINE_PROMPTS), help="one image per prompt per run")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--eta", type=float, default=1.0)
    q.add_argument("--guidance", type=float, default=5.0)
    q.add_argument("--dtype", default="float32", help="weights' precision of both (float16 on GPUs)")
    q.add_argument("--runs", type=int, default=3, help="timed runs of each (medians)")
    q.add_argument("--warmup", type=int, default=1, help="untimed runs of each first")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    q.add_argument("--diffusers", action="store_true", help="also time diffusers' StableDiffusionPipeline")
    q.add_argument("--images_per_prompt", type=int, default=1,
                   help="images diffusers makes per prompt (its row is then per prompt: set it to N to compare "
                        "with Best-of-N, whose output costs N trajectories)")
    common(q)

    c = sub.add_parser("cli", help="seconds until `tsf --version`, `--help`, a tool's `--help` and a config error "
                                   "answer, each in a fresh process")
    c.add_argument("--repeats", type=int, default=5, help="processes per command (median)")
    c.add_argument("--json", default=None, help="also write the results to this file")

    from tsf.commands import bench_gpu

    g = sub.add_parser("gpu", help="s/image, peak CUDA memory and UNet rows of SD 1.5, SDXL, SD3 and FLUX at their "
                                   "real sizes (random weights) for each method; --tiny: a CPU check")
    bench_gpu.add_arguments(g)
    common(g)

    from tsf.commands import bench_flops

    f = sub.add_parser("flops", help="FLOPs per row of SD 1.5 / SDXL's UNet, VAE and reward, counted on the meta "
                                     "device, and a gradient proposal's cost per particle-step through the network "
                                     "and through the Tweedie estimate")
    bench_flops.add_arguments(f)
    common(f)

    args = p.parse_args(argv)
    result = {"overhead": overhead, "throughput": throughput, "memory": memory, "pipeline": pipeline,
              "gpu": bench_gpu.gpu, "flops": bench_flops.flops, "cli": cli}[args.what](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None) -> None:
    run(argv)
