"""The measurements behind ``opd doctor`` and the training-time ``eval/...`` diagnostics."""

from __future__ import annotations

import json
import math

import torch

from conftest import base_overrides
from opd.config import load_config
from opd.diagnostics import Calibration, cut_position, length_stats, topk_overlap
from opd.signal import TeacherSignal


def test_topk_overlap_by_hand():
    # one position, vocabulary of 4; the student's top-2 is {0, 1}, the teacher's {2, 1}
    student = torch.log(torch.tensor([[[0.5, 0.3, 0.1, 0.1]]]))
    teacher = torch.log(torch.tensor([[[0.05, 0.3, 0.6, 0.05]]]))
    mask, ids = torch.ones(1, 1), torch.tensor([[0]])
    full = topk_overlap(student, TeacherSignal(logits_BCV=teacher), ids, mask, k=2, temperature=1.0, vocab_size=4)
    assert full.exact and full.positions == 1
    assert math.isclose(full.teacher_mass_in_student_topk, 0.35, rel_tol=1e-5)  # p_T(0) + p_T(1)
    assert math.isclose(full.student_mass_in_teacher_topk, 0.4, rel_tol=1e-5)  # q(2) + q(1)
    assert math.isclose(full.teacher_topk_mass, 0.9, rel_tol=1e-5)
    assert full.sampled_outside_teacher_topk == 1.0  # token 0 is not in {2, 1}
    # a served teacher's top-2 only: the same numbers, its mass in the student's top-k a lower bound
    top = torch.log(torch.tensor([[[0.6, 0.3]]]))
    served = topk_overlap(student, TeacherSignal(topk_logprobs_BCK=top, topk_ids_BCK=torch.tensor([[[2, 1]]])), ids,
                          mask, k=5, temperature=1.0, vocab_size=4)
    assert not served.exact and served.k == 2
    assert math.isclose(served.teacher_mass_in_student_topk, 0.3, rel_tol=1e-5)
    assert math.isclose(served.student_mass_in_teacher_topk, 0.4, rel_tol=1e-5)
    assert topk_overlap(student, TeacherSignal(), ids, mask, k=2, temperature=1.0, vocab_size=4) is None
    assert topk_overlap(student, TeacherSignal(logits_BCV=teacher), ids, torch.zeros(1, 1), k=2, temperature=1.0,
                        vocab_size=4) is None


def test_length_stats_and_cuts():
    stats = length_stats([[5, 6, 2], [2], [5, 6, 7, 8]], {2}, max_new_tokens=4)
    assert stats.mean_tokens == (2 + 0 + 4) / 3 and stats.max_tokens == 4
    assert stats.eos_fraction == 2 / 3 and stats.truncated_fraction == 1 / 3 and stats.empty_fraction == 1 / 3
    assert [cut_position(4, f) for f in (0.25, 0.5, 0.75)] == [1, 2, 3]
    assert cut_position(1, 0.25) == 1 and cut_position(0, 0.5) == 0 and cut_position(3, 1.0) == 3
    cal = Calibration((0.5,), [0.2], [0.0], 0.0, 0.0, 4)
    assert math.isnan(cal.ratio) and "eval/calibration_ratio" not in cal.metrics()


def test_training_logs_the_diagnostics_on_eval_every(tiny_setup, tmp_path):
    from opd.trainer import train

    out = tmp_path / "run"
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, out, **{"train.eval_every": 2, "train.steps": 3})),
          log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 3]
    keys = ("eval/topk_teacher_mass", "eval/topk_student_mass_in_teacher", "eval/topk_teacher_mass_in_student",
            "eval/topk_sampled_outside_teacher", "eval/calibration_student_prefix", "eval/calibration_teacher_prefix",
            "eval/student_length_mean", "eval/student_eos_fraction", "eval/student_truncated_fraction",
            "eval/student_empty_fraction")
    for row in evals:
        for key in keys:
            assert 0.0 <= row[key] <= (6 if key == "eval/student_length_mean" else 1.0), (key, row[key])
    off = tmp_path / "off"
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, off, **{"eval.diagnostics": False})),
          log=lambda *_: None)
    last = json.loads((off / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval/accuracy" in last and not any(key in last for key in keys)
