"""`opd report`: plots and index.html from real tiny runs; robustness to crashed / resumed runs; CLI errors."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import base_overrides
from opd.cli import main
from opd.config import load_config
from opd.errors import OpdError
from opd.report import PLOT_FILES, cumulative_total, load_run, write_report
from opd.trainer import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tiny_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    runs = []
    for recipe in ("on_policy_rkl", "supervised_kd"):
        out = root / recipe
        cfg = load_config(recipe, base_overrides(tiny_setup, out, **{"train.steps": 4, "train.eval_every": 2}))
        train(cfg, log=lambda *_: None)
        runs.append(out)
    return runs


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)


def test_report_from_real_runs(two_runs, tmp_path):
    out = tmp_path / "report"
    index = write_report(two_runs, out)
    assert index == out / "index.html"
    page = index.read_text()
    for name in PLOT_FILES.values():
        _assert_png(out / name)
        assert f'src="{name}"' in page
    assert "skipped:" not in page
    for name in ("on_policy_rkl", "supervised_kd"):
        assert name in page
    # the differing divergence is a highlighted config row, with both values
    row = next(line for line in page.splitlines() if '<td class="key">loss.divergence</td>' in line)
    assert 'class="diff"' in row and "reverse_kl" in row and "forward_kl" in row
    same = next(line for line in page.splitlines() if '<td class="key">temperature</td>' in line)
    assert 'class="diff"' not in same
    # compute summary: steps, phases, counters (on-policy generated 0 < tokens; supervised generated none)
    assert "4 / 4" in page and "rollout time" in page and "student generated tokens" in page
    assert "eval/teacher_divergence" in page and "opd report" in page


def test_cli_report_and_one_line_errors(two_runs, tmp_path, capsys):
    out = tmp_path / "cli"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "loss.png").write_text("stale")
    assert main(["report", *map(str, two_runs), "-o", str(out), "--names", "rkl,kd"]) == 0
    assert (out / "notes.txt").read_text() == "keep me"  # other files survive
    _assert_png(out / "loss.png")  # the report's own files are overwritten
    page = (out / "index.html").read_text()
    assert "<th>rkl</th>" in page and "<th>kd</th>" in page
    assert "--names rkl,kd" in page  # the command line that produced it
    capsys.readouterr()

    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    cases = [
        ([str(not_a_run)], "metrics.jsonl and config.yaml"),
        ([str(tmp_path / "nope")], "no such directory"),
        ([str(two_runs[0]), "--names", "a,b,c"], "--names"),
    ]
    for args, needle in cases:
        code = main(["report", *args, "-o", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.startswith("opd: error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert needle in err and (needle == "--names" or args[0] in err), err
    assert not (tmp_path / "bad" / "index.html").exists()


def test_crashed_and_resumed_metrics(tiny_setup, tmp_path):
    import warnings

    run = tmp_path / "resumed"
    common = {"train.save_every": 2, "data.eval": "null"}
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, run, **{**common, "train.steps": 2})),
          log=lambda *_: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train.steps changed on resume
        train(load_config("on_policy_rkl", base_overrides(tiny_setup, run, **{**common, "train.steps": 4})),
              resume=True, log=lambda *_: None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    generated = sum(r["train/completion_tokens"] for r in rows)  # on-policy: the student wrote every token
    rows[2]["loss/total"] = "nan"  # what the logger writes for a non-finite loss
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "loss/tot'  # cut short by a crash
    (run / "metrics.jsonl").write_text(text)

    data = load_run(run)
    assert data.skipped_lines == 1 and data.checkpoints >= 1
    counter = [v for _, v in data.scalars("compute/student_generated_tokens")]
    assert cumulative_total(counter) == generated  # the per-invocation counter restarts on resume
    assert [s for s, _ in data.scalars("loss/total")] == [1, 2, 3, 4]
    page = write_report([run], tmp_path / "out").read_text()
    row = next(line for line in page.splitlines() if ">student generated tokens<" in line)
    assert f'<td class="val">{int(generated)}</td>' in row
    assert "unparsable metrics lines skipped" in page
    _assert_png(tmp_path / "out" / "loss.png")


def test_plots_without_data_are_skipped_and_said_so(tmp_path):
    run = tmp_path / "a" / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("loss:\n  divergence: reverse_kl\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/total": 0.5, "perf/step_s": 1.0}) + "\n")
    twin = tmp_path / "b" / "run"  # same directory name: labels are deduplicated
    shutil.copytree(run, twin)
    page = write_report([run, twin], tmp_path / "out").read_text()
    assert 'src="loss.png"' in page and "a/run" in page and "b/run" in page
    for key in ("divergence", "accuracy", "first_error", "first_error_curve"):
        assert f'src="{PLOT_FILES[key]}"' not in page
    assert page.count("skipped: no run logged") == len(PLOT_FILES) - 1
    assert "the configs are identical" in page
    (run / "config.yaml").unlink()
    with pytest.raises(OpdError) as info:
        write_report([run], tmp_path / "out2")
    assert str(info.value) == f"{run} is not an opd run directory: missing config.yaml"


def test_escaping_and_odd_names(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("note: '<script>alert(1)</script>'\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/accuracy": 0.25}) + "\n")
    page = write_report([run, run], tmp_path / "out", names=["_$x$ <b>", "_$x$ <b>"]).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "_$x$ &lt;b&gt; (2)" in page
    _assert_png(tmp_path / "out" / "accuracy.png")
