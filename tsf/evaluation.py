"""The shared evaluator (docs/algorithms.md, section 8): every sample of every method is judged here.

A torchmetrics ``Metric``: per-sample states are concatenated (and synced across
processes by torchmetrics, uneven shards included), ``compute`` returns the flat
dict of the metric keys of docs/run_directory.md (metrics.json):

``target/mean``, ``target/median``, ``target/q90``, ``target/nonfinite`` (samples whose target reward
is NaN or infinite: counted there, left out of the statistics), ``cross/<reward>/mean`` (and
``cross/<reward>/nonfinite`` when some are), ``target/<term>/mean`` for each term of a mixture target
(:class:`~tsf.rewards.WeightedSum`: the term's raw value, before its shift and scale),
``diversity/pairwise``, ``diversity/vendi``, ``fidelity/fd`` (when a reference set of
plain base samples is given), ``compute/<key>`` per sample for every key of
:data:`tsf.samplers.base.COMPUTE_KEYS` (``nfe``, ``nfe_grad``, ``reward_calls``, ``reward_grad_calls``:
the method's counts; ``model_rows``, ``decode_rows``, ``reward_rows``: the rows really computed;
``seconds``), and ``diversity/lpips`` when the LPIPS option is on.

:meth:`Evaluator.per_condition` breaks the same numbers down by condition (prompt):
target and cross means, and diversity among the samples of each prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from tsf.errors import ConfigError
from tsf.rewards.base import Reward
from tsf.samplers.base import COMPUTE_KEYS, SampleBatch, chunked


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[n, d]``:
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, the trace of the matrix square root
    being the sum of the square roots of the eigenvalues of ``S_a S_b`` (real and non-negative up to rounding)."""
    a, b = a.double(), b.double()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    root = torch.linalg.eigvals(sa @ sb).sqrt().real.sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + sa.trace() + sb.trace() - 2 * root)


def pairwise_cosine_distance(features: Tensor) -> float:
    """Mean ``1 - cos`` over distinct pairs, in O(n d)."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    u = torch.nn.functional.normalize(features.double(), dim=1)
    s = u.sum(0)
    mean_cos = (s @ s - n) / (n * (n - 1))
    return float(1 - mean_cos)


def vendi_score(features: Tensor) -> float:
    """Vendi score ``exp(-sum l log l)`` of the eigenvalues ``l`` of ``K / n``, ``K`` the cosine kernel, in float64.

    The non-zero eigenvalues of ``U U^T / n`` (``n x n``) equal those of ``U^T U / n`` (``d x d``): the smaller of
    the two is decomposed, so raw pixels of large images (``d`` in the hundreds of thousands) cost an ``n x n``
    matrix, never a ``d x d`` one.
    """
    n, d = features.shape[0], features[0].numel() if len(features) else 0
    if n < 1:
        return float("nan")
    u = torch.nn.functional.normalize(features.flatten(1).double(), dim=1)
    gram = u @ u.T if n <= d else u.T @ u
    lam = torch.linalg.eigvalsh(gram / n).clamp(min=0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


#: raw-pixel features (no feature extractor) of images larger than this are average-pooled to it (per side)
PIXEL_FEATURE_SIZE = 64


def pixel_features(images: Tensor) -> Tensor:
    """Raw-pixel features ``[N, d]`` in float32: the pixels, images larger than ``PIXEL_FEATURE_SIZE`` per side
    average-pooled to at most that size first (a fixed, documented downsampling: docs/algorithms.md, section 8)."""
    x = images.float()
    if x.dim() == 4 and max(x.shape[-2:]) > PIXEL_FEATURE_SIZE:
        size = tuple(min(PIXEL_FEATURE_SIZE, s) for s in x.shape[-2:])
        x = torch.nn.functional.adaptive_avg_pool2d(x, size)
    return x.flatten(1)


def token_match_kernel(tokens: Tensor, block: int = 256) -> Tensor:
    """``K_ij`` = fraction of positions where sequences ``i`` and ``j`` agree (``[n, n]``, float64): the cosine kernel
    of their one-hot encodings, computed from the tokens without the ``L x V`` one-hot features."""
    t = tokens.long()
    rows = [(t[s:s + block, None, :] == t[None, :, :]).double().mean(-1) for s in range(0, len(t), block)]
    return torch.cat(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)


def token_diversity(tokens: Tensor) -> dict[str, float]:
    """Diversity of token sequences ``[n, L]``: the mean normalised Hamming distance between distinct sequences
    (``diversity/hamming``, also ``diversity/pairwise``: the one-hot cosine distance is the same number) and the
    Vendi score of the match kernel (the one-hot cosine kernel)."""
    n = tokens.shape[0]
    if n < 2:
        return {"diversity/hamming": float("nan"), "diversity/pairwise": float("nan"), "diversity/vendi": float("nan")}
    k = token_match_kernel(tokens)
    hamming = float(1 - (k.sum() - n) / (n * (n - 1)))
    lam = torch.linalg.eigvalsh(k / n).clamp(min=0)
    lam = lam[lam > 1e-12]
    return {"diversity/hamming": hamming, "diversity/pairwise": hamming,
            "diversity/vendi": float(torch.exp(-(lam * lam.log()).sum()))}


LPIPS_NETS = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights"),
              "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}


def lpips_unavailable(net: str) -> Optional[str]:
    """Why torchmetrics' LPIPS with backbone ``net`` cannot run offline here, or ``None`` if it can.

    It needs torchvision and the backbone's ImageNet weights in torch's hub cache (torchvision
    downloads them on first use where there is network); the LPIPS heads ship with torchmetrics.
    """
    if net not in LPIPS_NETS:
        return f"unknown LPIPS backbone {net!r}; choose one of {', '.join(LPIPS_NETS)}"
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return "LPIPS needs torchvision: `pip install torchvision` (the build matching your torch)"
    import torchvision

    weights = getattr(torchvision.models, LPIPS_NETS[net][1]).IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        return (f"LPIPS backbone weights {path} are missing: download {weights.url} to that path (torch hub "
                f"cache; TORCH_HOME moves it), or run once with network")
    return None


def lpips_distance(net: str, device: Any = "cpu") -> Callable[[Tensor, Tensor], Tensor]:
    """Per-pair LPIPS ``d(a, b) -> [P]`` for images in [0, 1], from torchmetrics."""
    reason = lpips_unavailable(net)
    if reason is not None:
        raise ConfigError(reason)
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True,
                                                   sync_on_compute=False).to(device)  # pairs are per process

    def distance(a: Tensor, b: Tensor) -> Tensor:
        metric.reset()
        metric.update(a.float().clamp(0, 1), b.float().clamp(0, 1))
        return metric.compute().reshape(-1)

    return distance


def mean_pairwise_distance(images: Tensor, distance: Callable[[Tensor, Tensor], Tensor], max_pairs: int = 4096,
                           chunk: int = 64, seed: int = 0) -> float:
    """Mean ``distance`` over the distinct pairs ``i < j`` of ``images`` (a fixed random subset of
    ``max_pairs`` of them when there are more)."""
    n = images.shape[0]
    if n < 2:
        return float("nan")
    i, j = torch.triu_indices(n, n, offset=1)
    if i.numel() > max_pairs:
        keep = torch.randperm(i.numel(), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        i, j = i[keep], j[keep]
    total = 0.0
    for k in range(0, i.numel(), chunk):
        total += float(distance(images[i[k:k + chunk]], images[j[k:k + chunk]]).double().sum())
    return total / i.numel()


def guarded(name: str, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``compute()``, or, if it raises, ``{name: nan}`` and one line on stderr naming the metric: a metric that
    fails never costs the samples or the other metrics of a finished run."""
    try:
        return compute()
    except Exception as e:  # noqa: BLE001 - any failure of one metric is reported, not raised
        import sys

        print(f"tsf: warning: metric {name} failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
              "it is NaN in metrics.json, the other metrics and samples.pt are written", file=sys.stderr)
        return {name: float("nan")}


def condition_key(condition: Any) -> str:
    """A condition as a table key: a prompt as is, ``None`` as ``null``, others by ``str``."""
    return "null" if condition is None else str(condition)


class Evaluator(Metric):
    """Target reward, cross-rewards, diversity, fidelity and compute of a set of samples.

    Args:
        target: the reward being optimised.
        cross: rewards evaluated on the same samples, never used for guidance.
        features: a reward with a ``features`` method for diversity and fidelity
            (on digits: the holdout classifier); ``None`` uses the raw samples.
        max_batch: most images in one reward or feature call.
        lpips: a torchmetrics LPIPS backbone (``alex``, ``vgg``, ``squeeze``) to add
            ``diversity/lpips``, the mean LPIPS between distinct samples; off by default. Its
            backbone weights must be available offline (a ConfigError says what to fetch).
        lpips_size: images are resized (antialiased bilinear) to this square size for LPIPS.
        lpips_max_pairs: most sample pairs LPIPS compares (a fixed random subset beyond).
        min_rows: reward and feature calls on fewer rows are padded to this many (the base model's
            :attr:`~tsf.models.base.BaseModel.min_rows`: a batch-invariant model's samples get rewards
            that do not depend on the batch either).
    """

    full_state_update = False

    def __init__(self, target: Reward, cross: Sequence[Reward] = (), features: Optional[Reward] = None,
                 max_batch: int = 4096, lpips: Optional[str] = None, lpips_size: int = 256,
                 lpips_max_pairs: int = 4096, min_rows: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_batch, self.min_rows = max_batch, int(min_rows)
        self.lpips = lpips
        if lpips is not None:
            reason = lpips_unavailable(lpips)
            if reason is not None:  # fail before sampling, not after it
                raise ConfigError(f"diversity/lpips was asked for, but {reason}")
        self.lpips_size, self.lpips_max_pairs = int(lpips_size), int(lpips_max_pairs)
        self._lpips_distance: Optional[Callable[[Tensor, Tensor], Tensor]] = None
        self.target = target
        self.cross = torch.nn.ModuleList(cross)
        self.feature_reward = features
        self.add_state("target_values", default=[], dist_reduce_fx="cat")
        #: the terms of a mixture target (:class:`~tsf.rewards.WeightedSum`), each logged beside the sum
        self.term_labels: list[str] = list(getattr(target, "labels", [])) if hasattr(target, "evaluate") else []
        for i in range(len(self.term_labels)):
            self.add_state(f"term_{i}", default=[], dist_reduce_fx="cat")
        for i in range(len(self.cross)):
            self.add_state(f"cross_{i}", default=[], dist_reduce_fx="cat")
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("sample_ids", default=[], dist_reduce_fx="cat")
        if lpips is not None:
            self.add_state("lpips_images", default=[], dist_reduce_fx="cat")
        for key in COMPUTE_KEYS:
            self.add_state(f"compute_{key}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.reference: Optional[Tensor] = None
        #: whether the samples are token sequences without images (their diversity is then Hamming's)
        self.tokens = False

    def cross_names(self) -> list[str]:
        return [r.name for r in self.cross]

    @torch.no_grad()
    def featurize(self, images: Tensor) -> Tensor:
        if not images.is_floating_point() and self.feature_reward is None:  # token sequences: kept as they are
            self.tokens = True
            return images.flatten(1).double()
        if self.feature_reward is None:
            return pixel_features(images)
        return chunked(self.feature_reward.features, self.max_batch, images.float(), min_rows=self.min_rows).float()

    def set_reference(self, images: Tensor) -> None:
        """Plain base-model samples that ``fidelity/fd`` compares against."""
        self.reference = self.featurize(images.to(self.device)).cpu()

    @torch.no_grad()
    def rewards(self, batch: SampleBatch, conditions: Sequence[Any]) -> dict[str, Tensor]:
        """Target and cross rewards of a batch's samples, by reward name (the input of :meth:`update`)."""
        images = batch.images if batch.images is not None else batch.x0
        out = {r.name: chunked(r, self.max_batch, images, list(conditions), min_rows=self.min_rows).float()
               for r in self.cross}
        if self.term_labels:  # a mixture: the sum and each term's raw value, from one call of each term
            total, terms = chunked(self.target.evaluate, self.max_batch, images, list(conditions), min_rows=self.min_rows)
            out[self.target.name] = total.float()
            out.update({self.term_key(label): terms[:, i] for i, label in enumerate(self.term_labels)})
        else:
            out[self.target.name] = chunked(self.target, self.max_batch, images, list(conditions),
                                            min_rows=self.min_rows).float()
        return out

    def term_key(self, label: str) -> str:
        """The key of a mixture term's per-sample values in :meth:`rewards` (and ``samples.pt``): ``<sum>/<term>``."""
        return f"{self.target.name}/{label}"

    def reward_keys(self) -> list[str]:
        """The keys of :meth:`rewards`: the target, its terms (a mixture's), the cross-rewards."""
        return [self.target.name, *(self.term_key(t) for t in self.term_labels), *self.cross_names()]

    @torch.no_grad()
    def update(self, batch: SampleBatch, rewards: dict[str, Tensor]) -> None:  # type: ignore[override]
        """Add a batch of final samples with their rewards from :meth:`rewards`."""
        images = batch.images if batch.images is not None else batch.x0
        self.target_values.append(rewards[self.target.name])
        for i, label in enumerate(self.term_labels):
            getattr(self, f"term_{i}").append(rewards[self.term_key(label)].float())
        for i, r in enumerate(self.cross):
            getattr(self, f"cross_{i}").append(rewards[r.name])
        self.features.append(self.featurize(images))
        self.sample_ids.append(batch.sample_ids.to(self.device).long())
        if self.lpips is not None:
            x = images.float()
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            x = torch.nn.functional.interpolate(x, size=(self.lpips_size,) * 2, mode="bilinear", antialias=True)
            self.lpips_images.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
        for key in COMPUTE_KEYS:
            setattr(self, f"compute_{key}", getattr(self, f"compute_{key}") + float(batch.compute.get(key, 0.0)))
        self.count += len(batch)

    def compute(self) -> dict[str, float]:
        target = dim_zero_cat(self.target_values).double()
        cross = [dim_zero_cat(getattr(self, f"cross_{i}")).double() for i in range(len(self.cross))]
        terms = [dim_zero_cat(getattr(self, f"term_{i}")).double() for i in range(len(self.term_labels))]
        feats = dim_zero_cat(self.features)
        n = max(float(self.count), 1.0)
        out = self._sample_metrics(target, cross, feats, torch.arange(len(target), device=target.device), terms)
        if self.reference is not None and not self.tokens:  # (no Frechet distance of raw token ids)
            out.update(guarded("fidelity/fd", lambda: {"fidelity/fd": frechet_distance(feats.cpu(), self.reference)}))
        for key in COMPUTE_KEYS:
            out[f"compute/{key}"] = float(getattr(self, f"compute_{key}")) / n
        return out

    def _sample_metrics(self, target: Tensor, cross: list[Tensor], feats: Tensor, rows: Tensor,
                        terms: Sequence[Tensor] = ()) -> dict[str, float]:
        """Target statistics (and a mixture's term means), cross-reward means and diversity of the samples ``rows``."""
        t = target[rows]
        finite = t[torch.isfinite(t)]  # a non-finite reward is counted, not averaged in
        out = {"target/nonfinite": float(len(t) - len(finite))}
        if len(finite):
            out.update({"target/mean": float(finite.mean()), "target/median": float(finite.median()),
                        "target/q90": float(torch.quantile(finite, 0.9))})
        else:
            out.update({"target/mean": float("nan"), "target/median": float("nan"), "target/q90": float("nan")})
        for label, values in zip(self.term_labels, terms):
            v = values[rows]
            ok = torch.isfinite(v)
            out[f"target/{label}/mean"] = float(v[ok].mean()) if ok.any() else float("nan")
        for r, values in zip(self.cross, cross):
            v = values[rows]
            ok = torch.isfinite(v)
            out[f"cross/{r.name}/mean"] = float(v[ok].mean()) if ok.any() else float("nan")
            if not ok.all():
                out[f"cross/{r.name}/nonfinite"] = float((~ok).sum())
        if self.tokens:
            out.update(guarded("diversity/hamming", lambda: token_diversity(feats[rows])))
        else:
            out.update(guarded("diversity/pairwise", lambda: {"diversity/pairwise": pairwise_cosine_distance(feats[rows])}))
            out.update(guarded("diversity/vendi", lambda: {"diversity/vendi": vendi_score(feats[rows])}))
        if self.lpips is not None:
            out.update(guarded("diversity/lpips", lambda: {"diversity/lpips": self._lpips_diversity(rows)}))
        return out

    def _lpips_diversity(self, rows: Tensor) -> float:
        if self._lpips_distance is None:
            self._lpips_distance = lpips_distance(self.lpips, self.device)
        images = dim_zero_cat(self.lpips_images)[rows.to(self.device)].float() / 255
        return mean_pairwise_distance(images, self._lpips_distance, self.lpips_max_pairs)

    def per_condition(self, conditions: Sequence[Any]) -> dict[str, dict[str, float]]:
        """The metrics of each condition's samples: ``{condition: {"count", "target/mean",
        "target/median", "target/q90", "cross/<reward>/mean", "diversity/pairwise",
        "diversity/vendi"[, "diversity/lpips"]}}``, conditions in first-use order.

        ``conditions`` are those of the data module, cycled over the sample ids (sample ``i``
        has ``conditions[i % len(conditions)]``, as :class:`~tsf.lightning.data.SampleIdsDataModule`
        assigns them); call it before :meth:`reset`. The count-weighted mean of the per-condition
        ``target/mean`` is the overall ``target/mean``. Diversity here is among the samples of
        one prompt (the usual text-to-image diversity), not across prompts.
        """
        conditions = list(conditions)
        if not conditions:
            raise ConfigError("per_condition needs the list of conditions")
        # synced across processes as compute() is (torchmetrics' own context), restored after
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            return self._per_condition(conditions)

    def _per_condition(self, conditions: list) -> dict[str, dict[str, float]]:
        ids = dim_zero_cat(self.sample_ids).long().cpu()
        target = dim_zero_cat(self.target_values).double().cpu()
        cross = [dim_zero_cat(getattr(self, f"cross_{i}")).double().cpu() for i in range(len(self.cross))]
        terms = [dim_zero_cat(getattr(self, f"term_{i}")).double().cpu() for i in range(len(self.term_labels))]
        feats = dim_zero_cat(self.features).cpu()
        keys = [condition_key(conditions[int(i) % len(conditions)]) for i in ids]
        table: dict[str, dict[str, float]] = {}
        for key in dict.fromkeys(keys):
            rows = torch.tensor([k == key for k in keys]).nonzero().reshape(-1)
            table[key] = {"count": float(len(rows)), **self._sample_metrics(target, cross, feats, rows, terms)}
        return table
