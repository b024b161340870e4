"""`tsf sample` as a user runs it: run directory, determinism, wandb, and clear errors."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tsf.models.digits as D
from tsf.cli import load_samples, main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/digits/best_of_n.yaml")
SMALL = ["--data.init_args.num_samples=24", "--data.init_args.batch_size=10",
         "--model.init_args.fidelity_samples=64", "--model.init_args.base.init_args.num_steps=10",
         "--model.init_args.sampler.init_args.num_particles=4", "--trainer.enable_progress_bar=false"]


def run(tmp_path, *extra, name="run", wandb="disabled"):
    main(["sample", "--config", CONFIG, *SMALL, f"--output_dir={tmp_path}", f"--run_name={name}",
          f"--wandb_mode={wandb}", *extra])
    return tmp_path / name


def test_sample_writes_the_run_directory(tmp_path, capsys):
    d = run(tmp_path)
    assert {"config.yaml", "metrics.json", "samples.pt", "grid.png"} <= {p.name for p in d.iterdir()}
    metrics = json.loads((d / "metrics.json").read_text())
    for key in ("target/mean", "target/median", "target/q90", "cross/digit_holdout/mean", "diversity/pairwise",
                "diversity/vendi", "fidelity/fd", "compute/nfe", "compute/nfe_grad", "compute/reward_calls",
                "compute/seconds"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not nan
    assert metrics["compute/nfe"] == 4 * 10 and metrics["compute/reward_calls"] == 4
    s = load_samples(d)
    assert s["sample_id"].tolist() == list(range(24))
    assert s["images"].dtype == torch.uint8 and s["images"].shape == (24, 1, 8, 8)
    assert s["x0"].shape == (24, 1, 8, 8)
    assert set(s["rewards"]) == {"digit", "digit_holdout"}
    assert abs(s["rewards"]["digit"].double().mean().item() - metrics["target/mean"]) < 1e-5
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["model"]["init_args"]["sampler"]["init_args"]["num_particles"] == 4
    out = capsys.readouterr().out
    assert "target/mean" in out and "run directory" in out  # the metrics table was printed


def test_same_seed_gives_identical_samples_whatever_the_batch_size(tmp_path):
    a = load_samples(run(tmp_path, name="a"))
    b = load_samples(run(tmp_path, name="b"))
    c = load_samples(run(tmp_path, "--data.init_args.batch_size=7", name="c"))
    d = load_samples(run(tmp_path, "--data.init_args.seed=1", name="d"))
    for other in (b, c):
        assert torch.equal(a["x0"], other["x0"]) and torch.equal(a["images"], other["images"])
        assert torch.equal(a["rewards"]["digit"], other["rewards"]["digit"])
    assert not torch.equal(a["x0"], d["x0"])


def test_wandb_offline_run_has_the_metrics_the_config_and_the_grid(tmp_path, monkeypatch):
    from wandb_log import read_config, read_run

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    d = run(tmp_path, wandb="offline")
    metrics = json.loads((d / "metrics.json").read_text())
    # the resolved config, flattened as sweeps name its keys, with a group and tags to filter by
    config, info = read_config(d)
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert config["model.init_args.sampler.init_args.num_particles"] == 4
    assert config["model.init_args.sampler.class_path"] == saved["model"]["init_args"]["sampler"]["class_path"]
    assert config["data.init_args.num_samples"] == saved["data"]["init_args"]["num_samples"] == 24
    assert info["group"] == "digits/best_of_n" and {"digits", "best_of_n", "BestOfN", "digit"} <= set(info["tags"])
    assert info["project"] == "tsf"
    assert info["id"] == (d / "wandb_run_id").read_text().strip()  # the run directory names its wandb run
    history, summary, files = read_run(d)
    for key, value in metrics.items():
        assert summary[key] == pytest.approx(value, rel=1e-6), key
    assert summary["grid/_type"] == "images/separated"
    assert any(f.startswith("media/images/grid") for f in files)
    assert summary["samples/nrows"] == 24 and summary["samples/_type"] == "table-file"
    grid = list(d.glob("wandb/offline-run-*/files/media/images/grid*.png"))
    assert len(grid) == 1 and grid[0].stat().st_size > 0


@pytest.fixture
def no_weight_loading(monkeypatch):
    calls = []
    real = D.load_network
    monkeypatch.setattr(D, "load_network", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


@pytest.mark.parametrize("args,message", [
    (["--model.init_args.reward=aesthetics"],
     "unknown reward 'aesthetics' (did you mean 'aesthetic'?); known rewards: aesthetic, brightness, clip_score, compressibility"),
    (["--model.init_args.cross_rewards=[digit_holdout, pickscorex]"], "unknown reward 'pickscorex'"),
    (["--model.init_args.cross_rewards=[digit_holdout, pickscore]"], "scores images against text prompts"),
    (["--model.init_args.sampler=tsf.samplers.SVDDTypo"], "known samplers: base"),
    (["--model.init_args.sampler.init_args.num_particles=0"], "num_particles must be an integer >= 1"),
    (["--data.init_args.conditions=[3, 12]"], "0-9"),
    (["--model.init_args.reward=tsf.rewards.DigitReward", "--model.init_args.reward.init_args.digit=10"], "0-9"),
    (["--model.init_args.sampler.init_args.num_particle=4"], "Option 'num_particle' is not accepted (did you mean "
                                                             "num_particles?)"),
    (["--data.init_args.num_sample=4"], "(did you mean num_samples?)"),
    (["--trainer.devics=1"], "unrecognized arguments: --trainer.devics=1 (did you mean --trainer.devices?)"),
])
def test_bad_input_is_a_clear_error_before_any_model_loads(tmp_path, capsys, no_weight_loading, args, message):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, *args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert no_weight_loading == []
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command,config,says", [
    ("finetune", "configs/digits/best_of_n.yaml", "is a sampling config (model: tsf.lightning.sampling.SamplingModule), "
                                                  "which trains nothing: run it with `tsf sample --config "),
    ("sample", "configs/finetune/draft.yaml", "is a training config (model: baselines.draft.DRaFT), not a sampling "
                                              "one: run it with `tsf finetune --config "),
])
def test_a_config_given_to_the_wrong_command_names_the_right_one(tmp_path, capsys, no_weight_loading, command, config,
                                                                  says):
    with pytest.raises(SystemExit) as e:
        main([command, "--config", str(ROOT / config), f"--output_dir={tmp_path}", "--wandb_mode=disabled"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and says in err and "Traceback" not in err, err
    assert [x for x in err.splitlines() if x.startswith("tsf:")] == [x for x in err.splitlines() if says in x]
    assert no_weight_loading == [] and not any(tmp_path.iterdir())


def test_missing_config_file_is_a_clear_error(capsys, no_weight_loading):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--config", "configs/digits/no_such_method.yaml"])
    assert e.value.code == 2
    assert "no_such_method.yaml" in capsys.readouterr().err and no_weight_loading == []


def test_existing_run_is_refused_unless_overwrite(tmp_path, capsys, no_weight_loading):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        run(tmp_path)
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err
    assert no_weight_loading == [] and (d / "metrics.json").read_text() == "{}"
    run(tmp_path, "--overwrite=true")
    assert "target/mean" in json.loads((d / "metrics.json").read_text())


def test_a_reward_that_is_nan_everywhere_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import tsf.rewards.digits as R

    monkeypatch.setattr(R.DigitReward, "forward", lambda self, images, conditions=None: images.flatten(1)[:, 0] * float("nan"))
    with pytest.raises(SystemExit) as e:
        main(["sample", "--config", str(ROOT / "configs/digits/das.yaml"), *SMALL[:4], f"--output_dir={tmp_path}",
              "--wandb_mode=disabled", "--trainer.enable_progress_bar=false"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "every particle of a group has a non-finite reward" in err and "Traceback" not in err


@pytest.mark.parametrize("method,sampler", [("best_of_n", "BestOfN"), ("smc", "SMC")])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, method, sampler):
    from tsf.lightning.shards import ShardStore
    from tsf.samplers.base import Sampler

    monkeypatch.setattr(sys.modules[__name__], "CONFIG", str(ROOT / f"configs/digits/{method}.yaml"))
    full = run(tmp_path, name="full")  # 24 samples in batches of 10: 3 shards
    real_save, saved = ShardStore.save, []

    def crash_after_two(self, batch):
        if len(saved) == 2:
            raise RuntimeError("simulated crash")
        saved.append(batch.sample_ids[0].item())
        real_save(self, batch)

    monkeypatch.setattr(ShardStore, "save", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, name="cut")
    monkeypatch.setattr(ShardStore, "save", real_save)
    assert len(list((tmp_path / "cut" / "shards").glob("*.safetensors"))) == 2
    with pytest.raises(SystemExit):  # a started run is refused without --resume
        run(tmp_path, name="cut")

    calls = []
    real_sample = Sampler.sample
    monkeypatch.setattr(Sampler, "sample",
                        lambda self, *a, **k: calls.append(type(self).__name__) or real_sample(self, *a, **k))
    run(tmp_path, "--resume=true", name="cut")
    assert calls.count(sampler) == 1  # only the batch whose shard was never written
    same_run_outputs(full, tmp_path / "cut")
    if method == "smc":  # the diagnostics travel in the shards: the resumed run writes the same file
        a, b = (torch.load(d / "diagnostics.pt", weights_only=True) for d in (full, tmp_path / "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_run_outputs(a_dir, b_dir):
    a, b = load_samples(a_dir), load_samples(b_dir)
    for key in ("x0", "images", "sample_id"):
        assert torch.equal(a[key], b[key]), key
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a_dir, b_dir))
    assert {k: v for k, v in ma.items() if k != "compute/seconds"} == {k: v for k, v in mb.items() if k != "compute/seconds"}


def test_a_corrupt_shard_is_detected_and_redone(tmp_path):
    full = run(tmp_path, name="full")
    shards = sorted((full / "shards").glob("*.safetensors"))
    assert len(shards) == 3
    shards[1].write_bytes(shards[1].read_bytes()[:-40])  # truncated: the checksum no longer verifies
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    import shutil

    shutil.copytree(full, tmp_path / "copy")
    run(tmp_path, "--resume=true", name="full")
    after = {p.name: p.stat().st_mtime_ns for p in sorted((full / "shards").glob("*.safetensors"))}
    assert after[shards[1].name] != before[shards[1].name]  # rewritten
    assert after[shards[0].name] == before[shards[0].name] and after[shards[2].name] == before[shards[2].name]
    same_run_outputs(tmp_path / "copy", full)


def test_a_run_that_failed_before_any_batch_runs_again_with_the_same_command(tmp_path, capsys):
    bad = "--model.init_args.reward=aesthetic"  # no head weights given: fails when it loads
    with pytest.raises(SystemExit):
        run(tmp_path, bad)
    assert (tmp_path / "run" / "config.yaml").is_file()  # it got as far as writing its config
    capsys.readouterr()
    run(tmp_path)  # the corrected command: no --overwrite needed, nothing was lost
    assert "target/mean" in json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_lpips_diversity_is_a_config_option_refused_clearly_when_unavailable(tmp_path, capsys):
    from tsf.evaluation import lpips_unavailable

    reason = lpips_unavailable("alex")
    if reason is None:
        pytest.skip("LPIPS is available here: nothing to refuse")
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--model.init_args.lpips=alex")
    assert e.value.code == 2 and "diversity/lpips was asked for" in capsys.readouterr().err


def test_wandb_project_is_the_flag_else_wandb_project_else_tsf(monkeypatch):
    from tsf.cli import wandb_logger

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert wandb_logger("/tmp/unused", "n", None, "disabled")._wandb_init["project"] == "tsf"
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert wandb_logger("/tmp/unused", "n", None, "disabled")._wandb_init["project"] == "mine"
    assert wandb_logger("/tmp/unused", "n", "explicit", "disabled")._wandb_init["project"] == "explicit"


def test_grid_rows_are_conditions_with_gaps_between_images(tmp_path):
    from tsf.cli import save_grid

    images = torch.full((12, 1, 8, 8), 0, dtype=torch.uint8)  # black 8 x 8 images
    conds = [i % 3 for i in range(12)]
    grid = save_grid(images, tmp_path / "g.png", conds, cols=4)
    arr = torch.tensor(list(grid.convert("L").getdata()), dtype=torch.int64).view(grid.height, grid.width)
    # three rows (one per class) of four 64 px images, each framed by white gaps
    dark_rows = (arr < 128).any(1)
    runs = (dark_rows[1:].int() - dark_rows[:-1].int()).clamp(min=0).sum().item() + int(dark_rows[0])
    assert runs == 3, runs
    in_rows = arr[dark_rows]
    image_cols = (in_rows < 128).all(0)  # columns covered by an image in every row
    edges = torch.diff(torch.cat([torch.zeros(1), image_cols.float(), torch.zeros(1)]))
    starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
    assert (ends - starts).tolist() == [64] * 4  # four 64 px images per row, white gaps between them
    # the class is written beside each row: the margin left of the first image is not blank
    first = int(image_cols.nonzero()[0])
    assert (arr[:, :first] < 128).any()
    unconditional = save_grid(images, tmp_path / "u.png")  # no label margin, 8 per row, 4 px gaps
    assert unconditional.size == (8 * (64 + 4) + 4, 2 * (64 + 4) + 4)


def test_tsf_help_lists_every_command_and_python_m_tsf_is_the_same_program(capsys):
    import subprocess

    from lightning.pytorch.cli import LightningCLI

    from tsf.cli import COMMANDS, TOOLS, TsfCLI

    main(["--help"])
    out = capsys.readouterr().out
    every = {*TOOLS, *TsfCLI.subcommands(), *LightningCLI.subcommands(), "finetune"}
    assert every == set(COMMANDS)
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == every
    import tsf

    done = subprocess.run([sys.executable, "-m", "tsf", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"tsf {tsf.__version__}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_a_gpu_config_on_a_machine_without_one_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as done:
        main(["sample", "--config", str(ROOT / "configs/sd15/das.yaml")])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asks for a GPU" in err[0] and "--trainer.accelerator=cpu" in err[0]


def test_a_finetune_run_shorter_than_its_validation_interval_validates_at_its_end(tmp_path):
    """``tsf finetune ... --trainer.max_steps=2`` (the configs validate every 50 steps): no Lightning error,
    a validation at step 2, and no LightningCLI warning about both ``args`` and ``sys.argv``."""
    import subprocess

    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "tsf", "finetune", "--config", str(ROOT / "configs/finetune/ddpo.yaml"),
           "--trainer.max_steps=2", "--wandb_mode=disabled", "--trainer.enable_checkpointing=false",
           "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]", f"--output_dir={tmp_path}", "--run_name=ft",
           "--model.init_args.batch_size=8", "--model.init_args.val_samples=10",
           "--model.init_args.base.init_args.num_steps=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sys.argv" not in done.stderr
    steps = [json.loads(line)["step"] for line in (out / "val_metrics.jsonl").read_text().splitlines()]
    assert steps == [2]


FINETUNE_SMALL = ["--model.init_args.batch_size=8", "--model.init_args.val_samples=10",
                  "--model.init_args.base.init_args.num_steps=4", "--trainer.enable_progress_bar=false",
                  "--wandb_mode=disabled"]


def finetune_exit(*args) -> tuple[int, str]:
    """``tsf finetune ARGS`` in this process: (exit code, the error line) ; 0 and "" when it ran."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(["finetune", "--config", str(ROOT / "configs/finetune/draft.yaml"), *FINETUNE_SMALL, *args])
        except SystemExit as done:
            return int(done.code or 0), err.getvalue().strip().splitlines()[-1]
    return 0, ""


def test_finetune_runs_have_the_run_directory_rules_of_sample(tmp_path, monkeypatch):
    """One run directory ``--output_dir/--run_name`` (default ``<config folder>_<config name>``) holds the
    config, the checkpoints, the adapter and the curve; a second run there is refused, ``--resume`` continues
    from its last checkpoint, a wandb sweep's runs get distinct names, and a config that places files
    elsewhere is one clear error."""
    monkeypatch.chdir(tmp_path)
    assert finetune_exit("--trainer.max_steps=2", "--trainer.val_check_interval=2") == (0, "")
    (run,) = (tmp_path / "runs").iterdir()  # the config's name and what the command line changed in the model
    assert run.name == "finetune_draft_num_steps=4_batch_size=8_val_samples=10", run.name
    assert {"config.yaml", "adapter", "checkpoints", "val_metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "lightning_logs").exists()

    code, line = finetune_exit("--trainer.max_steps=2")
    assert code == 2 and "already holds a run" in line and "--resume" in line

    # resumed to 4 steps (a trainer setting: the same run): the curve continues from the checkpoint's step,
    # mid-epoch, with no Lightning warning that the loader does not resume (it ticks steps: it resumes exactly)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert finetune_exit("--trainer.max_steps=4", "--trainer.val_check_interval=2", "--resume=true") == (0, "")
    assert not [w for w in caught if "not resumable" in str(w.message)]
    steps = [json.loads(x)["step"] for x in (run / "val_metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    code, line = finetune_exit("--trainer.max_steps=6", "--resume=true", "--model.init_args.lr=0.1", f"--run_name={run.name}")
    assert code == 2 and "another config" in line and "model.init_args.lr" in line

    code, line = finetune_exit("--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path / 'x'}")
    assert code == 2 and "remove trainer.default_root_dir" in line

    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")
    for run_id in ("a1", "b2"):
        monkeypatch.setenv("WANDB_RUN_ID", run_id)
        assert finetune_exit("--trainer.max_steps=1", "--trainer.enable_checkpointing=false",
                             "--trainer.callbacks=[]", "--output_dir=sweep") == (0, "")
    names = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert len(names) == 2 and names[0].endswith("_a1") and names[1].endswith("_b2"), names


def test_runs_that_differ_in_alpha_T_or_adapter_get_their_own_directory_and_curve(tmp_path):
    """The default run name carries what the command line changed from the config file, so runs that
    differ only in alpha, in T or in the adapter never share a directory, and ``tsf figures`` / ``tsf
    table`` tell them apart from their resolved configs, while replicates (another seed) share a method."""
    from peft import LoraConfig, get_peft_model

    from tsf.commands.figures import by_method, load_runs
    from tsf.models import DigitsDiffusion
    from tsf.commands.table import run_labels

    net = DigitsDiffusion().load().net
    adapter = tmp_path / "ft" / "adapter"
    get_peft_model(net, LoraConfig(r=2, target_modules=["fc1"])).save_pretrained(str(adapter))
    p = "--model.init_args."
    small = ["--config", str(ROOT / "configs/digits/svdd_pm.yaml"), "--data.init_args.num_samples=4",
             "--data.init_args.conditions=[3]", f"{p}fidelity_samples=0",
             f"{p}base.init_args.num_steps=4", f"{p}sampler.init_args.num_particles=2", "--wandb_mode=disabled",
             "--trainer.enable_progress_bar=false", f"--output_dir={tmp_path / 'runs'}"]
    variants = [[f"{p}sampler.init_args.alpha=0.1"], [f"{p}sampler.init_args.alpha=1.0"],
                [f"{p}base.init_args.num_steps=3"], [f"{p}base.init_args.adapter={adapter}"],
                [f"{p}sampler.init_args.alpha=0.1", "--data.init_args.seed=1"]]
    dirs = []
    for extra in variants:
        main(["sample", *small, *extra])
        dirs = sorted((tmp_path / "runs").iterdir())
    names = [d.name for d in dirs]
    assert len(names) == 5, names  # none refused as "already holds a run", none overwritten
    assert any("alpha=1.0" in n for n in names) and any("num_steps=3" in n for n in names)
    assert any(re.search(r"adapter=ft(_|$)", n) for n in names) and any("seed1" in n for n in names)
    runs = load_runs(dirs, note=lambda _: None)
    methods = by_method(runs)
    assert len(methods) == 4, list(methods)  # the seed-1 run is a replicate of the alpha=0.1 run's method
    labels = run_labels(dirs)
    assert len(set(labels)) == 5


def test_variant_suffix_is_readable_and_short():
    from tsf.identity import config_variant, distinguishing_labels, variant_suffix

    file = {"model": {"init_args": {"sampler": {"init_args": {"alpha": 0.1, "num_particles": 4, "max_batch": 64}},
                                    "base": {"init_args": {"adapter": None}}}}, "data": {"init_args": {"seed": 0}}}
    run = {"model": {"init_args": {"sampler": {"init_args": {"alpha": 1.0, "num_particles": 8, "max_batch": 8}},
                                   "base": {"init_args": {"adapter": "runs/finetune_draft/adapter"}}}},
           "data": {"init_args": {"seed": 3}}}
    variant = config_variant(run, file)  # K and the seed are in the name already; max_batch changes no sample
    assert variant_suffix(variant) == "alpha=1.0_adapter=finetune_draft"  # the sampler's first; a run's adapter by its run
    from tsf.cli import default_run_name
    from tsf.identity import overrides_variant, short_value

    assert short_value("/data/me/prompts/my_prompts.txt") == "my_prompts"  # a path by its last part
    assert short_value("runs/sd15/finetune_sd15_draft_rank=4/checkpoints/last.ckpt") == "finetune_sd15_draft_rank-4"
    assert short_value("stabilityai/sd-turbo") == "sd-turbo" and short_value("a photo/of a cat") == "a-photo-of-a-cat"
    # a long value (inline prompts) shows its start, and the name its settings that fit within 80 characters
    long = {"data.init_args.prompts": ["a red apple on a wooden table", "a photo of a cat"],
            "model.init_args.sampler.init_args.alpha": 0.5}
    name = default_run_name("das_K4_imagereward_seed0", long)
    assert len(name) <= 80 and name.startswith("das_K4_imagereward_seed0_alpha=0.5_prompts=a-red-apple-on-a-woode")
    assert name != default_run_name("das_K4_imagereward_seed0", {**long, "data.init_args.prompts": ["other"]})
    assert overrides_variant(["--data.init_args.num_samples=50", "--trainer.devices", "2", "--model.init_args.base."
                              "init_args.adapter", "runs/ft/adapter", "--data.init_args.batch_size=4"]) == {
        "data.init_args.num_samples": 50, "model.init_args.base.init_args.adapter": "runs/ft/adapter"}
    many = {f"model.init_args.sampler.init_args.k{i}": "x" * 12 for i in range(9)}
    other = {**many, "model.init_args.sampler.init_args.k8": "y" * 12}
    assert len(variant_suffix(many)) <= 80 and variant_suffix(many).startswith("k0=xxxxxxxxxxxx_k1=")
    assert variant_suffix(many) != variant_suffix(other)  # the hash tells apart what the shown part does not
    assert distinguishing_labels(["das", "das", "svdd"], [{"a": 1}, {"a": 2}, {"a": 1}]) == ["das (a=1)", "das (a=2)", "svdd"]


def test_ctrl_c_prints_the_resume_command_and_the_resumed_run_says_what_it_reused(tmp_path, monkeypatch, capsys):
    """Ctrl-C (Lightning's graceful stop) ends with the command that continues the run; that command
    reads the kept batches back, says how many, and continues the same wandb run instead of leaving an
    offline folder per attempt."""
    import shlex
    import signal

    from tsf.lightning.shards import ShardStore

    real_save, saved = ShardStore.save, []

    def interrupt_after_two(self, batch):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(1)
        real_save(self, batch)

    monkeypatch.setattr(ShardStore, "save", interrupt_after_two)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stopped:
            run(tmp_path, "--overwrite=true", name="cut", wandb="offline")
        assert stopped.value.code == 130  # an interrupted command's code, not 1
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    monkeypatch.setattr(ShardStore, "save", real_save)
    import wandb

    # tsf finished the interrupted run's wandb run (exit code 130): the next run in this process starts its own
    # (Lightning's WandbLogger would log into an unfinished one)
    assert wandb.run is None
    err = capsys.readouterr().err
    assert "2 finished batches are kept" in err and "Continue it with:" in err
    command = err.split("Continue it with:")[1].strip().splitlines()[0]
    args = shlex.split(command)
    assert args[:2] == ["tsf", "sample"] and args[-2:] == ["--resume", "true"] and "--overwrite=true" not in args

    main(args[1:])
    out = capsys.readouterr().out
    assert "resumed: 2 of 3 batches read from" in out and ", 1 sampled" in out
    (kept,) = (tmp_path / "cut" / "wandb").glob("offline-run-*")  # the interrupted attempt's is gone
    from wandb_log import read_config

    run_id = (tmp_path / "cut" / "wandb_run_id").read_text().strip()  # read on resume, not parsed from folder names
    assert read_config(tmp_path / "cut")[1]["id"] == run_id and kept.name.endswith(run_id)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["target/mean"] < 0


def test_runs_print_none_of_the_known_noise(tmp_path):
    """No litlogger tip, no pytree deprecation, no note that frozen parts are in eval mode or that a short
    run logs less often than 50 steps, and no "Epoch 0/-2" in a fine-tuning run's bar; a bad value is one line."""
    import subprocess

    def tsf(*args):
        done = subprocess.run([sys.executable, "-m", "tsf", *args, f"--output_dir={tmp_path}", "--wandb_mode=disabled"],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        return done.returncode, done.stdout + done.stderr

    code, out = tsf("finetune", "--config", str(ROOT / "configs/finetune/draft.yaml"), "--trainer.max_steps=2",
                    *FINETUNE_SMALL[:3])
    assert code == 0, out[-3000:]
    code2, out2 = tsf("sample", "--config", str(ROOT / "configs/digits/best_of_n.yaml"), "--data.init_args.num_samples=4")
    assert code2 == 0, out2[-3000:]
    for noise in ("litlogger", "LeafSpec", "eval mode", "logging interval", "Epoch 0/-2", "sync_dist"):
        assert noise not in out + out2, noise
    code, out = tsf("sample", "--config", str(ROOT / "configs/digits/smc.yaml"), "--model.init_args.sampler.init_args.resampler=foo")
    lines = [x for x in out.strip().splitlines() if x.strip()]
    assert code == 2 and lines[-2].startswith("tsf: error: model.sampler.resampler: Expected a typing.Literal"), lines[-3:]
    assert "usage:" not in out


def test_a_redirected_run_prints_none_of_the_noise_of_issue_24(tmp_path):
    """A small SMC run as `tsf compare` starts it (``python -m tsf.cli``, ``--resume=true`` on a fresh run),
    stdout and stderr redirected to files, wandb offline: no jsonargparse deprecation, no searchsorted
    warning, no wandb "anonymous" warning or one-point sparklines, no ANSI colours, no "resumed: 0 of"."""
    import subprocess

    args = [sys.executable, "-m", "tsf.cli", "sample", "--config", str(ROOT / "configs/digits/smc.yaml"),
            "--data.init_args.num_samples=4", "--model.init_args.fidelity_samples=0", f"--output_dir={tmp_path}",
            "--wandb_mode=offline", "--resume=true"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("FORCE_COLOR", "PYTHONWARNINGS", "WANDB_SILENT")}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        code = subprocess.run(args, stdout=out, stderr=err, cwd=tmp_path, timeout=600, env=env).returncode
    text = (tmp_path / "out.txt").read_text() + (tmp_path / "err.txt").read_text()
    assert code == 0, text[-3000:]
    assert "run directory:" in text and "Sampling" in text and "wandb: Run summary:" in text  # what stays
    for noise in ("JsonargparseDeprecationWarning", "searchsorted", "anonymous setting", "Run history",
                  "\x1b[", "resumed: 0 of", "Test metric"):
        assert noise not in text, noise


def test_the_pipeline_noise_is_fixed_or_silenced(tmp_path, caplog):
    """diffusers' "modules ... kept in float32: []" (tsf upcast the SD VAE with .to(float32)) is gone at its
    cause; transformers' note that an image processor falls back to PIL without torchvision is filtered
    where it is logged (tsf reads images with PIL on purpose)."""
    import logging

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_pipeline

    from tsf.cli import quiet_known_noise
    from tsf.models import StableDiffusion

    path = tiny_pipeline("sd15", tmp_path / "sd15")
    with caplog.at_level(logging.WARNING):
        m = StableDiffusion(pretrained=str(path), num_steps=2, dtype="float16").load()
    assert m.vae.dtype == torch.float32 and "kept in float32" not in caplog.text  # force_upcast: the VAE in fp32
    quiet_known_noise()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logging.getLogger("transformers.utils.import_utils").warning("another warning")
    assert "requires torchvision" not in caplog.text and "another warning" in caplog.text


def test_samples_pt_holds_each_samples_condition_and_compute_is_said_per_sample(tmp_path):
    d = run(tmp_path)
    samples = load_samples(d)
    conds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # the config's classes, cycled over the sample ids
    assert samples["conditions"] == [conds[i % 10] for i in samples["sample_id"].tolist()]
    from tsf.models import DigitsDiffusion
    from tsf.rewards import build_reward
    from tsf.samplers import BestOfN

    batch = BestOfN(num_particles=2).sample(DigitsDiffusion(num_steps=3), build_reward("digit"), [3] * 4, range(4))
    assert batch.compute["nfe"] == 2 * 3 * 4 and batch.compute_per_sample["nfe"] == 2 * 3  # batch total, per sample
    from tsf.errors import ConfigError

    with pytest.raises(ConfigError, match="unconditional"):
        DigitsDiffusion(guidance_scale=3.0)


def test_config_yaml_records_paths_as_absolute_paths(tmp_path, monkeypatch):
    """A relative adapter path is recorded absolute in config.yaml (the run names it by its run directory);
    resuming from the same folder is the same run, also for a config.yaml written with the relative path."""
    from peft import LoraConfig, get_peft_model

    from tsf.models import DigitsDiffusion

    monkeypatch.chdir(tmp_path)
    get_peft_model(DigitsDiffusion().load().net, LoraConfig(r=2, target_modules=["fc1"])).save_pretrained("ft/adapter")
    args = ["sample", "--config", CONFIG, *SMALL[:3], "--data.init_args.num_samples=4", "--wandb_mode=disabled",
            "--model.init_args.base.init_args.adapter=ft/adapter", f"--output_dir={tmp_path / 'runs'}"]
    main(args)
    (d,) = (tmp_path / "runs").iterdir()
    assert "_adapter=ft_" in d.name, d.name
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert saved["model"]["init_args"]["base"]["init_args"]["adapter"] == str(tmp_path / "ft" / "adapter")
    assert saved["model"]["init_args"]["reward"] == yaml.safe_load(Path(CONFIG).read_text())["model"]["init_args"]["reward"]
    text = (d / "config.yaml").read_text().replace(str(tmp_path / "ft" / "adapter"), "ft/adapter")
    (d / "config.yaml").write_text(text)  # as a run written before paths were recorded absolute
    main([*args, "--resume=true"])  # not refused as "a run of another config"
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert saved["model"]["init_args"]["base"]["init_args"]["adapter"] == str(tmp_path / "ft" / "adapter")


def test_a_batch_shows_its_steps_then_its_nfe_against_the_plan_and_the_run_is_labelled_sampling(tmp_path, monkeypatch,
                                                                                                 capsys):
    """Inside a batch the bar shows the first batch's denoising steps, then each later batch's NFE spent
    against its NFE planned (the earlier batches' NFE per sample), reaching it; the bar says "Sampling",
    and the results table is headed by the run's name, not Lightning's "Test metric"."""
    from tsf.lightning.progress import SamplingBar

    seen, labels = [], []
    real = SamplingBar.on_sampling_progress

    def record(self, done, total, unit, note=""):
        seen.append((self.trainer.test_loop.batch_progress.current.ready, done, total, unit))
        labels.append(self.test_description)
        real(self, done, total, unit, note)

    monkeypatch.setattr(SamplingBar, "on_sampling_progress", record)
    monkeypatch.setattr("tsf.lightning.progress.BatchProgress.__init__.__defaults__", (None, 0.0))  # every call
    small = [a for a in SMALL if "progress_bar" not in a]
    main(["sample", "--config", CONFIG, *small, f"--output_dir={tmp_path}", "--run_name=shown", "--wandb_mode=disabled"])
    first = [s for s in seen if s[0] == 1]
    later = [s for s in seen if s[0] == 3]
    assert first and all(unit == "steps" and total == 10 for _, _, total, unit in first) and first[-1][1] == 10
    nfe = json.loads((tmp_path / "shown" / "metrics.json").read_text())["compute/nfe"]  # per sample
    assert later and all(unit == "NFE" and total == 4 * nfe for _, _, total, unit in later)  # the last batch: 4 rows
    assert later[-1][1] == later[-1][2] and set(labels) == {"Sampling"}
    out = capsys.readouterr().out
    assert "Test metric" not in out and "DataLoader" not in out
    header = next(line for line in out.splitlines() if "shown" in line and "value" in line)
    assert header.split()[1:4:2] == ["shown", "value"], header
