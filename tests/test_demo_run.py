"""The built-in demo: a quick end-to-end run (both tasks, every method, equal steps and equal
wall-clock), its --json schema, the plot, and verdicts computed from the numbers."""

from __future__ import annotations

import json

import pytest

from opd.cli import main
from opd.demo.run import compare, recovery_line, targets_line, verdict

SEED_KEYS = {"accuracy", "accuracy_sampled", "token_accuracy", "token_accuracy_sampled"}
METHODS = ("teacher", "student_base", "off_policy", "on_policy", "mixed", "off_to_on", "on_policy_equal_time",
           "mixed_equal_time", "off_to_on_equal_time")


def test_demo_quick_runs_and_writes_json_and_plot(tmp_path, capsys):
    out_json = tmp_path / "demo.json"
    code = main(["demo", "--quick", "--schedule", "--steps", "2", "--out", str(tmp_path / "runs"),
                 "--json", str(out_json),
                 "--threads", "1", "--jobs", "1"])
    assert code == 0
    doc = json.loads(out_json.read_text())
    assert set(doc) == {"headline", "control", "seconds"} and doc["seconds"] > 0
    for key in ("headline", "control"):
        assert isinstance(doc[key]["task"], str)
        assert set(doc[key]["methods"]) == set(METHODS)
        for name in METHODS:
            seeds = doc[key]["methods"][name]["seeds"]
            assert len(seeds) == 1 and set(seeds[0]) == SEED_KEYS
            assert all(0.0 <= v <= 1.0 for v in seeds[0].values())
    assert doc["control"]["methods"]["teacher"]["seeds"][0]["accuracy"] > 0.9  # the shipped teacher solves it
    assert doc["headline"]["methods"]["teacher"]["seeds"][0]["token_accuracy"] > 0.95
    assert (tmp_path / "runs" / "demo.png").stat().st_size > 10_000
    full = json.loads((tmp_path / "runs" / "results.json").read_text())
    base = full["headline"]["per_seed"]["student_base"][0]
    assert len(base["position_accuracy_sampled"]) == 48 and "degenerate_rate_sampled" in base
    printed = capsys.readouterr().out
    assert "headline (sort48):" in printed and "control (running_sum13):" in printed
    assert "targets met" in printed and "after the student's first error" in printed
    assert "recovery check (sort48, 1 seeds): the base student trained 2 steps" in printed
    check = full["headline"]["recovery_checks"][0]
    assert set(check) >= {"teacher_corrupted", "base_corrupted", "trained_corrupted", "trained_token_accuracy_sampled"}
    assert check["teacher_corrupted"] > 0.95 > check["base_corrupted"]  # the teacher recovers, the student does not
    assert "recovery_checks" not in full["control"]  # nothing to recover on the control task


def test_demo_refuses_non_empty_out_dir(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "f").read_text() == "keep me"


def _row(token_sampled: float, exact: float, token: float, curve: list[float]) -> dict:
    return {"accuracy": exact, "accuracy_sampled": exact, "token_accuracy": token,
            "token_accuracy_sampled": token_sampled, "position_accuracy_sampled": curve}


def test_verdict_is_computed_from_the_numbers():
    rising = [0.9, 0.9, 0.9, 0.95, 0.95, 0.95]
    flat = [0.9] * 6
    results = {"key": "headline", "per_seed": {
        "off_policy": [_row(0.80, 0.10, 0.90, flat), _row(0.82, 0.12, 0.91, flat)],
        "on_policy": [_row(0.85, 0.20, 0.905, rising), _row(0.81, 0.15, 0.90, rising)],
        "off_to_on": [_row(0.70, 0.05, 0.80, flat), _row(0.70, 0.05, 0.80, flat)],
    }}
    c = compare(results, "on_policy")
    assert c["token_accuracy_sampled"] == pytest.approx(2.0)
    assert c["token_accuracy_sampled_wins"] == 1 and c["accuracy"] == pytest.approx(6.5)
    assert c["gap_first_third"] == pytest.approx(0.0) and c["gap_last_third"] == pytest.approx(5.0)
    text = verdict(results)
    assert text.startswith("headline (sort48): on_policy beat off_policy") and "1/2 seeds" in text
    assert "off_to_on did NOT beat off_policy" in text
    checks = targets_line(results)
    assert "on_policy: 3/4 targets met" in checks and "MISSED: beats off-policy on sampled per-token accuracy" in checks
    assert "off_to_on: 0/4 targets met" in checks


def _check(base_corrupted: float, trained_corrupted: float, trained_clean: float, trained_sampled: float) -> dict:
    return {"teacher_clean": 1.0, "teacher_corrupted": 0.99, "base_clean": 0.98, "base_corrupted": base_corrupted,
            "trained_clean": trained_clean, "trained_corrupted": trained_corrupted, "trained_token_accuracy": 0.9,
            "trained_token_accuracy_sampled": trained_sampled}


def test_recovery_line_says_whether_the_student_can_learn_to_recover():
    base = {"student_base": [_row(0.90, 0.2, 0.95, []), _row(0.80, 0.1, 0.9, [])]}
    # corrupted-prefix accuracy +8 points, clean -0.5, sampled per-token +1: learnable
    learns = {"key": "headline", "per_seed": base,
              "recovery_checks": [_check(0.70, 0.78, 0.975, 0.86), _check(0.70, 0.78, 0.975, 0.86)]}
    text = recovery_line(learns)
    assert "70.0% -> 78.0% (teacher 99.0%)" in text and "85.0% -> 86.0%" in text
    assert text.endswith("the student can learn to recover.")
    # the same gain bought with 6 points of sampled accuracy: not learnable
    trades = {**learns, "recovery_checks": [_check(0.70, 0.78, 0.975, 0.79)] * 2}
    assert "can NOT learn to recover" in recovery_line(trades)
    assert recovery_line({"key": "control", "per_seed": base}) is None
