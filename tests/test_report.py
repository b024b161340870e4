import json

from tsf.report import results_table


def test_results_table_has_a_row_per_run_and_every_cross_reward(tmp_path):
    for name, t in (("a", -3.5), ("b", -1.25)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"target/mean": t, "cross/digit_holdout/mean": t - 1, "compute/nfe": 400.0, "diversity/vendi": 8.61}))
    table = results_table([tmp_path / "a", tmp_path / "b"]).splitlines()
    assert table[0] == "| run | target mean | cross digit_holdout mean | vendi | NFE |"
    assert table[2] == "| a | -3.5 | -4.5 | 8.61 | 400 |"
    assert table[3].startswith("| b | -1.25 |")
