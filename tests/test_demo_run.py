"""The built-in demo runs end to end (tiny settings) and reports every model and method."""

from __future__ import annotations

import json

from opd.cli import main


def test_demo_quick_runs_and_writes_json(tmp_path, capsys):
    out_json = tmp_path / "demo.json"
    code = main(["demo", "--quick", "--steps", "3", "--seeds", "1", "--out", str(tmp_path / "runs"),
                 "--json", str(out_json), "--threads", "1", "--jobs", "1"])
    assert code == 0
    results = json.loads(out_json.read_text())
    for name in ("teacher", "student_base", "off_policy", "on_policy", "mixed", "on_policy_fkl"):
        assert 0.0 <= results[name]["accuracy"] <= 1.0
        assert 0.0 <= results[name]["accuracy_sampled"] <= 1.0
        assert len(results[name]["accuracy_per_seed"]) == 1
    assert results["teacher"]["accuracy"] > 0.9  # the shipped teacher solves the task
    assert results["seconds"] > 0
    printed = capsys.readouterr().out
    assert "on_policy" in printed and "first error" in printed


def test_demo_refuses_non_empty_out_dir(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "f").read_text() == "keep me"
