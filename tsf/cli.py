"""The ``tsf`` command: LightningCLI subcommands plus ``tsf pretrain``.

    tsf sample --config configs/digits/best_of_n.yaml [--model.init_args.sampler.init_args.num_particles=16]
    tsf finetune --config configs/finetune/draft.yaml   (Lightning fit into runs/finetune_draft; --resume true continues it)
    tsf pretrain digits
    tsf table runs/*
    tsf compare configs/digits/*.yaml --output_dir runs/digits
    tsf bench memory
    tsf overopt
    tsf scaling configs/digits_flow/*.yaml --budgets 50 100 200 500
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from tsf.commands import COMMANDS, TOOLS, bare_flags, light_command, overview  # noqa: F401  (entry: tsf.commands.main)
from tsf.errors import ConfigError
from tsf.identity import config_variant, flatten_config, variant_suffix
from tsf.tracking import group_and_tags, new_run_id, read_run_id, resolve_mode, write_run_id

#: what a sampling run writes (a directory holding any of these but config.yaml holds a run)
RUN_FILES = ("config.yaml", "metrics.json", "samples.pt", "grid.png", "per_condition.json", "diagnostics.pt", "shards")
#: what a fine-tuning run writes
FINETUNE_FILES = ("config.yaml", "adapter", "checkpoints", "val_metrics.jsonl", "metrics.jsonl")


# ----------------------------------------------------------------------------- run directory
def _holds(path: Path) -> bool:
    """A run's file, or a folder of its with anything in it."""
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def prepare_run_dir(run_dir: Path, overwrite: bool, resume: bool = False, files: tuple[str, ...] = RUN_FILES) -> None:
    """Refuse a directory that holds another run, unless ``overwrite`` (start again) or ``resume``
    (keep what it holds: verified shards, or a fine-tuning run's last checkpoint). ``files`` are what a
    run writes there."""
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output path {run_dir} exists and is not a directory")
    # a run that wrote only its config (it failed before any batch, e.g. on a bad model path) holds nothing
    # to lose: the same command runs again
    started = run_dir.is_dir() and any(_holds(run_dir / name) for name in files if name != "config.yaml")
    if started and not resume:
        if not overwrite:
            raise ConfigError(
                f"{run_dir} already holds a run; choose another --run_name or --output_dir, "
                "pass --resume true to finish it, or --overwrite true to replace it"
            )
        for name in files:
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


#: a default run name's length, past which its variant shows the settings that fit and a hash
RUN_NAME_LEN = 80


def default_run_name(name: str, variant: Union[str, dict] = "") -> str:
    """``name``, then ``variant`` (what the command line changed: a suffix, or the settings themselves, shown
    by :func:`tsf.identity.variant_suffix` within :data:`RUN_NAME_LEN` characters in all), made unique per run
    of a wandb sweep (whose runs differ in more than a name shows)."""
    if isinstance(variant, dict):
        variant = variant_suffix(variant, max(24, RUN_NAME_LEN - len(name) - 1))
    name = "_".join(filter(None, (name, variant)))
    if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
        return f"{name}_{os.environ['WANDB_RUN_ID']}"
    return name


#: the sections of a config that decide what a run samples
SAMPLE_KEYS = ("model", "data", "seed_everything")


#: settings whose value, where it names an existing file or folder, is a path even without a ``/`` or a suffix
PATH_KEYS = {"pretrained", "adapter", "model", "head", "path", "prompts", "ckpt_path", "weights", "checkpoint"}


def absolute_paths(config: Any, key: str = "") -> Any:
    """``config`` (a jsonargparse ``Namespace``, changed in place, or plain dicts and lists) with each
    setting that names an existing relative file or folder made absolute, so that ``config.yaml`` still
    names the same prompt file, adapter or checkpoint from any working directory. A value counts as a
    path when it exists and has a ``/`` or a suffix, is a file, or is the value of a :data:`PATH_KEYS` setting;
    hub names and registered names that are no local path stay as they are."""
    from jsonargparse import Namespace

    if isinstance(config, Namespace):
        for k, v in vars(config).items():
            if k not in ("class_path", "config", "__path__"):
                setattr(config, k, absolute_paths(v, k))
        return config
    if isinstance(config, dict):
        return {k: v if k in ("class_path", "config") else absolute_paths(v, k) for k, v in config.items()}
    if isinstance(config, list):
        return [absolute_paths(v, key) for v in config]
    if isinstance(config, str) and config and not os.path.isabs(config) and "\n" not in config:
        if key == "prompts":
            from tsf.data.prompts import shipped_sets

            if config in shipped_sets():  # a shipped set's name comes first, as the prompt loader reads it
                return config
        path = Path(os.path.expanduser(config))
        try:
            exists = path.exists()
        except OSError:  # a name too long to be a path
            return config
        if exists and ("/" in config or path.suffix or path.is_file() or key in PATH_KEYS):
            return str(path.resolve())
    return config


def check_same_run(run_dir: Path, config: Optional[dict]) -> None:
    """On ``--resume``, refuse a run directory whose ``config.yaml`` asks for other samples (another
    model, sampler, reward or data section) than ``config``: its shards would be mixed into this run."""
    import yaml

    saved = run_dir / "config.yaml"
    if config is None or not saved.is_file():
        return
    # a run written with relative paths compares as the absolute paths they name from here
    old = absolute_paths(yaml.safe_load(saved.read_text()) or {})
    old = {k: v for k, v in flatten_config(old).items() if k.split(".")[0] in SAMPLE_KEYS}
    new = {k: v for k, v in flatten_config(config).items() if k.split(".")[0] in SAMPLE_KEYS}
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in differ[:4])
        more = f" (and {len(differ) - 4} more)" if len(differ) > 4 else ""
        raise ConfigError(f"{run_dir} holds a run of another config ({shown}{more}); --resume finishes the same "
                          "run only: choose another --run_name or --output_dir, or pass --overwrite true to replace it")


def save_grid(images: torch.Tensor, path: Path, conditions: Optional[list] = None, max_images: int = 64,
              cols: int = 8, min_size: int = 64, max_rows: int = 16):
    """A PNG grid of uint8 images ``[N, C, H, W]`` that a person can read: small images are enlarged
    (nearest) to at least ``min_size`` px, a white gap separates them, and when ``conditions`` (one per
    image: a class or a prompt) are given, each row holds one condition's images with the condition
    written beside it (at most ``max_rows`` conditions); otherwise at most ``max_images`` images, ``cols``
    per row. Returns the PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    H, W = images.shape[2], images.shape[3]
    scale = max(1, -(-min_size // max(H, W)))
    h, w = H * scale, W * scale
    gap = max(2, w // 16)
    if conditions is not None and any(c is not None for c in conditions):
        groups: dict = {}
        for j, c in enumerate(conditions):
            key = c if c is None or isinstance(c, (int, float, str)) else repr(c)  # a user's condition may not hash
            groups.setdefault(key, [])
            if len(groups[key]) < cols:
                groups[key].append(j)
        rows = list(groups.items())[:max_rows]
    else:
        idx = list(range(min(len(images), max_images)))
        rows = [(None, idx[k:k + cols]) for k in range(0, len(idx), cols)]
    try:
        font = ImageFont.load_default(size=max(10, min(h // 4, 24)))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    labels = ["" if c is None else f"class {c}" if isinstance(c, int) else
              (str(c) if len(str(c)) <= 40 else str(c)[:39] + "…") for c, _ in rows]
    label_w = max((int(font.getlength(t)) for t in labels), default=0)
    label_w = label_w + 2 * gap if label_w else 0
    ncols = max(len(r) for _, r in rows)
    canvas = Image.new("RGB", (label_w + ncols * (w + gap) + gap, len(rows) * (h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for r, ((c, members), text) in enumerate(zip(rows, labels)):
        top = gap + r * (h + gap)
        if text:
            draw.text((gap, top + h // 2), text, fill="black", font=font, anchor="lm")
        for k, j in enumerate(members):
            arr = images[j].permute(1, 2, 0).numpy()
            im = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
            canvas.paste(im.resize((w, h), Image.NEAREST), (label_w + gap + k * (w + gap), top))
    canvas.save(path)
    return canvas


def write_run_dir(run_dir: Path, results: dict[str, Any]) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(results["metrics"], indent=2, sort_keys=True))
    if len(results.get("per_condition", {})) > 1:  # the per-prompt (per-class) breakdown
        (run_dir / "per_condition.json").write_text(json.dumps(results["per_condition"], indent=2))
    from tsf.lightning.sampling import write_samples

    samples, conditions = write_samples(run_dir, results["samples"], results.get("conditions"),
                                        written=results.get("samples_written", False))
    if "images" in samples:
        save_grid(samples["images"], run_dir / "grid.png", conditions)


def load_samples(run_dir: Path) -> dict[str, Any]:
    """Read a run's ``samples.pt`` safely (tensors only, no arbitrary pickle)."""
    return torch.load(Path(run_dir) / "samples.pt", weights_only=True, map_location="cpu")


def run_identity(config: dict, method: str) -> tuple[str, list[str]]:
    """A run's wandb ``group`` (``<config folder>/<config name>``, e.g. ``digits/das``) and ``tags``
    (the config folder, the config name, the sampler and the reward) from its resolved config."""
    configs = [str(c) for c in (config.get("config") or []) if c is not None]
    domain = Path(configs[-1]).parent.name if configs else ""
    init = (config.get("model") or {}).get("init_args") or {}
    sampler = str((init.get("sampler") or {}).get("class_path") or "").rsplit(".", 1)[-1]
    reward = init.get("reward")
    reward = str(reward.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(reward, dict) else str(reward or "")
    group = f"{domain}/{method}" if domain else method
    return group, [t for t in dict.fromkeys((domain, method, sampler, reward)) if t]


def without_noise(logger, one_point: bool = False):
    """A ``WandbLogger`` that does not pass wandb the ``anonymous`` setting it warns about (Lightning passes
    ``None``, which wandb counts as set), and, for a run that logs one point (``one_point``: a sampling run's
    metrics), prints no "Run history" of one-point sparklines at its end (wandb's own setting)."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict):
        if init.get("anonymous") is None:
            init.pop("anonymous", None)
        if one_point and "settings" not in init:
            import wandb

            init["settings"] = wandb.Settings(max_end_of_run_history_metrics=0)
    return logger


def wandb_logger(run_dir: Path, name: str, project: Optional[str], mode: str, config: Optional[dict] = None,
                 method: Optional[str] = None, run_id: Optional[str] = None, resume: bool = False):
    """Lightning's WandbLogger for one run: its resolved ``config`` (flattened, as sweeps name it), a group
    and tags from it; the project is ``project``, else ``WANDB_PROJECT``, else ``tsf``; the wandb run's id is
    ``run_id`` (``resume``: continue it)."""
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_mode(mode)  # auto: online when wandb's own lookup finds credentials for its server
    extra: dict[str, Any] = {"id": run_id, **({"resume": "allow"} if resume else {})} if run_id else {}
    if config is not None:
        group, tags = group_and_tags(*run_identity(config, method or name))  # a sweep's runs: its group
        extra.update({"config": flatten_config(config), "group": group, "tags": tags})
    return WandbLogger(name=name, project=project or os.environ.get("WANDB_PROJECT") or "tsf", save_dir=str(run_dir),
                       offline=mode != "online", mode=mode if mode in ("online", "offline", "disabled") else None,
                       **extra)


def log_to_wandb(logger, results: dict[str, Any], grid) -> None:
    """The grid image and a per-sample table (scalars were logged by the module)."""
    import wandb

    samples = results["samples"]
    names = list(samples["rewards"])
    conditions = results.get("conditions") or [None]
    if grid is not None:
        logger.log_image(key="grid", images=[grid])
    rows = []
    for j, sid in enumerate(samples["sample_id"].tolist()):
        cond = conditions[sid % len(conditions)]
        row = [sid, "" if cond is None else str(cond)] + [float(samples["rewards"][n][j]) for n in names]
        if "images" in samples:
            im = samples["images"][j].permute(1, 2, 0).numpy()
            row.append(wandb.Image(im[..., 0] if im.shape[-1] == 1 else im))
        rows.append(row)
    columns = ["sample_id", "condition", *names] + (["image"] if "images" in samples else [])
    logger.log_table(key="samples", columns=columns, data=rows)


# ----------------------------------------------------------------------------- trainer + CLI
def steps_progress_bar():
    """tsf's progress bar (:class:`tsf.lightning.progress.SamplingBar`: Lightning's rich bar with the progress
    inside a batch, "Sampling", a fine-tuning run labelled by its steps); ``None`` without ``rich``."""
    from tsf.lightning.progress import SamplingBar

    return None if SamplingBar is None else SamplingBar()


class TsfTrainer(Trainer):
    """A Lightning ``Trainer`` with the ``sample`` subcommand."""

    run_dir: Optional[Path] = None
    #: method name for default run names (the config file's stem, set by the CLI), the config's folder, and
    #: the run-name suffix of the settings the command line changed (:func:`variant_suffix`)
    method_name: Optional[str] = None
    config_folder: Optional[str] = None
    variant: str = ""
    variant_settings: Optional[dict] = None
    #: the resolved config (what config.yaml holds), set by the CLI
    run_config: Optional[dict] = None

    def __init__(self, *args, **kwargs) -> None:
        # a run shorter than its validation interval validates at its end instead of failing
        max_steps, every = kwargs.get("max_steps"), kwargs.get("val_check_interval")
        if isinstance(max_steps, int) and max_steps > 0 and isinstance(every, int) and every > max_steps:
            kwargs["val_check_interval"] = max_steps
        if isinstance(max_steps, int) and max_steps > 0 and kwargs.get("log_every_n_steps", 50) > max_steps:
            kwargs["log_every_n_steps"] = max_steps  # a short run logs its steps (no Lightning note about it)
        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if kwargs.get("enable_progress_bar", True) is not False and not any(
                type(cb).__name__.endswith("ProgressBar") for cb in callbacks):
            bar = steps_progress_bar()
            if bar is not None:
                kwargs["callbacks"] = [*callbacks, bar]
        super().__init__(*args, **kwargs)

    def sample(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        output_dir: str = "runs",
        run_name: Optional[str] = None,
        overwrite: bool = False,
        resume: bool = False,
        wandb_project: Optional[str] = None,
        wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto",
    ) -> dict[str, Any]:
        """Sample with the configured sampler, evaluate, and write the run directory.

        Args:
            output_dir: parent of the run directory.
            run_name: the run directory's name (default: ``<config name>_K<K>_<reward>_seed<seed>``, then
                each setting the command line changed from the config file, e.g. ``_alpha=1.0``).
            overwrite: replace a run already in the run directory.
            resume: finish a stopped run: batches whose shards verify are not sampled again.
            wandb_project: Weights & Biases project (default: ``WANDB_PROJECT``, else ``tsf``).
            wandb_mode: ``auto`` is online when wandb finds credentials for its server, else offline.
        """
        if datamodule is None:
            raise ConfigError("tsf sample needs a data module: set data.class_path (e.g. tsf.lightning.SampleIdsDataModule)")
        model.check_conditions(datamodule.sample_conditions())  # before any directory or weight file
        name = run_name or default_run_name(model.run_name(datamodule.seed, self.method_name),
                                                  self.variant_settings or self.variant)
        run_dir = self.open_run(output_dir, name, overwrite, resume, RUN_FILES, wandb_project, wandb_mode,
                                logs_at_end=True)
        try:
            self.test(model, datamodule=datamodule, verbose=False)
        except BaseException as err:
            self.end_wandb(INTERRUPTED if self.interrupted else 1)
            if isinstance(err, SystemExit) and self.interrupted:
                done = len(list((run_dir / "shards").glob("*.safetensors")))
                self.interrupted_run(run_dir, f"{done} finished batches are kept in {run_dir / 'shards'}")
            raise
        results = model.results
        if self.is_global_zero:
            from tsf.lightning.progress import results_table

            print(results_table(name, results.get("metrics", {})))
            b = results.get("batches", {})
            if resume and b.get("reused"):  # a fresh run under --resume (tsf compare's) read nothing back: no line
                print(f"resumed: {b.get('reused', 0)} of {b.get('reused', 0) + b.get('sampled', 0)} batches read "
                      f"from {run_dir / 'shards'} (checksums verified), {b.get('sampled', 0)} sampled")
            write_run_dir(run_dir, results)
            grid_path = run_dir / "grid.png"
            for logger in self.loggers:
                if type(logger).__name__ == "WandbLogger":
                    from PIL import Image

                    log_to_wandb(logger, results, Image.open(grid_path) if grid_path.exists() else None)
            self.end_wandb(0)
            print(f"run directory: {run_dir}")
        return results

    def end_wandb(self, exit_code: int) -> None:
        """Finish the run's wandb run, if one was started: a failed or interrupted run too, so that the next run
        in the same process (a notebook, a test) starts its own instead of logging into this one (Lightning's
        WandbLogger reuses an unfinished ``wandb.run``)."""
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
                logger.experiment.finish(exit_code=exit_code)

    def open_run(self, output_dir: str, run_name: str, overwrite: bool, resume: bool, files: tuple[str, ...],
                 wandb_project: Optional[str], wandb_mode: str, logs_at_end: bool = False) -> Path:
        """The run directory ``output_dir/run_name``, prepared (refused if it holds another run unless
        ``resume`` or ``overwrite``), and the wandb logger writing into it when none is configured (a resumed
        run continues its wandb run; ``logs_at_end``: the run logs only when it ends, so an interrupted
        attempt's offline folder holds nothing and is removed)."""
        run_dir = Path(output_dir) / run_name
        if self.is_global_zero:
            prepare_run_dir(run_dir, overwrite, resume, files)
            if resume:
                check_same_run(run_dir, self.run_config)
        self.run_dir = run_dir
        self._default_root_dir = str(run_dir)  # what Lightning and the modules write beside the run's files
        if not self.loggers and wandb_mode != "disabled":
            run_id = read_run_id(run_dir) if resume else None  # the wandb run an earlier attempt started
            continued = run_id is not None
            if run_id is None:
                run_id = new_run_id()
                if self.is_global_zero:
                    write_run_id(run_dir, run_id)
            elif logs_at_end and self.is_global_zero:  # its offline folders hold nothing: the run logs at its end
                for folder in (run_dir / "wandb").glob(f"offline-run-*-{run_id}*"):
                    shutil.rmtree(folder, ignore_errors=True)
            self.loggers = [without_noise(wandb_logger(run_dir, run_name, wandb_project, wandb_mode, self.run_config,
                                                       self.method_name, run_id, resume=continued),
                                          one_point=logs_at_end)]
        return run_dir

    def interrupted_run(self, run_dir: Path, how: str) -> None:
        """After Ctrl-C (Lightning's graceful stop), say what was kept and the command that continues; the
        process ends with 130, the code of an interrupted command."""
        if self.is_global_zero:
            print(f"\ntsf: interrupted; {how}. Continue it with:\n  {resume_command()}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED)

    def finetune(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        output_dir: str = "runs",
        run_name: Optional[str] = None,
        overwrite: bool = False,
        resume: bool = False,
        ckpt_path: Optional[str] = None,
        wandb_project: Optional[str] = None,
        wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto",
    ) -> None:
        """Fine-tune a LoRA baseline (Lightning fit) into one run directory.

        The run directory ``output_dir/run_name`` holds everything: ``config.yaml``, ``checkpoints/``
        (the adapters and the optimiser), ``adapter/``, ``val_metrics.jsonl`` and the wandb run.

        Args:
            output_dir: parent of the run directory.
            run_name: the run directory's name (default: ``<config folder>_<config name>``, e.g.
                ``finetune_ddpo`` for ``configs/finetune/ddpo.yaml``, then each setting the command line
                changed from the config file, e.g. ``_rank=8``; a wandb sweep's run adds its run id).
            overwrite: replace a run already in the run directory.
            resume: continue the run in the run directory from its ``checkpoints/last.ckpt`` (a finished
                run stays as it is).
            ckpt_path: start from this Lightning checkpoint instead (e.g. another run's).
            wandb_project: Weights & Biases project (default: ``WANDB_PROJECT``, else ``tsf``).
            wandb_mode: ``auto`` is online when wandb finds credentials for its server, else offline.
        """
        from lightning.pytorch.callbacks import ModelCheckpoint

        method = self.method_name or type(model).__name__.lower()
        name = run_name or default_run_name(f"{self.config_folder or 'finetune'}_{method}",
                                                  self.variant_settings or self.variant)
        run_dir = self.open_run(output_dir, name, overwrite, resume, FINETUNE_FILES, wandb_project, wandb_mode)
        for cb in self.callbacks:
            if isinstance(cb, ModelCheckpoint):
                cb.dirpath = str(run_dir / "checkpoints")
        last = run_dir / "checkpoints" / "last.ckpt"
        if ckpt_path is None and resume and last.is_file():
            ckpt_path = str(last)
        if ckpt_path is not None:
            print(f"resuming from {ckpt_path}")
        elif resume:
            print(f"resume: {last} does not exist; training starts from step 0")
        try:
            self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except BaseException as err:
            self.end_wandb(INTERRUPTED if self.interrupted else 1)
            if isinstance(err, SystemExit) and self.interrupted:
                kept = f"the last checkpoint is {last}" if last.is_file() else (
                    "no checkpoint was written yet (ModelCheckpoint's every_n_train_steps): the run starts again")
                self.interrupted_run(run_dir, f"stopped at step {self.global_step}; {kept}")
            raise
        self.end_wandb(0)
        if self.is_global_zero:
            print(f"run directory: {run_dir}")


def keep_every_key(parser) -> dict[str, bool]:
    """The keyword of ``parser.save`` that writes every key, null ones too: ``skip_unset=False`` (jsonargparse
    4.49 on), else ``skip_none=False`` (which 4.49 deprecates)."""
    import inspect

    save = getattr(type(parser), "_unpatched_save", type(parser).save)
    return {"skip_unset": False} if "skip_unset" in inspect.signature(save).parameters else {"skip_none": False}


class RunDirConfig(SaveConfigCallback):
    """Writes the resolved config into the run directory (not the logger's directory)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer, pl_module, stage) -> None:
        run_dir = getattr(trainer, "run_dir", None)
        if run_dir is not None:
            self.parser.save(self.config, str(Path(run_dir) / self.config_filename), overwrite=True, multifile=False,
                             **keep_every_key(self.parser))


#: the arguments of this process's tsf command (set by :func:`main`)
COMMAND_LINE: list[str] = []
#: the exit code of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130
#: set by a tool that runs tsf commands (tsf sweep, compare, scaling): the command that continues the whole
RESUME_ENV = "TSF_RESUME_COMMAND"


def resume_command(argv: Optional[list[str]] = None) -> str:
    """The command that continues this run: the same arguments, ``--overwrite`` dropped, ``--resume true``."""
    import shlex

    if argv is None and os.environ.get(RESUME_ENV):
        return os.environ[RESUME_ENV]
    args, out, skip = list(COMMAND_LINE if argv is None else argv), [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in ("--overwrite", "--resume"):
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        if a.startswith(("--overwrite=", "--resume=")):
            continue
        out.append(a)
    return shlex.join(["tsf", *out, "--resume", "true"])


def known_names() -> str:
    from tsf.rewards import REWARDS
    from tsf.samplers import SAMPLERS

    samplers = ", ".join(f"{n} (tsf.samplers.{SAMPLERS.get(n).__name__})" for n in SAMPLERS.names())
    return (f"known samplers: {samplers}\n"
            f"known rewards (a name, or a class_path to a tsf.rewards.Reward): {', '.join(REWARDS.names())}")


def unresolved_class_path(message: str) -> Optional[tuple[str, str]]:
    """The first class path named in a parser message that does not import, with why (the import's own
    error: a module that is not on the path, or an error inside it)."""
    import importlib
    import re

    for path in re.findall(r"class_path '([^']+)'", message) + re.findall(r"import path string: (\S+)", message):
        module, _, attr = path.rpartition(".")
        try:
            getattr(importlib.import_module(module), attr)
        except Exception as err:  # the module's own errors too: they are the user's to see
            return path, f"{type(err).__name__}: {err}"
    return None


def import_error_message(path: str, cause: str) -> str:
    """What ``tsf`` says about a class path that does not import."""
    lines = [f"cannot import class_path {path!r} ({cause})"]
    if path.startswith("tsf."):
        lines.append(known_names())
    else:
        lines.append("a class of your own must be in an importable module: run tsf from the folder that holds it "
                     "(tsf adds the working directory to the import path), put that folder on PYTHONPATH, or "
                     "install it")
    return "\n".join(lines)


def config_error_message(text: str) -> Optional[str]:
    """The plain message of a :class:`ConfigError` that a parser wrapped into ``text``."""
    return next((m for m in reversed(ConfigError.raised) if m in text), None)


def parser_error_line(message: str) -> str:
    """The one useful line of a nested jsonargparse error: the path of keys down to the innermost problem
    and what was expected there (``model.sampler.resampler: Expected a typing.Literal[...]. Got value: foo``)."""
    import re

    keys, problem = [], None
    for line in (x.strip() for x in message.splitlines()):
        key = re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            if key.group(2):
                problem = key.group(2)
                break
        elif line and not line.startswith(("Does not validate", "Subtypes:", "Errors:", "- Problem with", "Problem with",
                                           "- Expected a <class 'NoneType'>", "Given value")):
            problem = line.lstrip("- ")
            break
    if problem is None:
        return " ".join(x.strip() for x in message.strip().splitlines()[:2])
    return f"{'.'.join(keys)}: {problem}" if keys else problem


def near_miss(message: str, options: list[str] = ()) -> Optional[str]:
    """``did you mean ...?`` for an unknown key in a parser message: an ``Option 'x' is not accepted`` under a
    class (its constructor's parameters, the innermost ``class_path`` named before it), or an unrecognized
    ``--section.key`` among ``options`` (the parser's own)."""
    import difflib
    import importlib
    import inspect
    import re

    unknown = re.search(r"Option '([^']+)' is not accepted", message)
    if unknown:
        before = message[:unknown.start()]
        paths = re.findall(r"class_path '([^']+)'", before)
        if not paths:
            return None
        module, _, attr = paths[-1].rpartition(".")
        try:
            params = list(inspect.signature(getattr(importlib.import_module(module), attr)).parameters)
        except Exception:  # a class that does not import is said elsewhere
            return None
        key = unknown.group(1).split(".")[-1]
        found = difflib.get_close_matches(key, [p for p in params if p not in ("self", "args", "kwargs")], n=1)
        return f"did you mean {found[0]}?" if found else None
    unrecognized = re.search(r"unrecognized arguments: (--[^\s=]+)", message)
    if unrecognized:
        found = difflib.get_close_matches(unrecognized.group(1), [o for o in options if o.startswith("--")], n=1)
        return f"did you mean {found[0]}?" if found else None
    return None


class TsfArgumentParser(LightningArgumentParser):
    """Reports configuration errors in one line (no page of usage before it); names the known samplers
    and rewards."""

    def error(self, message: str, *args, **kwargs):
        if getattr(self, "exit_on_error", True):
            plain = config_error_message(message)
            if plain is not None:
                self.exit(2, f"tsf: error: {plain}\n")
            unresolved = unresolved_class_path(message)
            if unresolved is not None:
                self.exit(2, f"tsf: error: {import_error_message(*unresolved)}\n")
            prog = self.prog.replace(" [options]", "")
            hint = near_miss(message, list(getattr(self, "_option_string_actions", {})))
            line = parser_error_line(message) + (f" ({hint})" if hint else "")
            self.exit(2, f"tsf: error: {line}\n(`{prog} --help` lists the options)\n")
        return super().error(message, *args, **kwargs)


def run_dir_settings(config: dict) -> list[str]:
    """The settings of a fine-tuning config that would place files outside its run directory (which
    ``tsf finetune`` derives once, from ``--output_dir`` and ``--run_name``)."""
    trainer = config.get("trainer") or {}
    found = ["trainer.default_root_dir"] if trainer.get("default_root_dir") else []
    for i, cb in enumerate(trainer.get("callbacks") or []):
        if isinstance(cb, dict) and (cb.get("init_args") or {}).get("dirpath"):
            found.append(f"trainer.callbacks[{i}].init_args.dirpath")
    loggers = trainer.get("logger")
    for i, lg in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        if isinstance(lg, dict) and (lg.get("init_args") or {}).get("save_dir"):
            found.append("trainer.logger.init_args.save_dir")
    return found


def bool_options(parser) -> set[str]:
    """The option strings of a subcommand parser's yes/no options: those typed ``bool`` (or a union with it),
    and the Trainer's (whose types jsonargparse may leave unresolved)."""
    import typing

    def takes_bool(hint) -> bool:
        return hint is bool or (typing.get_origin(hint) is typing.Union and bool in typing.get_args(hint))

    trainer = {f"--trainer.{k}" for k, hint in typing.get_type_hints(Trainer.__init__).items() if takes_bool(hint)}
    return {s for a in parser._actions if a.nargs is None for s in a.option_strings
            if takes_bool(getattr(a, "_typehint", None)) or s in trainer}


def nested_bool_flags(parser, sub, argv: list[str]) -> set[str]:
    """The yes/no options among the bare ``--model.…``/``--data.…`` options of ``argv``: those of the chosen
    classes (a sampler's, a model's), which the parser knows only once it has read the config. Each is tried
    as ``=true`` in a parse that prints nothing, and kept where the value parsed is the bool ``True`` (a
    non-bool option keeps its own error)."""
    known = {s for a in sub._actions for s in a.option_strings}
    bare = {a for i, a in enumerate(argv) if a.startswith(("--model.", "--data.")) and "=" not in a and a not in known
            and (i + 1 == len(argv) or argv[i + 1].startswith("-"))}
    if not bare:
        return set()
    trial = [a for a in bare_flags(argv, bare) if not a.startswith(("--print_config", "-h", "--help"))]
    errors = [(p, getattr(p, "exit_on_error", True)) for p in (parser, sub)]
    try:
        for p, _ in errors:
            p.exit_on_error = False
        config = parser.parse_args(trial)
        return {a for a in bare if config.get(f"{argv[0]}.{a[2:]}") is True}
    except Exception:  # the options' own error comes from the real parse
        return set()
    finally:
        for p, before in errors:
            p.exit_on_error = before


class TsfCLI(LightningCLI):
    def _name_run(self, subcommand: str) -> None:
        configs = self.config[subcommand].get("config") or []
        self.trainer.run_config = self.config[subcommand].as_dict()
        if configs:
            self.trainer.method_name = Path(str(configs[-1])).stem
            self.trainer.config_folder = Path(str(configs[-1])).resolve().parent.name
            # what the command line changed from the config files: a part of the default run name
            files = [a for c in configs for a in ("--config", str(c))]
            file_config = self._subcommand_parsers[subcommand].parse_args(files).as_dict()
            self.trainer.variant_settings = config_variant(self.trainer.run_config, file_config)
            self.trainer.variant = variant_suffix(self.trainer.variant_settings)
        # the config that config.yaml holds (and wandb's), its paths absolute
        absolute_paths(self.config[subcommand])
        self.trainer.run_config = self.config[subcommand].as_dict()

    def _check_command(self, subcommand: str) -> None:
        """A sampling config given to ``tsf finetune``, or a fine-tuning config to ``tsf sample``: one line
        naming the command the config is for."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        from tsf.lightning.sampling import SamplingModule

        model = self.model
        name = f"{type(model).__module__}.{type(model).__name__}"
        config = " ".join(str(c) for c in (self.config[subcommand].get("config") or [])) or "this config"
        if subcommand == "sample" and not isinstance(model, SamplingModule):
            other = "tsf finetune" if type(model).__module__.startswith("baselines") else "tsf fit"
            raise ConfigError(f"{config} is a training config (model: {name}), not a sampling one: run it with "
                              f"`{other} --config {config}`")
        if subcommand == "finetune" and not is_overridden("training_step", model):
            other = "tsf sample" if isinstance(model, SamplingModule) else "tsf test"
            raise ConfigError(f"{config} is a sampling config (model: {name}), which trains nothing: run it with "
                              f"`{other} --config {config}`")

    def before_sample(self) -> None:
        self._check_command("sample")
        self._name_run("sample")

    def before_finetune(self) -> None:
        self._check_command("finetune")
        self._name_run("finetune")
        found = run_dir_settings(self.trainer.run_config)
        if found:
            raise ConfigError(f"tsf finetune derives the run directory from --output_dir and --run_name: remove "
                              f"{', '.join(found)} from the config")

    def parse_arguments(self, parser, args) -> None:
        """Lightning's parsing, after writing each yes/no option given bare (``--overwrite``) or with a
        separate value as ``--overwrite=true`` (:func:`tsf.commands.bare_flags`): tsf's one flag style."""
        if args is None or isinstance(args, (list, tuple)):
            argv = list(sys.argv[1:] if args is None else args)
            sub = parser._subcommands_action._name_parser_map.get(argv[0]) if argv else None
            fixed = bare_flags(argv, bool_options(sub)) if sub is not None else argv
            fixed = bare_flags(fixed, nested_bool_flags(parser, sub, fixed)) if sub is not None else fixed
            if fixed != argv:
                self.config = parser.parse_args(fixed)
                return
        super().parse_arguments(parser, args)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "sample": {"model", "datamodule"}, "finetune": {"model", "datamodule"}}


def quiet_known_noise() -> None:
    """Silence what every run printed and no user can act on: Lightning's litlogger tip, the pytree
    deprecation that Lightning's own code triggers, the advice to sync metrics that torchmetrics has
    already synced (tsf logs them with ``sync_dist=False`` on purpose), and the note that a fine-tuning
    run's frozen parts (rewards, VAE, base weights) are in eval mode, which they are meant to be; and
    transformers' note that an image processor uses its PIL backend where torchvision is not installed."""
    import logging
    import warnings

    for pattern in (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                    r"It is recommended to use `self\.log\(.*sync_dist=True",
                    r"Found \d+ module\(s\) in eval mode at the start of training"):
        warnings.filterwarnings("ignore", message=pattern)
    # transformers' note that an image processor falls back to its PIL backend without torchvision (tsf
    # reads images with PIL on purpose; nothing to change)
    for logger, text in (("transformers.utils.import_utils", "requires torchvision (not installed)"),
                         ("lightning.pytorch.utilities.rank_zero", "litlogger")):
        log = logging.getLogger(logger)
        if not any(getattr(f, "tsf", False) for f in log.filters):  # once per process
            drop = logging.Filter()
            drop.filter = lambda record, text=text: text not in record.getMessage()  # type: ignore[method-assign]
            drop.tsf = True  # type: ignore[attr-defined]
            log.addFilter(drop)


def main(argv: Optional[list[str]] = None) -> None:
    from_sys = argv is None
    argv = sys.argv[1:] if from_sys else list(argv)
    COMMAND_LINE[:] = argv
    if light_command(argv):  # help, the version, the tools, an early config error (tsf.commands)
        return
    quiet_known_noise()
    if os.getcwd() not in sys.path:  # a user's reward or sampler module beside the config, as `python -m` finds it
        sys.path.append(os.getcwd())
    import tsf.rewards  # noqa: F401  (registers rewards)
    import tsf.samplers  # noqa: F401

    try:
        TsfCLI(
            LightningModule,
            None,  # data is optional: the value trainer serves its own rollouts
            trainer_class=TsfTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunDirConfig,
            trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                              "inference_mode": False, "use_distributed_sampler": False},
            args=None if from_sys else argv,
            parser_class=TsfArgumentParser,
            auto_configure_optimizers=False,
            seed_everything_default=0,
        )
    except KeyboardInterrupt:  # Ctrl-C outside Lightning's graceful stop (loading, parsing, writing)
        print(f"\ntsf: interrupted. Run it again with:\n  {resume_command()}", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED)
    except MisconfigurationException as err:  # Lightning's own configuration errors: one line, not a traceback
        hint = ""
        if "gpu" in str(err).lower():
            hint = ("; this config asks for a GPU (trainer.accelerator: gpu) and this machine has none: run it on a "
                    "GPU machine, or pass --trainer.accelerator=cpu (slow for real models)")
        print(f"tsf: error: {err}{hint}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        from tsf.samplers.smc import NonFiniteRewardError

        if not isinstance(err, NonFiniteRewardError):
            raise
        print(f"tsf: error: {err}", file=sys.stderr)
        sys.exit(1)
    except ValueError as err:  # ConfigError, or jsonargparse's error wrapping one
        plain = config_error_message(str(err))
        if plain is None:
            raise
        print(f"tsf: error: {plain}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
