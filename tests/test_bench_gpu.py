"""`tsf bench gpu --tiny`: every real-model family (SD 1.5, SDXL, SD3, FLUX) at tiny widths and depths on a CPU,
every setting's row, and the denoiser rows each method needs, counted by the bench's hooks. Timings are never
asserted."""

import contextlib
import io
import json
import math

import pytest

from tsf.commands.bench import run
from tsf.commands.bench_gpu import FAMILIES, SETTINGS

T = 3
#: denoiser rows per evaluation: classifier-free guidance doubles them (FLUX.1 schnell has none)
GUIDED = {"sd15": 2, "sdxl": 2, "sd3": 2, "flux": 1}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One run of every family (no warm-up: the table test's run has one), its JSON and its printed table."""
    path = tmp_path_factory.mktemp("bench_gpu") / "gpu.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = run(["gpu", "--tiny", "--device", "cpu", "--steps", str(T), "--warmup_steps", "0", "--json", str(path)])
    return out, json.loads(path.read_text()), printed.getvalue()


def test_every_family_and_setting_has_its_row(bench):
    out, saved, _ = bench
    assert saved == json.loads(json.dumps(out))
    assert saved["benchmark"] == "gpu" and saved["settings"]["steps"] == T and saved["settings"]["tiny"]
    assert {"cpu", "torch_threads", "device"} <= set(saved["machine"])
    rows = {(r["family"], r["setting"]): r for r in saved["rows"]}
    assert list(rows) == [(f, s.key) for f in FAMILIES for s in SETTINGS]
    for key, r in rows.items():
        assert r["error"] is None, (key, r["error"])
        assert math.isfinite(r["seconds_per_image"]) and r["seconds_per_image"] > 0, key
        assert r["peak_gib"] is None or r["peak_gib"] > 0, key
        assert r["steps"] == T and r["images"] == 1, key
    for key, fam in saved["families"].items():
        assert fam["full_size"] and not fam["skipped"], key
        assert fam["blocks"] is None if key in ("sd15", "sdxl") else "tiny" in fam["blocks"], key
    assert {fam["reward"] for fam in saved["families"].values()} == {"aesthetic", "pickscore"}


def test_the_rows_are_what_each_method_needs(bench):
    _, saved, _ = bench
    for family, g in GUIDED.items():
        rows = {r["setting"]: r["counts_per_image"] for r in saved["rows"] if r["family"] == family}
        compute = {r["setting"]: r.get("compute_per_image") for r in saved["rows"] if r["family"] == family}
        base = rows["base"]["unet_rows"]
        assert base == g * T and rows["base"]["unet_grad_rows"] == 0, family
        assert rows["best_of_4"]["unet_rows"] == 4 * base, family
        assert rows["svdd_pm_4"]["unet_rows"] == g * (1 + 4 * (T - 1)), family  # one root, M children a step after
        gb1, gb4 = rows["das_4_gb1"], rows["das_4_gb4"]
        assert gb1["unet_rows"] == gb4["unet_rows"] == 4 * base, family  # grad_batch chunks the rows, never adds any
        assert gb1["unet_grad_rows"] == gb4["unet_grad_rows"] > 0, family
        assert gb1["reward_grad_rows"] == gb4["reward_grad_rows"] > 0, family
        tw = rows["das_4_tweedie"]  # the same rows and reward gradients, none of them a backward through the network
        assert tw["unet_rows"] == gb4["unet_rows"] and tw["unet_grad_rows"] == 0, family
        assert tw["reward_grad_rows"] == gb4["reward_grad_rows"], family
        # DRaFT-1: one trajectory, the graph built by the last step only (truncation 1)
        assert rows["draft_1"]["unet_rows"] == base and rows["draft_1"]["unet_grad_rows"] == g, family
        assert rows["draft_1"]["reward_grad_rows"] == 1, family
        for setting, c in compute.items():  # tsf's own row counter agrees with the hooks
            if setting != "draft_1":
                assert c["model_rows"] == rows[setting]["unet_rows"], (family, setting)


def test_the_table_names_every_row_and_the_steps(bench, capsys):
    table = bench[2]
    assert f"T = {T} steps" in table and "machine: " in table and "peak RSS GiB" in table
    for family in FAMILIES.values():
        lines = [line for line in table.splitlines() if line.startswith(f"| {family.label},")]
        assert [line.split(" | ")[1] for line in lines] == [s.label for s in SETTINGS], family.key
    # and with a warm-up run before each timed one, on the lightest family
    out = run(["gpu", "--tiny", "--device", "cpu", "--steps", "2", "--warmup_steps", "2", "--families", "flux"])
    assert "T = 2 steps" in capsys.readouterr().out and out["settings"]["warmup_steps"] == 2
    assert [r["setting"] for r in out["rows"] if r["error"] is None] == [s.key for s in SETTINGS]


def test_without_cuda_only_the_tiny_run_goes(capsys):
    with pytest.raises(SystemExit) as exc:
        run(["gpu", "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--tiny" in err
