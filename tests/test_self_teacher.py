"""Self-distillation with privileged context (OPSD / SDFT): the student is its own teacher."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import base_overrides
from opd.cli import main
from opd.config import TeacherConfig, load_config
from opd.data import Example
from opd.errors import DataError
from opd.models import completion_logits
from opd.rollout import build_batch
from opd.teachers import SelfTeacher
from opd.trainer import train


def _example(tokenizer, prompt, answer, **extra):
    return Example(prompt, tokenizer(prompt).input_ids, answer,
                   tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id], extra)


def test_self_teacher_scores_completions_behind_the_privileged_prompt(tokenizer):
    from conftest import tiny_llama

    student = tiny_llama(len(tokenizer), seed=3).eval()
    teacher = SelfTeacher(student, tokenizer, TeacherConfig(kind="self", context_template="{answer} {prompt}",
                                                            self_weights="live"))
    examples = [_example(tokenizer, "1 2 =", "+ 1 3"), _example(tokenizer, "4 =", "- 4")]
    completions = [[5, 6, 2], [7, 2]]
    batch = build_batch([e.prompt_ids for e in examples], completions, tokenizer.pad_token_id)
    batch.examples = examples
    got = teacher.score(batch).logits_BCV
    # the same thing built by hand: privileged prompt text, tokenised, then the completion
    manual = build_batch([tokenizer("+ 1 3 1 2 =").input_ids, tokenizer("- 4 4 =").input_ids], completions,
                         tokenizer.pad_token_id)
    expected = completion_logits(student, manual.input_ids_BT, manual.attention_mask_BT, manual.completion_len)
    mask = batch.completion_mask_BC.bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)
    # and it differs from what the student sees without the context
    plain = completion_logits(student, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    assert not torch.allclose(got[mask], plain[mask], atol=1e-3)


def test_frozen_and_ema_weights(tokenizer):
    from conftest import tiny_llama

    student = tiny_llama(len(tokenizer), seed=3)
    frozen = SelfTeacher(student, tokenizer, TeacherConfig(kind="self", self_weights="frozen"))
    ema = SelfTeacher(student, tokenizer, TeacherConfig(kind="self", self_weights="ema", ema_decay=0.75))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    frozen.after_step()
    ema.after_step()
    for name, value in frozen.model.state_dict().items():
        assert torch.equal(value, start[name])
        assert torch.allclose(ema.model.state_dict()[name], start[name] + 0.25)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_missing_privileged_field_is_a_clear_error(tokenizer, tiny_setup, tmp_path, capsys):
    teacher = SelfTeacher(torch.nn.Linear(1, 1), tokenizer,
                          TeacherConfig(kind="self", context_template="{prompt} {feedback}", self_weights="live"))
    with pytest.raises(DataError, match="no `feedback`"):
        teacher.check([_example(tokenizer, "1 =", "+ 1")])
    out = tmp_path / "run"
    overrides = {"teacher.model": "null", "teacher.context_template": "{feedback} {prompt}"}
    code = main(["train", "opsd", *base_overrides(tiny_setup, out, **overrides)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no `feedback`" in err and len(err.splitlines()) == 1
    assert not (out / "config.yaml").exists()


def test_self_teacher_config_rules():
    from opd.errors import ConfigError

    base = ["model.student=s", "data.train=d.jsonl", "teacher.kind=self"]
    with pytest.raises(ConfigError, match="leave teacher.model unset"):
        load_config("on_policy_rkl", [*base, "teacher.model=t"])
    with pytest.raises(ConfigError, match="only scores student rollouts"):
        load_config("skd", base)


@pytest.mark.parametrize("recipe", ["opsd", "sdft"])
def test_self_distillation_recipes_train_and_resume_exactly(tiny_setup, tmp_path, recipe):
    common = {"teacher.model": "null", "train.steps": 4, "train.save_every": 2, "data.eval": "null"}
    straight = tmp_path / "straight"
    train(load_config(recipe, base_overrides(tiny_setup, straight, **common)), log=lambda *_: None)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows if "loss/total" in r)
    # a crash after the step-2 checkpoint: later state gone; resume (the EMA teacher is part of the
    # checkpoint) must land on the same weights
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "final")
    cfg = load_config(recipe, base_overrides(tiny_setup, resumed, **common))
    train(cfg, resume=True, log=lambda *_: None)
    from safetensors.torch import load_file

    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
