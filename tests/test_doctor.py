"""``opd doctor``: every check has a case that must FAIL and one that passes, on tiny local models.

FAIL cases: a teacher scored under the student's chat template, a loss computed in the wrong KL
direction, a served teacher behind a proxy that perturbs its log-probs, a sampler with stale
weights, a top-k far too small, a teacher trained on clean prefixes only (it cannot recover from
the student's mistakes), answers cut off by max_new_tokens, and a memory budget a step exceeds.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from conftest import base_overrides, tiny_llama, write_rows
from opd.cli import main
from opd.config import load_config
from opd.doctor import CHECKS, Options, Thresholds, diagnose, generation_suffix, report
from opd.fault_proxy import FaultProxy
from opd.serve import CompletionsBackend, make_server

TEACHER_DIR = Path(__file__).resolve().parents[1] / "src" / "opd" / "demo" / "assets" / "teacher"


def _statuses(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        head, _, rest = line.partition(": ")
        if head in ("PASS", "WARN", "FAIL", "SKIP"):
            out[rest.split(":", 1)[0]] = head
    return out


def _doctor(capsys, config: str, overrides: list[str], *flags: str) -> tuple[int, dict[str, str], str]:
    code = main(["doctor", config, *overrides, *flags])
    output = capsys.readouterr().out
    return code, _statuses(output), output


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from opd.demo import task

    root = tmp_path_factory.mktemp("doctor_demo")
    train, held_out = task.make_splits(64, 16, seed=0)
    task.write_jsonl(train, root / "train.jsonl")
    task.write_jsonl(held_out, root / "eval.jsonl")
    return root


def _demo(root: Path, **extra: object) -> list[str]:
    """The demo teacher as teacher (and student): the shipped model, the demo task's data."""
    items = {"model.student": TEACHER_DIR, "teacher.model": TEACHER_DIR, "data.train": root / "train.jsonl",
             "data.eval": root / "eval.jsonl", "rollout.max_new_tokens": 14, "train.batch_size": 8,
             "eval.scorer": "opd.demo.run:demo_is_correct", "train.output_dir": root / "unused"}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def test_a_shipped_recipe_with_the_demo_teacher_gets_a_full_clean_report(demo_data, capsys):
    code, statuses, output = _doctor(capsys, "on_policy_rkl", _demo(demo_data), "--prompts", "8")
    assert code == 0, output
    assert set(statuses) == set(CHECKS)
    assert statuses.pop("signal") == "SKIP"  # a local teacher: nothing remote to verify
    assert set(statuses.values()) == {"PASS"}, output
    assert "reverse KL, KL(p_S || p_T)" in output and "teacher sees: '<s> " in output
    assert "from student" in output and output.rstrip().splitlines()[-1].startswith("opd doctor: 7 PASS, 1 SKIP")


def test_length_fails_when_answers_are_cut_off(demo_data, capsys):
    # the demo's answers are 13 tokens + EOS: 6 new tokens truncate every one of them
    code, statuses, output = _doctor(capsys, "on_policy_rkl", _demo(demo_data, **{"rollout.max_new_tokens": 6}),
                                     "--only", "length", "--prompts", "4")
    assert code == 1 and statuses == {"length": "FAIL"}, output
    assert "truncated 100%" in output and "raise it" in output


def test_memory_fails_beyond_the_budget(demo_data, capsys):
    code, statuses, output = _doctor(capsys, "on_policy_rkl", _demo(demo_data), "--only", "memory",
                                     "--memory-gb", "0.001")
    assert code == 1 and statuses == {"memory": "FAIL"}, output
    assert "does not fit" in output


def test_topk_passes_with_a_peaked_teacher_and_fails_when_k_is_far_too_small(demo_data, tiny_setup, tmp_path,
                                                                            capsys):
    # The demo teacher puts nearly all its mass on a couple of tokens: top-4 keeps it.
    code, statuses, output = _doctor(capsys, "topk_fkl", _demo(demo_data, **{"teacher.top_k": 4}), "--only", "topk")
    assert code == 0 and statuses == {"topk": "PASS"}, output
    # An untrained teacher spreads its mass over all 17 tokens: its top-1 keeps ~1/17 of it.
    code, statuses, output = _doctor(capsys, "topk_fkl", base_overrides(tiny_setup, tmp_path / "r", **{
        "teacher.top_k": 1}), "--only", "topk")
    assert code == 1 and statuses == {"topk": "FAIL"}, output
    assert "far too small" in output


# --- template ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templated(tiny_setup, tmp_path_factory):
    """Student and teacher with the same vocabulary but different chat templates."""
    from opd.models import load_tokenizer

    root = tmp_path_factory.mktemp("templates")
    body = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for name, header in (("student", " ="), ("teacher", " + =")):
        shutil.copytree(tiny_setup / name, root / name)
        tok = load_tokenizer(str(root / name))
        tok.chat_template = body + "{% if add_generation_prompt %}" + header + "{% endif %}"
        tok.save_pretrained(root / name)
    digits = [" ".join(str((i * 3 + j) % 10) for j in range(4)) for i in range(8)]
    # pre-rendered with the student's template (" =" ends the prompt) vs chat rows each model renders
    write_rows(root / "rendered.jsonl", [{"prompt": d + " ="} for d in digits])
    write_rows(root / "chat.jsonl", [{"messages": [{"role": "user", "content": d}]} for d in digits])
    return root


def test_template_fails_when_the_teacher_sees_the_students_chat_template(templated, tmp_path, capsys):
    from opd.models import load_tokenizer

    assert generation_suffix(load_tokenizer(str(templated / "teacher"))) == " + ="
    common = {"model.student": templated / "student", "teacher.model": templated / "teacher", "data.eval": "null"}
    code, statuses, output = _doctor(capsys, "on_policy_rkl", base_overrides(
        templated, tmp_path / "a", **common, **{"data.train": templated / "rendered.jsonl"}), "--only", "template")
    assert code == 1 and statuses == {"template": "FAIL"}, output
    assert "the teacher sees the student's chat template" in output
    code, statuses, output = _doctor(capsys, "on_policy_rkl", base_overrides(
        templated, tmp_path / "b", **common, **{"data.train": templated / "chat.jsonl"}), "--only", "template")
    assert code == 0 and statuses == {"template": "PASS"}, output
    seen = {line.split(": ", 1)[0].strip(): line.split(": ", 1)[1] for line in output.splitlines() if "sees: " in line}
    assert seen["student sees"].endswith(" ='") and seen["teacher sees"] == seen["student sees"][:-3] + " + ='"


# --- objective -----------------------------------------------------------------------------------------


def test_objective_fails_when_the_loss_runs_the_other_kl_direction(tiny_setup, tmp_path, capsys, monkeypatch):
    overrides = base_overrides(tiny_setup, tmp_path / "r", **{"temperature": 2.0})
    code, statuses, output = _doctor(capsys, "on_policy_rkl", overrides, "--only", "objective")
    assert code == 0 and statuses == {"objective": "PASS"}, output
    assert "both sides scaled by 1/T = 0.5" in output

    from opd import objectives

    correct = objectives.token_divergence

    def swapped(*args, kind, **kwargs):  # a loss that wrote KL(p_T || p_S) where it meant KL(p_S || p_T)
        return correct(*args, kind={"reverse_kl": "forward_kl"}.get(kind, kind), **kwargs)

    monkeypatch.setattr(objectives, "token_divergence", swapped)
    code, statuses, output = _doctor(capsys, "on_policy_rkl", overrides, "--only", "objective")
    assert code == 1 and statuses == {"objective": "FAIL"}, output
    assert "it computes forward_kl (direction swapped)" in output


# --- served teacher signal -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_setup):
    srv = make_server(CompletionsBackend(str(tiny_setup / "teacher")))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_signal_fails_behind_a_proxy_that_perturbs_log_probs(served, tiny_setup, tmp_path, capsys):
    def overrides(url: str) -> list[str]:
        return base_overrides(tiny_setup, tmp_path / "r", **{"teacher.kind": "served", "teacher.url": url,
                                                             "teacher.top_k": 5, "data.eval": "null"})

    code, statuses, output = _doctor(capsys, "topk_fkl", overrides(served), "--only", "signal")
    assert code == 0 and statuses == {"signal": "PASS"}, output
    assert "top-5: 100.0% of ids in the same rank" in output
    proxy = FaultProxy(served, schedule=["perturb"], perturb_sigma=0.3).start()
    try:
        code, statuses, output = _doctor(capsys, "topk_fkl", overrides(proxy.url), "--only", "signal")
    finally:
        proxy.stop()
    assert code == 1 and statuses == {"signal": "FAIL"}, output
    assert "are not the model's" in output and "not deterministic" in output


def test_signal_checks_a_teacher_cache_against_the_model_that_should_have_scored_it(tiny_setup, tmp_path, capsys):
    from opd.cache_teacher import build_teacher_cache

    made = load_config("topk_fkl", base_overrides(tiny_setup, tmp_path / "u", **{"teacher.top_k": 4}))
    cache = build_teacher_cache(made, tmp_path / "cache", rows=8, log=lambda *_: None)
    overrides = base_overrides(tiny_setup, tmp_path / "r", **{"teacher.kind": "cache", "teacher.cache": cache,
                                                             "teacher.model": "null", "teacher.top_k": 4,
                                                             "data.eval": "null"})
    # the cache records the teacher that scored it: recomputed with that one, the numbers agree
    code, statuses, output = _doctor(capsys, "topk_fkl", overrides, "--only", "signal")
    assert code == 0 and statuses == {"signal": "PASS"}, output
    # a cache believed to come from another checkpoint (here: the student) is caught
    code, statuses, output = _doctor(capsys, "topk_fkl", overrides, "--only", "signal",
                                     "--local-teacher", str(tiny_setup / "student"))
    assert code == 1 and statuses == {"signal": "FAIL"}, output
    assert "max |cached - local|" in output


# --- sampler -------------------------------------------------------------------------------------------


def test_sampler_fails_with_stale_weights(tiny_setup, tmp_path):
    from opd.build import build_run
    from opd.models import load_causal_lm
    from opd.rollout import StudentSampler
    from opd.trainer import _distributed

    config = load_config("on_policy_rkl", base_overrides(tiny_setup, tmp_path / "r"))
    accelerator, _ = _distributed(config)
    run = build_run(config, accelerator)
    checks = diagnose(config, Options(only=("sampler",)), run=run, accelerator=accelerator)
    assert [c.status for c in checks] == ["PASS"], report(checks)

    stale = load_causal_lm(str(tiny_setup / "teacher"))  # an engine still holding other weights

    class StaleEngine(StudentSampler):
        def sample(self, student, prompts, params, generator=None):
            return super().sample(stale, prompts, params, generator)

    run.rollouts.policy.sampler = StaleEngine(run.tokenizer)
    checks = diagnose(config, Options(only=("sampler",)), run=run, accelerator=accelerator)
    assert [c.status for c in checks] == ["FAIL"], report(checks)
    assert "stale engine weights" in checks[0].advice


# --- calibration ---------------------------------------------------------------------------------------


def corrected_answer(prompt: str, completion: str, reference: str | None) -> bool:
    """The calibration task's scorer: the right digit, or a wrong first symbol withdrawn with '-'."""
    return " ".join(completion.split()) in (reference, f"+ - {reference}")


def _memorise(tokenizer, pairs: list[tuple[str, str]], seed: int, steps: int):
    """A one-layer model trained to write ``answer`` after ``prompt`` for each pair."""
    model = tiny_llama(len(tokenizer), hidden=32, layers=1, seed=seed)
    rows = [(tokenizer(p).input_ids, tokenizer(a, add_special_tokens=False).input_ids + [2]) for p, a in pairs]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attention = torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attention[i, : len(p) + len(a)] = 1
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def recovery_task(tokenizer, tmp_path_factory):
    """Prompt "d =", answer "d". The student always starts wrong ("+"). One teacher saw only clean
    answers; the other also saw the student's mistake followed by its correction ("+ - d")."""
    root = tmp_path_factory.mktemp("recovery")
    clean = [(f"{d} =", f"{d}") for d in range(10)]
    models = {"student": _memorise(tokenizer, [(f"{d} =", "+") for d in range(10)], 0, 60),
              "clean_teacher": _memorise(tokenizer, clean, 0, 100),
              "robust_teacher": _memorise(tokenizer, clean + [(f"{d} =", f"+ - {d}") for d in range(10)], 0, 120)}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"prompt": f"{d} =", "answer": f"{d}"} for d in range(10)]
    write_rows(root / "train.jsonl", rows)
    return root


@pytest.mark.parametrize("teacher, expected", [("clean_teacher", "FAIL"), ("robust_teacher", "PASS")])
def test_calibration_fails_for_a_teacher_that_never_saw_a_mistake(recovery_task, tmp_path, capsys, teacher,
                                                                 expected):
    overrides = base_overrides(recovery_task, tmp_path / "r", **{
        "model.student": recovery_task / "student", "teacher.model": recovery_task / teacher,
        "data.train": recovery_task / "train.jsonl", "data.eval": recovery_task / "train.jsonl",
        "eval.scorer": "test_doctor:corrected_answer", "rollout.max_new_tokens": 4})
    code, statuses, output = _doctor(capsys, "on_policy_rkl", overrides, "--only", "calibration", "--prompts", "10")
    assert statuses == {"calibration": expected}, output
    assert code == (1 if expected == "FAIL" else 0)
    assert "whole answers: student 0.00, teacher 1.00" in output  # the student is always wrong, the teachers right
    if expected == "FAIL":
        assert "cannot finish the student's answers" in output


# --- the command line ----------------------------------------------------------------------------------


def test_bad_options_are_one_line_errors(demo_data, capsys):
    assert main(["doctor", "on_policy_rkl", *_demo(demo_data), "--only", "nope"]) == 2
    assert "--only 'nope'" in capsys.readouterr().err
    assert main(["doctor", "on_policy_rkl", *_demo(demo_data), "--threshold", "calibration_fail"]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert Thresholds.parse(["calibration_fail=0.3"]).calibration_fail == 0.3


def test_every_shipped_recipe_gets_a_report_without_an_internal_error(tiny_setup, tmp_path):
    """No check crashes on any recipe (tiny untrained models: verdicts vary, errors must not)."""
    from opd.config import recipe_names
    from test_methods import RECIPE_OVERRIDES

    for recipe in sorted(set(recipe_names()) - {"cross_tokenizer"}):  # needs a second tokenizer: its own test file
        config = load_config(recipe, base_overrides(tiny_setup, tmp_path / recipe, **RECIPE_OVERRIDES.get(recipe, {})))
        checks = diagnose(config, Options(prompts=2, debug=True))
        assert [c.name for c in checks] == list(CHECKS), recipe
        assert not [c.line() for c in checks if c.number in ("error", "cannot load the run")], recipe
