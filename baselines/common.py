"""What DDPO and DRaFT share: LoRA on the denoiser (of a diffusion or a flow model), seeded trajectories,
validation by the evaluator (docs/algorithms.md, section 6)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from tsf.data.prompts import conditions_or_prompts
from tsf.errors import ConfigError
from tsf.evaluation import Evaluator
from tsf.lightning.data import ConditionSampleIds, ShardSampler, collate
from tsf.models.base import BaseModel
from tsf.rewards.base import Reward, build_reward
from tsf.samplers.base import BaseSampler, Noise

#: LoRA targets per model family (module-name suffixes, as peft matches them)
LORA_TARGETS = {
    # the digits models' MLP (DigitsDiffusion's eps network, DigitsFlow's velocity network)
    "ResidualMLPDenoiser": ["inp", "emb", "fc1", "fc2"],
    # the attention projections of the Stable Diffusion UNets
    "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0"],
    # the joint attention's projections of both streams, the defaults of diffusers' SD3 LoRA training script
    # (the last block has no to_add_out: its context stream ends before the output projection)
    "SD3Transformer2DModel": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                              "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],
    # those and both streams' feed-forward layers, the defaults of diffusers' FLUX LoRA training script
    # ("attn.to_q/k/v" match the single-stream blocks' attention too)
    "FluxTransformer2DModel": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                               "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                               "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}


def default_lora_targets(net) -> Optional[list[str]]:
    """The LoRA targets of ``net``'s family, or of the network a thin wrapper holds as ``net.net`` (DigitsFlow's
    time-scaling wrapper around its MLP); ``None`` when neither is known."""
    for module in (net, getattr(net, "net", None)):
        if module is not None and type(module).__name__ in LORA_TARGETS:
            return LORA_TARGETS[type(module).__name__]
    return None


def add_lora(model: BaseModel, rank: int = 4, alpha: Optional[float] = None,
             target_modules: Optional[list[str]] = None) -> None:
    """Load the model and put LoRA adapters on its denoiser (a diffusion model's eps or v network, a flow
    model's velocity network); base weights are frozen. A diffusers pipeline
    (:class:`~tsf.models.pipelines.StableDiffusion`, ...) injects them into its UNet or transformer the way
    diffusers' training scripts do (``add_adapter``, saved in diffusers' format); the digits models wrap
    theirs in a peft ``PeftModel`` (saved in peft's format)."""
    model.load()
    net = model.net
    targets = target_modules or default_lora_targets(net)
    if targets is None:
        raise ConfigError(f"no default LoRA targets for {type(net).__name__}; set target_modules")
    if hasattr(model, "add_lora"):
        model.add_lora(rank, alpha, targets)
        return
    net.requires_grad_(False)
    model.net = get_peft_model(net, LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets,
                                               lora_dropout=0.0))
    from tsf.models.digits import DigitsDiffusion, DigitsFlow, adapter_base_name

    if isinstance(model, (DigitsDiffusion, DigitsFlow)):
        # adapter_config.json names the base model (tsf:digits_denoiser), as peft does a hub model's name
        model.net.peft_config["default"].base_model_name_or_path = adapter_base_name(model)


@contextlib.contextmanager
def adapters_disabled(model: BaseModel):
    """A context in which ``model``'s denoiser runs without its LoRA adapters: the frozen base model (peft's
    ``PeftModel.disable_adapter``; ``disable_adapters`` / ``enable_adapters`` on a diffusers denoiser that got
    them by ``add_adapter``)."""
    from peft import PeftModel

    net = model.net
    if isinstance(net, PeftModel):
        with net.disable_adapter():
            yield
        return
    net.disable_adapters()
    try:
        yield
    finally:
        net.enable_adapters()


def save_lora(model: BaseModel, path: Path) -> None:
    """The model's trained adapter to ``path``: diffusers' ``pytorch_lora_weights.safetensors`` for a pipeline,
    peft's ``adapter_config.json`` and ``adapter_model.safetensors`` for the digits models (what each model's
    ``adapter`` option loads)."""
    if hasattr(model, "save_lora"):
        model.save_lora(path)
    else:
        # (no embedding layers to save: peft would otherwise look the base model's config up on the hub)
        model.net.save_pretrained(str(path), save_embedding_layers=False)


def trim_curve(path: Path, step: int) -> None:
    """Keep the lines of a JSON-lines curve whose ``step`` is at most ``step`` (none: remove the file)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    if kept:
        path.write_text("".join(line + "\n" for line in kept))
    else:
        path.unlink()



class StepTicks(DataLoader):
    """The training loader of a baseline: it only ticks optimisation steps (a step's trajectories are drawn in
    the step, a function of ``global_step`` alone: :meth:`FinetuneModule.global_ids`), so a run resumed in
    the middle of an epoch continues exactly; its state, saved in Lightning checkpoints, is therefore empty
    (``state_dict`` / ``load_state_dict`` tell Lightning that it resumes, with no warning that it does not)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class FinetuneModule(L.LightningModule):
    """Base of the fine-tuning baselines.

    Args:
        base: the base model to fine-tune, a diffusion or a flow model (its denoiser gets LoRA adapters).
        reward: the reward to maximise (a registered name or a Reward).
        cross_rewards: evaluated on validation samples, never optimised.
        conditions: classes (or prompts) cycled over the training and validation samples.
        prompts: instead of ``conditions``, a prompt set: a shipped set's name (``animals``) or a text
            file (:func:`tsf.data.prompts.load_prompts`).
        batch_size: trajectories per sampled batch, over all processes (the global batch; DRaFT samples
            one batch per optimisation step, DDPO ``num_batches_per_epoch`` of them per epoch): under
            DDP each of the ``world_size`` ranks draws ``batch_size / world_size`` of them and the
            gradients are averaged, so that a step equals the single-process step on the same batch.
        lr, weight_decay: AdamW's learning rate and weight decay (0.01, torch's default, unless a method
            sets its own); ``rank``, ``target_modules``: the LoRA configuration.
        val_samples: fixed (condition, sample id) pairs sampled with the base sampler at each validation.
        seed: seed of the training trajectories (trajectory id ``i`` draws its noise from
            ``(seed + 1000003, i)``; the ids of sampled batch ``k`` are ``k * batch_size, ...``) and of validation.
    """

    def __init__(self, base: BaseModel, reward: Union[str, Reward] = "digit",
                 cross_rewards: Optional[list[Union[str, Reward]]] = None, conditions: Optional[list[Any]] = None,
                 batch_size: int = 32, lr: float = 3e-4, rank: int = 4, target_modules: Optional[list[str]] = None,
                 val_samples: int = 200, seed: int = 0, prompts: Optional[Union[list[str], str]] = None,
                 weight_decay: float = 0.01) -> None:
        super().__init__()
        conditions = conditions_or_prompts(conditions, prompts)
        if not base.gaussian_kernel:
            raise ConfigError(f"the fine-tuning baselines (DDPO, DRaFT) are written for a Gaussian kernel and "
                              f"{type(base).__name__}'s is discrete (docs/algorithms.md, section 11): use a test-time "
                              "sampler on it")
        if getattr(base, "cpu_offload", False):
            raise ConfigError("fine-tuning keeps the denoiser on its device: set the base model's cpu_offload false")
        self.base = base
        self.reward = build_reward(reward)
        cross = [build_reward(r) for r in (["digit_holdout"] if cross_rewards is None else cross_rewards)]
        self.conditions = list(conditions) if conditions else list(range(10))
        for r in (self.reward, *cross):
            r.check_conditions(self.conditions)
        features = next((r for r in cross if r.has_features), None)
        self.evaluator = Evaluator(self.reward, cross, features, min_rows=base.min_rows)
        self.batch_size, self.lr, self.rank, self.target_modules = batch_size, lr, rank, target_modules
        self.weight_decay = weight_decay
        self.val_samples, self.seed = val_samples, seed
        self._lora = False
        self.strict_loading = False  # checkpoints hold the adapters only (on_save_checkpoint)

    def configure_model(self) -> None:
        if not self._lora:
            for r in (self.reward, *self.evaluator.cross):
                r.load()
            if self.evaluator.feature_reward is not None:
                self.evaluator.feature_reward.load()
            self.base.load()
            self.requires_grad_(False)  # only the adapters train (and only they are synced under DDP)
            with torch.random.fork_rng(devices=[]):  # the adapters' random init depends on the seed only
                torch.manual_seed(self.seed)
                add_lora(self.base, self.rank, target_modules=self.target_modules)
            self._lora = True

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.base.net.parameters() if p.requires_grad]

    # -- checkpoints: the adapters and the optimiser, not the frozen weights ---------------------------
    def trainable_keys(self) -> set[str]:
        """The state-dict keys of the trained parameters (the adapters)."""
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the frozen weights (the base model, the rewards) are what the config loads anyway: a checkpoint keeps
        # only the adapters (beside the optimiser's state and Lightning's loops, which only they concern)
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # strict_loading is off (see __init__): the frozen weights are not in the checkpoint and stay as loaded;
        # the adapters must all be there, and nothing this module lacks (a checkpoint that holds every weight, as
        # tsf's did before, loads too)
        saved = set(checkpoint.get("state_dict", {}))
        missing = sorted(self.trainable_keys() - saved)
        unknown = sorted(saved - set(self.state_dict()))
        if missing or unknown:
            which = (f"no weights for {len(missing)} of the adapters' parameters (e.g. {missing[0]})" if missing else
                     f"{len(unknown)} weights this module does not have (e.g. {unknown[0]})")
            raise ConfigError(f"the checkpoint has {which}: it comes from another model or LoRA configuration "
                              "(target_modules)")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.lora_parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # -- data: the loader only ticks steps; trajectories are drawn in the step ------------------
    def train_dataloader(self) -> DataLoader:
        n = max(1, self.trainer.max_steps if self.trainer.max_steps > 0 else 1000)
        return StepTicks(range(n), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        rank, world = self.rank_and_world()
        return DataLoader(ConditionSampleIds(self.conditions, self.val_samples), batch_size=max(self.batch_size, 100),
                          sampler=ShardSampler(self.val_samples, rank, world), collate_fn=collate)

    def rank_and_world(self) -> tuple[int, int]:
        trainer = self._trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def setup(self, stage: str) -> None:
        world = self.rank_and_world()[1]
        if self.batch_size % world:
            raise ConfigError(f"batch_size ({self.batch_size}) is the global batch: it must be a multiple of the "
                              f"number of processes ({world})")

    def global_ids(self, index: Optional[int] = None) -> list[int]:
        """The trajectory ids of sampled batch ``index`` (default: this optimisation step's) over all ranks,
        a function of the index alone, so that a run resumed from a checkpoint redraws exactly the
        trajectories of the uninterrupted run."""
        k = self.global_step if index is None else int(index)
        return list(range(k * self.batch_size, (k + 1) * self.batch_size))

    def conditions_of(self, ids: list[int]) -> list:
        """The condition of each trajectory id (the conditions cycled over the ids)."""
        return [self.conditions[i % len(self.conditions)] for i in ids]

    def training_batch(self, index: Optional[int] = None) -> tuple[list, Noise]:
        """This rank's conditions and noise of sampled batch ``index`` (default: the step's): the global
        ids ``rank, rank + world, ...`` of :meth:`global_ids`."""
        rank, world = self.rank_and_world()
        ids = self.global_ids(index)[rank::world]
        return self.conditions_of(ids), Noise(self.seed + 1000003, ids, self.device)

    def draw(self, noise: Noise) -> torch.Tensor:
        """One standard normal draw of a state per trajectory (``noise.randn(1, sample_shape)``), in float64 when
        the module was made float64 (``module.double()``, for a finite-difference check); as drawn otherwise."""
        z = noise.randn(1, self.base.sample_shape)
        return z.double() if self.dtype == torch.float64 else z

    def gather_global(self, local: torch.Tensor) -> torch.Tensor:
        """The rows of every rank's ``training_batch`` in global id order (rank ``r`` holds ids ``r::world``)."""
        world = self.rank_and_world()[1]
        if world == 1:
            return local
        gathered = self.all_gather(local)  # [world, B / world, ...]
        return gathered.transpose(0, 1).reshape(-1, *local.shape[1:])

    def no_gradient_sync(self):
        """A context in which backward passes do not all-reduce (DDP's ``no_sync``; nothing on one device)."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else contextlib.nullcontext()

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (itself on one)."""
        if self.rank_and_world()[1] == 1:
            return tensor
        return self.trainer.strategy.reduce(tensor.clone(), reduce_op="sum")

    def sum_gradients_over_ranks(self) -> None:
        """Sum the adapters' gradients over the processes, in one flat all-reduce (for a step whose
        backward passes ran under ``strategy.block_backward_sync()``, each rank's loss already divided
        by the global count: the sum is then the single-process gradient)."""
        if self.rank_and_world()[1] == 1:
            return
        params = self.lora_parameters()
        flat = self.sum_over_ranks(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                              for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p).clone()

    # -- validation: the base sampler on fixed ids, the shared evaluator ---------------------
    def validation_step(self, batch, _):
        with torch.inference_mode(False), torch.no_grad():
            out = BaseSampler().sample(self.base, None, batch["conditions"], batch["sample_ids"].clone(), seed=self.seed)
            self.evaluator.update(out, self.evaluator.rewards(out, batch["conditions"]))

    def on_validation_epoch_end(self) -> None:
        metrics = {k: v for k, v in self.evaluator.compute().items() if not k.startswith("compute/")}
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False)
        self.evaluator.reset()
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:  # the curve, readable offline
            path = Path(self.trainer.default_root_dir) / "val_metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"step": self.global_step, **metrics}) + "\n")

    #: the run directory's per-step files (JSON lines with a ``step``)
    run_curves: tuple[str, ...] = ("val_metrics.jsonl",)

    def on_train_start(self) -> None:
        # a fresh run starts fresh curves; a resumed one keeps their lines up to its checkpoint's step and
        # appends (not in on_fit_start: Lightning restores the step counter after that hook)
        if self.trainer.is_global_zero:
            for name in self.run_curves:
                trim_curve(Path(self.trainer.default_root_dir) / name, self.global_step)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / "adapter"
            save_lora(self.base, path)
            print(f"LoRA adapter: {path}")
