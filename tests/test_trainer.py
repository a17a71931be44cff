"""End-to-end training on tiny real models: opd train, exact resume, final export, normalisation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import base_overrides, tiny_llama
from opd.cli import main
from opd.config import load_config
from opd.models import completion_logits
from opd.trainer import train


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("recipe", ["on_policy_rkl", "supervised_kd", "gkd", "seqkd", "sampled_token_opd"])
def test_opd_train_cli_end_to_end(tiny_setup, tmp_path, recipe, capsys):
    out = tmp_path / "run"
    assert main(["train", recipe, *base_overrides(tiny_setup, out)]) == 0
    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.vocab_size == 17
    assert (final / "tokenizer.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss/total"]) for r in train_rows)
    if recipe != "sampled_token_opd":  # a policy-gradient surrogate can be negative
        assert all(r["loss/total"] >= 0 for r in train_rows)
    assert "eval/accuracy" in rows[-1] and "eval/teacher_divergence" in rows[-1]
    assert (out / "config.yaml").exists()
    before = load_file(str(tiny_setup / "student" / "model.safetensors"))
    after = _weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it actually trained


def test_realised_on_policy_fraction_is_logged_per_sample(tiny_setup, tmp_path):
    out = tmp_path / "mix"
    cfg = load_config("gkd", base_overrides(tiny_setup, out, **{"train.batch_size": 8, "train.steps": 4,
                                                                    "data.eval": "null"}))
    train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["rollout/on_policy_fraction"] for r in rows if "rollout/on_policy_fraction" in r]
    assert len(fractions) == 4
    # per-sample coins: with 8 samples per step, fractions strictly between 0 and 1 occur
    assert any(0.0 < f < 1.0 for f in fractions)


def _interrupt_after(run_dir, step):
    """What a crash after checkpoint ``step`` leaves: later checkpoints and the final model gone."""
    import shutil

    for path in (run_dir / "checkpoints").iterdir():
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    shutil.rmtree(run_dir / "final")
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 99, "loss/tot')  # a line cut short by the crash


@pytest.mark.parametrize("recipe", ["gkd", "on_policy_rkl"])
def test_exact_resume(tiny_setup, tmp_path, recipe):
    import shutil

    common = {"train.steps": 4, "train.save_every": 2, "data.eval": "null", "optim.warmup_steps": 0,
              "train.keep_checkpoints": 3}
    straight = tmp_path / "straight"
    train(load_config(recipe, base_overrides(tiny_setup, straight, **common)), log=lambda *_: None)

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    _interrupt_after(resumed, 2)
    cfg = load_config(recipe, base_overrides(tiny_setup, resumed, **common))
    train(cfg, resume=True, log=lambda *_: None)

    a, b = _weights(straight / "final"), _weights(resumed / "final")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    before = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    after = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/total"] for r in before] == [r["loss/total"] for r in after]


def test_corrupt_checkpoint_falls_back_then_fails_in_one_line(tiny_setup, tmp_path, capsys):
    out = tmp_path / "corrupt"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "train.steps": 2, "train.save_every": 1, "data.eval": "null"})]
    assert main(args) == 0
    reference = _weights(out / "final")
    # the newest checkpoint is damaged: resume verifies checksums and falls back to step 1
    (out / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert main([*args, "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    after = _weights(out / "final")
    assert all(torch.equal(reference[k], after[k]) for k in reference)  # step 2 redone exactly
    # every checkpoint damaged: one line, exit 2, nothing loaded
    for folder in (out / "checkpoints").iterdir():
        (folder / "optimizer.pt").write_bytes(b"x")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "failed its checksum" in err and len(err.splitlines()) == 1


def test_failed_start_leaves_the_run_dir_reusable(tiny_setup, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 2 =", "answer": "+ 1 3"}\n{oops\n')
    out = tmp_path / "run"
    args = ["train", "supervised_kd", *base_overrides(tiny_setup, out, **{"train.steps": 1, "data.eval": "null"})]
    assert main([*args, f"data.train={bad}"]) == 2
    assert not (out / "config.yaml").exists()
    assert main(args) == 0  # fixed data, same directory


def test_keep_last_checkpoints(tiny_setup, tmp_path):
    out = tmp_path / "keep"
    cfg = load_config("on_policy_rkl", base_overrides(tiny_setup, out, **{
        "train.steps": 4, "train.save_every": 1, "train.keep_checkpoints": 2, "data.eval": "null"}))
    train(cfg, log=lambda *_: None)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004"]


def test_gradient_accumulation_does_not_change_the_objective(tiny_setup, tmp_path):
    """batch 4 x accum 1 and batch 2 x accum 2 see the same examples and must take the same step."""
    common = {"train.steps": 1, "data.eval": "null", "optim.max_grad_norm": "null", "optim.warmup_steps": 0}
    one = tmp_path / "one"
    two = tmp_path / "two"
    train(load_config("supervised_kd", base_overrides(tiny_setup, one, **common)), log=lambda *_: None)
    train(load_config("supervised_kd", base_overrides(tiny_setup, two, **{**common, "train.batch_size": 2,
                                                                           "train.grad_accum": 2})),
          log=lambda *_: None)
    a, b = _weights(one / "final"), _weights(two / "final")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_run_dir_holding_a_run_is_refused(tiny_setup, tmp_path, capsys):
    out = tmp_path / "taken"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{"train.steps": 1, "data.eval": "null"})]
    assert main(args) == 0
    before = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opd: error:") and "already holds a run" in err and len(err.splitlines()) == 1
    assert (out / "config.yaml").read_text() == before
    # resuming with a different objective is refused too
    changed = [*args, "loss.divergence=forward_kl", "--resume"]
    assert main(changed) == 2
    assert "different config" in capsys.readouterr().err


def test_mismatched_teacher_tokenizer_is_refused_by_the_cli(tiny_setup, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_llama

    core = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "<unk>": 5}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    teacher_dir = tmp_path / "other_teacher"
    tiny_llama(len(other)).save_pretrained(teacher_dir)
    other.save_pretrained(teacher_dir)
    out = tmp_path / "run"
    assert main(["train", "on_policy_rkl", *base_overrides(tiny_setup, out), f"teacher.model={teacher_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizers differ" in err and len(err.splitlines()) == 1
    assert not (out / "config.yaml").exists()


def test_eval_every_n_steps(tiny_setup, tmp_path):
    out = tmp_path / "evals"
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, out, **{"train.steps": 4, "train.eval_every": 2})),
          log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2, 4]
    assert all(0.0 <= r["eval/teacher_divergence"] for r in rows if "eval/accuracy" in r)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny_setup, tmp_path, capsys):
    import torch as _torch
    from transformers import AutoModelForCausalLM as _Auto

    teacher = _Auto.from_pretrained(tiny_setup / "teacher")
    with _torch.no_grad():
        teacher.lm_head.weight.fill_(float("nan"))
    nan_dir = tmp_path / "nan_teacher"
    teacher.save_pretrained(nan_dir)
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_setup / "teacher" / name, nan_dir / name)
    out = tmp_path / "run"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "train.steps": 4, "train.max_nonfinite_steps": 2, "data.eval": "null"}), f"teacher.model={nan_dir}"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "NaN/inf for 2 steps in a row" in err and len(err.splitlines()) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/skipped_nonfinite_total"] == 1
    assert not (out / "final").exists()
    assert (out / "config.yaml").exists()  # the run directory is left intact for inspection


def test_prefix_opd_schedule_truncates_rollouts(tiny_setup, tmp_path):
    from opd.rollout import rollout_length

    cfg = load_config("prefix_opd", ["model.student=s", "teacher.model=t", "data.train=d.jsonl",
                                     "rollout.prefix_tokens=2", "rollout.prefix_tokens_final=5",
                                     "rollout.max_new_tokens=6"])
    assert [rollout_length(cfg.rollout, s, 4) for s in (1, 2, 3, 4)] == [2, 3, 4, 5]
    out = tmp_path / "prefix"
    train(load_config("prefix_opd", base_overrides(tiny_setup, out, **{
        "train.steps": 4, "rollout.prefix_tokens": 2, "rollout.prefix_tokens_final": 5, "data.eval": "null"})),
        log=lambda *_: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/max_new_tokens"] for r in rows] == [2, 3, 4, 5]
    assert all(r["rollout/completion_tokens_mean"] <= r["rollout/max_new_tokens"] for r in rows)


def test_lora_student_trains_adapters_and_exports_merged(tiny_setup, tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    assert main(["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "model.lora_r": 4, "optim.lr": 1e-2, "data.eval": "null"})]) == 0
    assert "compute: generation" in capsys.readouterr().out
    assert (out / "final" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "final")  # a plain model: adapters merged in
    base = AutoModelForCausalLM.from_pretrained(tiny_setup / "student")
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # only the adapted linear layers moved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["compute/flops_student"] > rows[-1]["compute/flops_generation"] > 0


def test_gradient_checkpointing_gives_the_same_weights(tiny_setup, tmp_path):
    common = {"data.eval": "null", "train.steps": 2}
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, tmp_path / "plain", **common)),
          log=lambda *_: None)
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, tmp_path / "ckpt", **common,
                                                      **{"train.gradient_checkpointing": True})),
          log=lambda *_: None)
    a, b = _weights(tmp_path / "plain" / "final"), _weights(tmp_path / "ckpt" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_fp16_on_cpu_is_refused_in_one_line(tiny_setup, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert main(["train", "gkd", *base_overrides(tiny_setup, tmp_path / "r", **{
        "train.mixed_precision": "fp16"})]) == 2
    err = capsys.readouterr().err.strip()
    assert "fp16 needs a CUDA GPU" in err and len(err.splitlines()) == 1


def test_bf16_mixed_precision_covers_student_rollouts_and_teacher(tiny_setup, tmp_path, monkeypatch):
    """train.mixed_precision=bf16: the teacher scores under the same autocast as the student, the
    weights stay float32 and the run trains."""
    from opd.teachers import LocalTeacher

    seen: list[bool] = []
    real_score = LocalTeacher.score

    def observed_score(self, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                    and self.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16)
        return real_score(self, batch)

    monkeypatch.setattr(LocalTeacher, "score", observed_score)
    out = tmp_path / "bf16"
    train(load_config("on_policy_rkl", base_overrides(tiny_setup, out, **{
        "data.eval": "null", "train.steps": 2, "train.mixed_precision": "bf16"})), log=lambda *_: None)
    assert seen and all(seen)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss/total"]) for r in rows if "loss/total" in r)
    before = load_file(str(tiny_setup / "student" / "model.safetensors"))
    after = _weights(out / "final")
    assert all(after[k].dtype == torch.float32 for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("tied", [False, True])
def test_teacher_compute_in_equals_autocast_over_fp32_weights(tokenizer, tied):
    """LocalTeacher.compute_in(bf16) stores the linear weights in bf16 once: scores are bit-identical to
    autocast over the float32 model, embeddings (and a head tied to them) stay float32, and the
    teacher also runs when called outside any autocast region (eval, upfront teacher answers)."""
    import copy

    from opd.rollout import SamplingParams, build_batch
    from opd.teachers import LocalTeacher

    model = tiny_llama(len(tokenizer), hidden=32, seed=7)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    reference = copy.deepcopy(model).eval()
    teacher = LocalTeacher(model, tokenizer)
    teacher.compute_in(torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert (model.lm_head.weight.dtype == torch.float32) == tied
    batch = build_batch([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = completion_logits(reference, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    assert torch.equal(teacher.score(batch).logits_BCV, expected)
    answers = teacher.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, greedy=True))
    assert len(answers) == 1 and 1 <= len(answers[0]) <= 4
