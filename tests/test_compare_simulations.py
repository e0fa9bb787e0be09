"""scripts/compare_simulations.py: the two-file comparison and the pooled one over data sets."""

import csv
from pathlib import Path

import pytest

from conftest import load_script


def _script():
    return load_script("compare_simulations")


def _results(path: Path, curves: dict[tuple[str, int], list[float]]) -> Path:
    """A results.csv with ``{(strategy, seed): [auroc at 20, 30, 40 labels]}``."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["strategy", "seed", "round", "labels", "test/auroc"])
        w.writeheader()
        for (strategy, seed), ys in curves.items():
            for r, y in enumerate(ys):
                w.writerow(
                    {
                        "strategy": strategy,
                        "seed": seed,
                        "round": r,
                        "labels": 20 + 10 * r,
                        "test/auroc": y,
                    }
                )
    return path


def test_pool_pairs_within_each_file_and_pools_every_seed(tmp_path, capsys):
    # file a: bald - random areas +0.1 and +0.2 (constant curves); file b: -0.05 (seed 0 only
    # has both; seed 1 has no bald and must not be paired)
    a = _results(
        tmp_path / "a.csv",
        {
            ("random", 0): [0.5] * 3,
            ("bald", 0): [0.6] * 3,
            ("random", 1): [0.5] * 3,
            ("bald", 1): [0.7] * 3,
        },
    )
    b = _results(
        tmp_path / "b.csv",
        {("random", 0): [0.8, 0.8, 0.8], ("bald", 0): [0.7, 0.75, 0.8], ("random", 1): [0.1] * 3},
    )
    assert _script().main(["--pool", "random:bald", str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "+0.1000, +0.2000" in out[0]
    # b's seed 0: areas 0.8 and (0.725 + 0.775) / 2 = 0.75 -> -0.05
    assert "seeds [0]" in out[1] and "-0.0500" in out[1]
    # pooled over 3 paired runs: mean (0.1 + 0.2 - 0.05) / 3
    assert out[2].startswith("pooled bald - random area over 3 paired runs: +0.0833 [")
    assert out[2].endswith("positive in 2 of 3")


def test_pool_pairs_two_simulations_of_one_set_with_base_equals_cand(tmp_path, capsys):
    base = _results(tmp_path / "w.csv", {("random", 0): [0.5] * 3, ("random", 1): [0.6] * 3})
    cand = _results(tmp_path / "d.csv", {("random", 0): [0.7] * 3, ("random", 1): [0.7] * 3})
    assert _script().main(["--pool", "random:random", f"{base}={cand}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "per seed +0.2000, +0.1000" in out[0]


def test_pool_fails_clearly_on_a_file_without_pairs_or_a_bad_spec(tmp_path, capsys):
    a = _results(tmp_path / "a.csv", {("random", 0): [0.5] * 3})
    assert _script().main(["--pool", "random:bald", str(a)]) == 1
    assert "no seed has both random and bald" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="BASELINE:CANDIDATE"):
        _script().main(["--pool", "random", str(a)])


def test_two_file_comparison_still_needs_exactly_two_inputs(tmp_path, capsys):
    a = _results(tmp_path / "a.csv", {("random", 0): [0.5] * 3, ("bald", 0): [0.6] * 3})
    assert _script().main([f"{a}:random", f"{a}:bald"]) == 0
    assert "area difference candidate - baseline: +0.1000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _script().main([f"{a}:random"])


def test_level_sets_the_confidence_of_every_interval(tmp_path, capsys):
    from scipy import stats

    # bald - random per seed +0.1, +0.2, +0.4: mean 0.7/3, sd from numpy (ddof=1)
    a = _results(
        tmp_path / "a.csv",
        {("random", s): [0.5] * 3 for s in range(3)}
        | {("bald", 0): [0.6] * 3, ("bald", 1): [0.7] * 3, ("bald", 2): [0.9] * 3},
    )
    d = [0.1, 0.2, 0.4]
    half = stats.t.ppf(1 - 0.017 / 2, 2) * stats.tstd(d) / 3**0.5
    mean = sum(d) / 3
    assert _script().main(["--pool", "random:bald", "--level", "0.983", str(a)]) == 0
    out = capsys.readouterr().out.splitlines()
    want = f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
    assert want in out[0] and want in out[1] and "(98.3% t interval)" in out[1]
    # the same data at the default 95 % gives a narrower interval
    assert _script().main(["--pool", "random:bald", str(a)]) == 0
    half95 = stats.t.ppf(0.975, 2) * stats.tstd(d) / 3**0.5
    assert (
        f"[{mean - half95:+.4f}, {mean + half95:+.4f}] (95% t interval)" in capsys.readouterr().out
    )
    assert _script().main([f"{a}:random", f"{a}:bald", "--level", "0.983"]) == 0
    assert f"{want} (98.3% t interval over 3 seeds)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _script().main(["--pool", "random:bald", "--level", "95", str(a)])
    assert "--level: expected a confidence in (0, 1)" in capsys.readouterr().err


def test_common_compares_other_round_sizes_on_the_labels_both_have(tmp_path, capsys):
    """Rounds of 20 (20, 40, 60 labels) against rounds of 10 (20, 30, ..., 60): the zigzag
    between the shared points counts in the full areas and not with --common."""
    big = tmp_path / "rounds20.csv"
    with open(big, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["strategy", "seed", "round", "labels", "test/auroc"])
        w.writeheader()
        for r, n in enumerate((20, 40, 60)):
            w.writerow({"strategy": "bald", "seed": 0, "round": r, "labels": n, "test/auroc": 0.5})
    small = _results(tmp_path / "rounds10.csv", {("bald", 0): [0.5, 0.9, 0.5, 0.9, 0.5]})
    pair = f"{big}={small}"
    assert _script().main(["--pool", "bald:bald", pair]) == 0
    assert "bald - bald area +0.2000" in capsys.readouterr().out
    assert _script().main(["--pool", "bald:bald", "--common", pair]) == 0
    assert "bald - bald area +0.0000" in capsys.readouterr().out
    assert _script().main([f"{big}:bald", f"{small}:bald", "--common"]) == 0
    assert "area difference candidate - baseline: +0.0000" in capsys.readouterr().out
