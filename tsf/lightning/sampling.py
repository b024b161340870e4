"""SamplingModule: the thin Lightning adapter around a sampler and the shared evaluator.

It gives the plain-PyTorch sampler devices, a progress bar, logging and distribution;
it computes no science itself. ``test_step`` samples a batch of (condition, sample_id)
pairs, feeds the :class:`~tsf.evaluation.Evaluator` and collects the samples; both
are torchmetrics objects, so several processes sync for free.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from tsf.errors import ConfigError
from tsf.evaluation import Evaluator
from tsf.lightning.shards import ShardStore
from tsf.models.base import BaseModel
from tsf.rewards.base import Reward, build_reward, check_reward, require_differentiable
from tsf.samplers.base import BaseSampler, Sampler, SampleBatch

REFERENCE_SEED = 2**31 - 1  # the reference set's noise never coincides with a run's default seeds


def cache_dir() -> Path:
    return Path(os.environ.get("TSF_CACHE", Path.home() / ".cache" / "tsf"))


def to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class SampleCollector(Metric):
    """Collects final samples (and their rewards) from every process."""

    full_state_update = False

    def __init__(self, reward_names: list[str]) -> None:
        super().__init__()
        self.reward_names = reward_names
        for key in ("x0", "images", "sample_id"):
            self.add_state(key, default=[], dist_reduce_fx="cat")
        for i in range(len(reward_names)):
            self.add_state(f"reward_{i}", default=[], dist_reduce_fx="cat")

    def update(self, batch: SampleBatch, rewards: dict[str, Tensor]) -> None:  # type: ignore[override]
        self.x0.append(batch.x0 if not batch.x0.is_floating_point() else batch.x0.float())  # tokens stay integers
        if batch.images is not None:
            self.images.append(to_uint8(batch.images))
        self.sample_id.append(batch.sample_ids.to(self.device))
        for i, name in enumerate(self.reward_names):
            getattr(self, f"reward_{i}").append(rewards[name].float())

    def compute(self) -> dict[str, Any]:
        ids = dim_zero_cat(self.sample_id)
        order = ids.argsort()
        out: dict[str, Any] = {"x0": dim_zero_cat(self.x0)[order].cpu(), "sample_id": ids[order].cpu()}
        images = dim_zero_cat(self.images) if len(self.images) else None
        if images is not None and images.numel():
            out["images"] = images[order].cpu()
        out["rewards"] = {n: dim_zero_cat(getattr(self, f"reward_{i}"))[order].cpu()
                          for i, n in enumerate(self.reward_names)}
        return out


def write_samples(run_dir: Path, results_samples: dict[str, Any], conditions: Optional[list], written: bool = False):
    """Write ``samples.pt`` (``written``: it is there already, only build what it holds) and return ``(samples,
    each sample's condition)``: the final states, images, ids, rewards and texts, and each sample's condition
    (class, prompt or None) beside its rewards; other kinds as text (samples.pt loads with weights_only, which
    takes numbers, strings and None)."""
    samples = {k: results_samples[k] for k in ("x0", "images", "sample_id", "rewards", "texts") if k in results_samples}
    conds = conditions or [None]
    per_sample = [conds[i % len(conds)] for i in samples["sample_id"].tolist()]
    samples["conditions"] = [c if c is None or isinstance(c, (int, float, str)) else repr(c) for c in per_sample]
    if not written:
        tmp = Path(run_dir) / f"samples.pt.{os.getpid()}.tmp"
        torch.save(samples, tmp)
        os.replace(tmp, Path(run_dir) / "samples.pt")
    return samples, per_sample


def add_texts(samples: dict[str, Any], model: BaseModel) -> dict[str, Any]:
    """``samples`` with the decoded strings of a text model's tokens (``texts``), as ``samples.pt`` keeps them."""
    if hasattr(model, "texts") and not samples["x0"].is_floating_point():
        samples["texts"] = model.texts(samples["x0"])
    return samples


class DiagnosticsCollector(Metric):
    """Collects the sampler's per-sample diagnostics (SMC: ``log_z [B]``, ``ess_fraction [B, T]``,
    ``resampled [B, T]``) from every process, rows aligned with the batch's sample ids."""

    full_state_update = False
    #: diagnostics with one row per output sample that go into the run directory's ``diagnostics.pt``
    KEYS = ("log_z", "ess_fraction", "resampled")

    def __init__(self) -> None:
        super().__init__()
        for key in ("sample_id", *self.KEYS):
            self.add_state(key, default=[], dist_reduce_fx="cat")

    def update(self, batch: SampleBatch) -> None:  # type: ignore[override]
        diagnostics = batch.diagnostics or {}
        if not all(torch.is_tensor(diagnostics.get(k)) for k in self.KEYS):
            return  # a sampler without them
        self.sample_id.append(batch.sample_ids.to(self.device))
        for key in self.KEYS:
            # gloo gathers no bool tensors: flags travel as float and come back as bool
            getattr(self, key).append(diagnostics[key].to(self.device, torch.float32))

    def compute(self) -> Optional[dict[str, Tensor]]:
        """``{"sample_id": [N], key: [N, ...]}`` sorted by sample id, or ``None`` when nothing was collected."""
        ids = dim_zero_cat(self.sample_id) if len(self.sample_id) else None
        if ids is None or not ids.numel():
            return None
        order = ids.argsort()
        out = {"sample_id": ids[order].long().cpu()}
        for key in self.KEYS:
            out[key] = dim_zero_cat(getattr(self, key))[order].cpu()
        out["resampled"] = out["resampled"].bool()
        return out


class SamplingModule(L.LightningModule):
    """Sample with a test-time sampler and judge the samples with the shared evaluator.

    Args:
        base: the base model (Gaussian-kernel interface).
        sampler: the test-time sampler.
        reward: the target reward: a registered name (``digit``, ``digit_holdout``,
            ``compressibility``, ``brightness``) or a ``class_path`` to any
            :class:`tsf.rewards.Reward` subclass.
        cross_rewards: rewards evaluated on the samples but never used for sampling.
        features: name of the reward whose ``features`` give diversity and fidelity
            (default: the first cross-reward that has features; else raw samples).
        fidelity_samples: size of the cached reference set of plain base samples for
            ``fidelity/fd`` (0 disables it).
        lpips: a torchmetrics LPIPS backbone (``alex``, ``vgg``, ``squeeze``) to add
            ``diversity/lpips`` (off by default; needs torchvision and the backbone's weights).
    """

    def __init__(
        self,
        base: BaseModel,
        sampler: Sampler,
        reward: Union[str, Reward] = "digit",
        cross_rewards: Optional[list[Union[str, Reward]]] = None,
        features: Optional[str] = None,
        fidelity_samples: int = 1000,
        lpips: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.sampler = sampler
        self.reward = build_reward(reward)
        cross = [build_reward(r) for r in (["digit_holdout"] if cross_rewards is None else cross_rewards)]
        names = [self.reward.name] + [r.name for r in cross]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward names must be distinct, got {names}")
        for r in [self.reward, *cross]:
            if hasattr(r, "bind"):  # a text reward takes the base model's tokenizer and prefix
                r.bind(base)
        feature_reward = self._feature_reward(features, cross)
        self.evaluator = Evaluator(self.reward, cross, feature_reward, lpips=lpips, min_rows=base.min_rows)
        self.collector = SampleCollector(self.evaluator.reward_keys())
        self.diagnostics = DiagnosticsCollector()
        self.fidelity_samples = int(fidelity_samples)
        self.results: dict[str, Any] = {}
        self.sampled_batches = 0  # batches sampled in this process
        self.reused_batches = 0   # batches read from verified shards of an earlier attempt (--resume)

    def _feature_reward(self, features: Optional[str], cross: list[Reward]) -> Optional[Reward]:
        candidates = {r.name: r for r in [self.reward, *cross]}
        if features is not None:
            if features not in candidates:
                candidates[features] = build_reward(features)
            return candidates[features]
        return next((r for r in cross if r.has_features), None)

    def run_name(self, seed: int, method: Optional[str] = None) -> str:
        return f"{method or self.sampler.name}_K{self.sampler.num_particles}_{self.reward.name}_seed{seed}"

    # -- lifecycle --------------------------------------------------------------------
    def check_conditions(self, conditions: list) -> None:
        """Refuse conditions the base model or a reward cannot take (reads no weight file)."""
        self.base.check_conditions(conditions)
        for r in [self.reward, *self.evaluator.cross]:
            r.check_conditions(conditions)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        conditions = dm.sample_conditions() if dm is not None else [None]
        self.check_conditions(conditions)
        self.base.load()
        for r in {id(r): r for r in [self.reward, *self.evaluator.cross, self.evaluator.feature_reward] if r}.values():
            r.load()
        self._conditions = conditions

    def on_test_start(self) -> None:
        self.check_rewards(self._conditions)
        if self.fidelity_samples > 0:
            self.evaluator.set_reference(self.reference_images(self._conditions))

    def check_rewards(self, conditions: list, n: int = 2) -> None:
        """Before any sampling, every reward is called on ``n`` real images from the model (the Tweedie
        estimates of ``n`` prior draws, one model call each, not counted in the run's compute) and refused
        in one line if its output is not what the samplers need (:func:`tsf.rewards.base.check_reward`);
        a sampler that follows the reward's gradient refuses a reward not marked differentiable."""
        if getattr(self.sampler, "uses_reward_gradient", False):
            require_differentiable(self.reward, repr(self.sampler))
        conds = [conditions[i % len(conditions)] for i in range(n)]
        generator = torch.Generator().manual_seed(REFERENCE_SEED)
        with torch.no_grad():
            x = self.base.prior(self.base.random_noise(n, generator).to(self.device))
            x0 = self.base.x0_hat(x, 0, self.base(x, 0, self.base.encode_conditions(conds)))
            images = self.base.decode(x0)
        with torch.inference_mode(False):
            verifier = getattr(self.sampler, "verifier", None)  # a search's own scorer (random, zero-order search)
            if verifier is not None:
                verifier.load().to(self.device)
            for r in {id(r): r for r in [self.reward, *self.evaluator.cross, verifier] if r is not None}.values():
                check_reward(r, images.clone(), conds)

    @torch.no_grad()
    def reference_images(self, conditions: list) -> Tensor:
        """Plain base samples (cached on disk by model and conditions) for ``fidelity/fd``."""
        n = self.fidelity_samples
        conds = [conditions[i % len(conditions)] for i in range(n)]
        key = hashlib.sha256(repr((self.base.cache_key(), conds, n, REFERENCE_SEED)).encode()).hexdigest()[:20]
        path = cache_dir() / "reference" / f"{key}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["images"].to(self.device)
            except Exception:  # a partial or corrupt cache file is regenerated
                pass
        sampler = BaseSampler(max_batch=self.sampler.max_batch)
        batch = sampler.sample(self.base, None, conds, torch.arange(n), seed=REFERENCE_SEED)
        images = batch.images if batch.images is not None else batch.x0
        if self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({"images": images.float().contiguous().cpu()}, str(tmp))
            os.replace(tmp, path)
        return images

    # -- sampling ---------------------------------------------------------------------
    def shards(self) -> Optional[ShardStore]:
        """Where batches are written as they finish (the run directory's ``shards/``), if there is one."""
        run_dir = getattr(self.trainer, "run_dir", None)
        return ShardStore(Path(run_dir) / "shards") if run_dir is not None else None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        seed = self.trainer.datamodule.seed
        store = self.shards()
        out = store.load(batch["sample_ids"], self.device) if store is not None else None
        self.reused_batches += out is not None
        if out is None:
            with torch.inference_mode(False), self.batch_progress(len(batch["sample_ids"])):
                # gradient samplers (DAS, DPS) differentiate inside test_step
                out = self.sampler.sample(self.base, self.reward, batch["conditions"], batch["sample_ids"].clone(),
                                          seed=seed)
            if store is not None:
                store.save(out)
            self.sampled_batches += 1
        nfe = (out.compute or {}).get("nfe")
        if nfe and len(out):
            self._nfe_per_row = float(nfe) / len(out)  # the plan of the next batch's progress line
        rewards = self.evaluator.rewards(out, batch["conditions"])
        self.evaluator.update(out, rewards)
        self.collector.update(out, rewards)
        self.diagnostics.update(out)
        self.report_rank_progress(batch_idx)

    def batch_progress(self, rows: int):
        """Progress inside a batch for a progress bar that shows it (``on_sampling_progress``, e.g.
        :class:`tsf.lightning.progress.SamplingBar`): the NFE spent against the NFE planned (an earlier batch's
        NFE per row times ``rows``), or the denoising steps for a run's first batch."""
        import contextlib

        from tsf.lightning.progress import BatchProgress

        bar = self.trainer.progress_bar_callback if self._trainer is not None else None
        report = getattr(bar, "on_sampling_progress", None)
        if report is None or not self.trainer.is_global_zero:
            return contextlib.nullcontext()
        planned = getattr(self, "_nfe_per_row", None)
        return BatchProgress(self.base, report, None if planned is None else planned * rows)

    def report_rank_progress(self, batch_idx: int) -> None:
        """Under several processes, each rank prints its own progress (the bar shows rank 0's only)
        about ten times per run, one line each, readable in SLURM logs."""
        trainer = self.trainer
        if trainer.world_size == 1:
            return
        total = trainer.num_test_batches[0] if trainer.num_test_batches else 0
        done = batch_idx + 1
        if total and (done == total or done % max(1, total // 10) == 0):
            print(f"[rank {trainer.global_rank}/{trainer.world_size}] {done}/{total} batches", file=sys.stderr,
                  flush=True)

    def on_test_epoch_end(self) -> None:
        samples = add_texts(self.collector.compute(), self.base)
        run_dir = getattr(self.trainer, "run_dir", None)
        written = run_dir is not None and self.trainer.is_global_zero
        if written:  # the samples are on disk before any metric is computed: a failing metric cannot lose them
            write_samples(run_dir, samples, self._conditions)
        metrics = self.evaluator.compute()
        diagnostics = self.diagnostics.compute()
        per_condition = self.evaluator.per_condition(self._conditions)
        counts = torch.tensor([self.sampled_batches, self.reused_batches], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.results = {"metrics": metrics, "samples": samples, "conditions": self._conditions, "samples_written": written,
                        "per_condition": {str(c): m for c, m in per_condition.items()},
                        "batches": {"sampled": int(counts[0]), "reused": int(counts[1])}}
        if diagnostics is not None:
            self.results["diagnostics"] = diagnostics
        self.write_diagnostics(diagnostics, samples["sample_id"])
        bad = int(metrics.get("target/nonfinite", 0))
        if bad and self.trainer.is_global_zero:
            print(f"tsf: warning: {bad} of {len(samples['sample_id'])} samples have a non-finite target reward "
                  f"({self.reward.name}); the target metrics are over the {len(samples['sample_id']) - bad} finite "
                  "ones (target/nonfinite counts the others; samples.pt keeps every sample)", file=sys.stderr)
        # already synced by torchmetrics: log as is (self.log's sync_dist mis-averages uneven shards)
        self.log_dict(metrics, sync_dist=False, rank_zero_only=True)
        self.evaluator.reset()
        self.collector.reset()
        self.diagnostics.reset()

    def write_diagnostics(self, diagnostics: Optional[dict[str, Tensor]], sample_ids: Tensor) -> None:
        """Rank 0 writes ``diagnostics.pt`` into the run directory when every sample has diagnostics
        (a stale file from an overwritten run is removed)."""
        run_dir = getattr(self.trainer, "run_dir", None)
        if run_dir is None or not self.trainer.is_global_zero:
            return
        path = Path(run_dir) / "diagnostics.pt"
        path.unlink(missing_ok=True)
        if diagnostics is None:
            return
        if not torch.equal(diagnostics["sample_id"], sample_ids):
            print(f"tsf: {path.name} not written: {len(diagnostics['sample_id'])} of {len(sample_ids)} samples "
                  "have diagnostics")
            return
        torch.save(diagnostics, path)
