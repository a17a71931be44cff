"""Config validation and CLI error handling: one line, exit code 2, nothing written."""

from __future__ import annotations

import pytest

from conftest import base_overrides
from opd.cli import main
from opd.config import apply_overrides, load_config, recipe_names
from opd.errors import ConfigError


def test_shipped_recipes_load():
    assert set(recipe_names()) >= {"supervised_kd", "seqkd", "gkd", "on_policy_rkl"}
    for name in recipe_names():
        teacher = [] if name in ("opsd", "sdft") else ["teacher.model=t"]  # self-teachers have no model
        cfg = load_config(name, ["model.student=s", *teacher, "data.train=d.jsonl", "data.eval=e.jsonl"])
        assert cfg.train.steps > 0


def test_overrides_parse_yaml_scalars():
    data = apply_overrides({"loss": {"beta": 0.5}}, ["loss.beta=0.25", "train.progress=false", "data.eval=null"])
    assert data == {"loss": {"beta": 0.25}, "train": {"progress": False}, "data": {"eval": None}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.beta=1.5", "loss.beta"),
        ("loss.alpha=-0.1", "loss.alpha"),
        ("rollout.on_policy_fraction=2", "rollout.on_policy_fraction"),
        ("temperature=0", "temperature"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("loss.divergence=kl", "loss.divergence"),
        ("loss.bogus=1", "unknown key"),
        ("nonsense=1", "unknown key"),
        ("train.steps=0", "train.steps"),
    ],
)
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("gkd", ["model.student=s", "teacher.model=t", "data.train=d.jsonl", override])


def test_nll_with_student_samples_is_refused():
    with pytest.raises(ConfigError, match="on_policy_fraction=0"):
        load_config("seqkd", ["model.student=s", "teacher.model=t", "data.train=d", "rollout.on_policy_fraction=1"])


def _run_cli(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _assert_one_line_error(code, err, needle):
    assert code == 2
    assert err.startswith("opd: error:"), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert needle in err, err


def test_cli_errors_are_one_line(tiny_setup, tmp_path, capsys):
    out = tmp_path / "run"
    base = base_overrides(tiny_setup, out, **{"train.steps": 1})
    cases = [
        (["train", "no_such_recipe"], "neither a file nor a recipe"),
        (["train", "gkd", *base, "loss.beta=3"], "loss.beta"),
        (["train", "gkd", *base, "model.student=/nope/student"], "does not exist"),
        (["train", "gkd", *base, "data.train=/nope/train.jsonl"], "does not exist"),
        (["train", "gkd", *base, "oops"], "section.key=value"),
    ]
    for args, needle in cases:
        code, err = _run_cli(capsys, args)
        _assert_one_line_error(code, err, needle)
    assert not out.exists()  # nothing written for rejected configs


def test_malformed_jsonl_names_file_and_line(tiny_setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 2 =", "answer": "+ 1 3"}\n{"prompt": "1 2 = \n')
    code, err = _run_cli(capsys, ["train", "gkd", *base_overrides(tiny_setup, tmp_path / "r", **{
        "data.train": str(bad)})])
    _assert_one_line_error(code, err, "bad.jsonl:2")


def test_missing_answer_for_off_policy(tiny_setup, tmp_path, capsys):
    data = tmp_path / "noanswer.jsonl"
    data.write_text('{"prompt": "1 2 ="}\n')
    code, err = _run_cli(capsys, ["train", "supervised_kd", *base_overrides(tiny_setup, tmp_path / "r", **{
        "data.train": str(data)})])
    _assert_one_line_error(code, err, "missing reference `answer`")


def test_debug_shows_traceback(capsys):
    with pytest.raises(ConfigError):
        main(["train", "no_such_recipe", "--debug"])


def test_help_for_every_command(capsys):
    for command in ("train", "eval", "demo"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "usage: opd " + command in capsys.readouterr().out


def test_print_config(capsys):
    assert main(["train", "on_policy_rkl", "model.student=s", "teacher.model=t", "data.train=d.jsonl",
                 "--print-config"]) == 0
    assert "divergence: reverse_kl" in capsys.readouterr().out


def test_eval_command(tiny_setup, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--student", str(tiny_setup / "student"), "--teacher", str(tiny_setup / "teacher"),
                 "--data", str(tiny_setup / "eval.jsonl"), "--max-new-tokens", "6", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "eval/accuracy" in printed and "eval/teacher_divergence" in printed
    assert out.exists()


def test_readme_config_reference_is_current():
    from pathlib import Path

    from opd.config import config_reference_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert config_reference_markdown() in readme, "regenerate with: python -m opd.config"


def test_argparse_errors_are_one_line(capsys):
    for args in (["train"], ["eval", "--student", "x", "--data", "y", "--max-new-tokens", "many"], ["bogus"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("opd: error:") and len(err.splitlines()) == 1, err


def test_on_policy_schedule_interpolates_and_is_checked():
    from opd.config import RolloutConfig

    cfg = RolloutConfig(on_policy_schedule=[[0.0, 0.0], [0.25, 0.0], [0.5, 1.0]])
    assert [cfg.on_policy_fraction_at(s, 101) for s in (1, 26, 38, 51, 101)] == [0.0, 0.0, 0.48, 1.0, 1.0]
    assert cfg.on_policy_range() == (0.0, 1.0)
    assert RolloutConfig(on_policy_fraction=0.3).on_policy_fraction_at(7, 10) == 0.3
    for bad in ([[0.5, 0.0], [0.5, 1.0]], [[0.0, 1.5]], []):
        with pytest.raises(ValueError):
            RolloutConfig(on_policy_schedule=bad)
    # a policy-gradient objective needs student samples throughout
    with pytest.raises(ConfigError, match="on_policy_fraction=1"):
        load_config("sampled_token_opd", ["model.student=s", "teacher.model=t", "data.train=d",
                                           "rollout.on_policy_schedule=[[0, 0], [1, 1]]"])


def _numeric_fields(kind: type) -> list[str]:
    """Dotted keys of every setting whose type admits ``kind`` (int or float) as a plain value."""
    import typing

    from pydantic import BaseModel

    from opd.config import RunConfig

    def admits(annotation: object) -> bool:
        if annotation is kind:
            return True
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None), typing.Annotated):
            return any(admits(a) for a in typing.get_args(annotation))
        return False

    keys = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                walk(info.annotation, f"{prefix}{name}.")
            elif admits(info.annotation):
                keys.append(f"{prefix}{name}")

    walk(RunConfig, "")
    return keys


_BASE = ["model.student=s", "teacher.model=t", "data.train=d.jsonl"]


def test_every_float_setting_refuses_non_finite_values():
    """Issue 19.1: `optim.lr=.inf` trained to an all-NaN final model; now every float setting refuses it."""
    keys = _numeric_fields(float)
    assert {"optim.lr", "temperature", "loss.beta", "optim.max_grad_norm", "loss.importance_cap"} <= set(keys)
    for key in keys:
        for bad in (".inf", "-.inf", ".nan"):
            with pytest.raises(ConfigError, match=rf"{key}: Input should be a finite number"):
                load_config("gkd", [*_BASE, f"{key}={bad}"])
    for override, key in (("optim.betas=[0.9, .nan]", "optim.betas.1"),
                          ("rollout.on_policy_schedule=[[0, 0], [1, .inf]]", "rollout.on_policy_schedule.1.1")):
        with pytest.raises(ConfigError, match=f"{key}: Input should be a finite number"):
            load_config("gkd", [*_BASE, override])


def test_booleans_are_not_numbers_but_number_strings_from_overrides_are():
    """Issue 19.4: `train.steps=true` ran one step (bool is an int in Python); every int and float setting
    now refuses booleans, while `key=3` overrides (YAML scalars) and `1e-5` (a string to PyYAML) still load."""
    keys = _numeric_fields(int) + _numeric_fields(float)
    assert {"train.steps", "train.seed", "optim.lr", "rollout.top_k"} <= set(keys)
    for key in [*keys, "rollout.async_steps", "train.zero_stage"]:
        for bad in ("true", "false"):
            with pytest.raises(ConfigError, match=rf"{key}: must be a number, not {bad}"):
                load_config("gkd", [*_BASE, f"{key}={bad}"])
    with pytest.raises(ConfigError, match="optim.betas.0: must be a number"):
        load_config("gkd", [*_BASE, "optim.betas=[true, 0.9]"])
    cfg = load_config("gkd", [*_BASE, "train.steps=3", "optim.lr=1e-5", "train.seed=7", "loss.beta=1"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.seed, cfg.loss.beta) == (3, 1e-5, 7, 1.0)
    assert type(cfg.train.steps) is int and type(cfg.loss.beta) is float
