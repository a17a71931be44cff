"""The bad-input catalogue: every case must end in one readable CLI line, a non-zero exit, no
traceback, and a run directory that is either untouched or still resumable."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import base_overrides, tiny_llama, write_rows
from opd import checkpoint as ckpt
from opd.cli import main


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _cli(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err.strip()


def _check(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("opd: error:"), err
    assert needle in err, err


def _data(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


def _other_tokenizer_teacher(tmp_path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "x": 3, "<unk>": 4}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", bos_token="<s>")
    folder = tmp_path / "other_teacher"
    tiny_llama(len(other)).save_pretrained(folder)
    other.save_pretrained(folder)
    return str(folder)


# (case id, overrides or a function of tmp_path returning overrides, the recipe, the expected text)
CASES = [
    ("malformed_jsonl", lambda t: {"data.train": _data(t, "bad.jsonl", '{"prompt": "1 ="}\n{"prompt": \n')},
     "supervised_kd", "bad.jsonl:2"),
    ("missing_prompt_field", lambda t: {"data.train": _data(t, "nofield.jsonl", '{"question": "1 2 ="}\n')},
     "on_policy_rkl", "prompt"),
    ("missing_answer_off_policy", lambda t: {"data.train": _data(t, "noans.jsonl", '{"prompt": "1 2 ="}\n')},
     "supervised_kd", "answer"),
    ("empty_prompt", lambda t: {"data.train": _data(t, "empty_prompt.jsonl", '{"prompt": "", "answer": "1"}\n')},
     "on_policy_rkl", "empty"),
    ("prompt_plus_rollout_longer_than_context", {"rollout.max_new_tokens": 400}, "on_policy_rkl",
     "exceeds the student's"),
    ("non_utf8_bytes", lambda t: {"data.train": _data(t, "latin1.jsonl", b'{"prompt": "caf\xe9 ="}\n')},
     "on_policy_rkl", "UTF-8"),
    ("empty_dataset", lambda t: {"data.train": _data(t, "nothing.jsonl", "")}, "on_policy_rkl", "dataset is empty"),
    ("unknown_config_key", {"loss.betta": 0.5}, "gkd", "loss.betta: unknown key"),
    ("lambda_out_of_range", {"rollout.on_policy_fraction": 1.5}, "gkd", "rollout.on_policy_fraction"),
    ("beta_out_of_range", {"loss.beta": -0.1}, "gkd", "loss.beta"),
    ("alpha_out_of_range", {"loss.alpha": 2}, "gkd", "loss.alpha"),
    ("temperature_not_positive", {"temperature": 0}, "gkd", "temperature"),
    ("top_p_zero", {"rollout.top_p": 0}, "gkd", "rollout.top_p"),
    ("top_p_above_one", {"rollout.top_p": 1.5}, "gkd", "rollout.top_p"),
    ("mismatched_tokenizers", lambda t: {"teacher.model": _other_tokenizer_teacher(t)}, "on_policy_rkl",
     "tokenizers differ"),
    ("missing_student_path", {"model.student": "/nonexistent/student"}, "on_policy_rkl", "does not exist"),
    ("missing_teacher", {"teacher.model": "null"}, "on_policy_rkl", "teacher.model is required"),
    ("verifier_unknown", {"loss.verifier": "no_such_check"}, "kdrl", "unknown verifier"),
    ("unknown_attention_kernel", {"model.attn_implementation": "sdpaa"}, "on_policy_rkl",
     "cannot use attn_implementation='sdpaa'"),
    ("unknown_teacher_attention_kernel", {"teacher.attn_implementation": "fast"}, "on_policy_rkl",
     "cannot use attn_implementation='fast'"),
    ("unknown_cpu_linear", {"train.cpu_linear": "mkl"}, "on_policy_rkl", "train.cpu_linear"),
    # issue 19: a non-finite or boolean number, and eval rows that would score 0 without a word
    ("lr_infinite", {"optim.lr": ".inf"}, "gkd", "optim.lr: Input should be a finite number"),
    ("steps_boolean", {"train.steps": "true"}, "gkd", "train.steps: must be a number, not true"),
    ("eval_row_without_answer", lambda t: {"data.eval": _data(t, "eval_noans.jsonl", '{"prompt": "1 2 =", '
                                                              '"answer": "+ 1"}\n{"prompt": "3 4 ="}\n')},
     "on_policy_rkl", "eval_noans.jsonl:2: missing reference `answer` (data.eval rows are scored against it"),
]


@pytest.mark.parametrize("case, overrides, recipe, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_writes_nothing(tiny_setup, tmp_path, capsys, case, overrides, recipe,
                                                     needle):
    extra = overrides(tmp_path) if callable(overrides) else overrides
    out = tmp_path / "run"
    code, err = _cli(capsys, ["train", recipe, *base_overrides(tiny_setup, out, **extra)])
    _check(code, err, needle)
    assert not (out / "config.yaml").exists()  # a failed start leaves no half-made run


def test_catalogue_has_at_least_fifteen_cases():
    assert len(CASES) + 3 >= 15  # plus the three run-time cases below


def test_run_directory_holding_another_run_is_left_untouched(tiny_setup, tmp_path, capsys):
    out = tmp_path / "taken"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "train.steps": 2, "train.save_every": 1, "data.eval": "null"})]
    assert main(args) == 0
    before = _digest(out)
    _check(*_cli(capsys, [*args[:2], *base_overrides(tiny_setup, out, **{"loss.divergence": "forward_kl"})]),
           "already holds a run")
    _check(*_cli(capsys, [*args, "loss.divergence=forward_kl", "--resume"]), "different config")
    assert _digest(out) == before


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_setup, tmp_path, capsys, monkeypatch):
    out = tmp_path / "full"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "train.steps": 4, "train.save_every": 1, "data.eval": "null"})]
    real_save = ckpt.save_model
    calls = {"n": 0}

    def flaky_save(model, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(model, filename, *a, **k)

    monkeypatch.setattr(ckpt, "save_model", flaky_save)
    _check(*_cli(capsys, args), "disk full")
    committed = ckpt.list_checkpoints(out)
    assert [p.name for p in committed] == ["step-00000001"]
    ckpt.verify_checksums(committed[0])
    monkeypatch.setattr(ckpt, "save_model", real_save)
    assert main([*args, "--resume"]) == 0  # space freed: the run continues from step 1
    assert (out / "final" / "model.safetensors").exists()


def test_nonfinite_logits_are_skipped_counted_and_stop_the_run(tiny_setup, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_setup / "teacher")
    with torch.no_grad():
        teacher.lm_head.weight[3].fill_(float("inf"))
    bad_teacher = tmp_path / "inf_teacher"
    teacher.save_pretrained(bad_teacher)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_setup / "teacher" / name, bad_teacher / name)
    out = tmp_path / "run"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "train.steps": 5, "train.max_nonfinite_steps": 3, "data.eval": "null"}), f"teacher.model={bad_teacher}"]
    _check(*_cli(capsys, args), "NaN/inf for 3 steps in a row")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_nonfinite_total"] for r in rows] == [1, 2]
    assert (out / "config.yaml").exists() and not (out / "final").exists()


def test_kdrl_without_reference_answers_is_refused(tiny_setup, tmp_path, capsys):
    data = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "1 2 ="}])
    code, err = _cli(capsys, ["train", "kdrl", *base_overrides(tiny_setup, tmp_path / "r", **{
        "data.train": str(data)})])
    _check(code, err, "answer")


def test_safe_by_default():
    """Weights only through safetensors or weights_only torch.load; no remote code unless asked."""
    import ast

    from opd.config import ModelConfig, TeacherConfig

    assert ModelConfig(student="s").trust_remote_code is False
    assert TeacherConfig().trust_remote_code is False
    assert TeacherConfig().api_key_env == "OPD_TEACHER_API_KEY"  # a variable name, never the key
    source = Path(__file__).resolve().parents[1] / "src" / "opd"
    for path in source.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                kwargs = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kwargs and kwargs["weights_only"].value is True, f"{path}:{node.lineno}"
            assert not (isinstance(node, ast.Name) and node.id == "pickle"), f"{path} uses pickle"


def test_an_emptied_or_partial_checksum_manifest_fails_verification(tiny_setup, tmp_path, capsys):
    """Issue 19.7: `checksums.json` replaced by `{}` turned verification off and tampered weights loaded.
    The manifest must now list every file the checkpoint holds."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "tampered"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "train.steps": 2, "train.save_every": 1, "data.eval": "null"})]
    assert main(args) == 0
    reference = load_file(str(out / "final" / "model.safetensors"))
    newest, previous = ckpt.list_checkpoints(out)[-1], ckpt.list_checkpoints(out)[0]
    (newest / "model.safetensors").write_bytes(b"tampered")
    (newest / "checksums.json").write_text("{}")
    with pytest.raises(ckpt.RunDirError, match="does not list state.json"):
        ckpt.verify_checksums(newest)
    # a manifest that leaves out the tampered file (and only it) fails too
    sums = json.loads((previous / "checksums.json").read_text())
    del sums["optimizer.pt"]
    (previous / "checksums.json").write_text(json.dumps(sums))
    (previous / "optimizer.pt").write_bytes(b"tampered")
    with pytest.raises(ckpt.RunDirError, match="optimizer.pt is not in checksums.json"):
        ckpt.verify_checksums(previous)
    # resume refuses both instead of loading them: one line, nothing loaded, final/ unchanged
    with pytest.warns(UserWarning, match="trying the previous checkpoint"):
        _check(*_cli(capsys, [*args, "--resume"]), "failed its checksum")
    after = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(reference[k], after[k]) for k in reference)


def test_a_sharded_checkpoints_manifest_must_cover_every_shard(tmp_path):
    """The same for a DCP checkpoint (train.distributed=fsdp): shards live in student/, hashed recursively."""
    import torch
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step-00000001"
    with pytest.warns(UserWarning):  # DCP without a process group saves as one process, with a warning
        dcp.save({"w": torch.arange(6.0)}, checkpoint_id=str(folder / "student"))
    (folder / "state.json").write_text('{"step": 1}')
    ckpt.write_checksums(folder)
    ckpt.verify_checksums(folder)
    full = json.loads((folder / "checksums.json").read_text())
    shard = next(name for name in full if name.startswith("student/") and name.endswith(".distcp"))
    for manifest, needle in (({k: v for k, v in full.items() if k != shard}, f"{shard} is not in"),
                             ({}, "does not list state.json"), ([], "is not a mapping"),
                             ({**full, "../outside": full["state.json"]}, "../outside is missing")):
        (folder / "checksums.json").write_text(json.dumps(manifest))
        with pytest.raises(ckpt.RunDirError, match=needle):
            ckpt.verify_checksums(folder)


@pytest.mark.parametrize("steps, needle", [(3, "ended on 2 skipped step(s)"), (1, "gives NaN/inf logits")])
def test_a_run_that_blows_up_at_the_end_writes_no_final_model(tiny_setup, tmp_path, capsys, steps, needle):
    """Issue 19.2: at optim.lr=1e30 the first step leaves weights near 1e29 (finite, NaN logits) and the
    later ones are skipped as NaN; the run exited 0 with that as final/. Now: one line, exit 2, no final/,
    the last checkpoint kept (a skipped step writes none)."""
    out = tmp_path / "run"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "train.steps": steps, "optim.lr": "1e30", "train.save_every": 1, "train.keep_checkpoints": 1,
        "data.eval": "null"})]
    code, err = _cli(capsys, args)
    _check(code, err, needle)
    assert "final/ not written" in err and "step-00000001) is kept" in err
    assert not (out / "final").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001"]
    ckpt.verify_checksums(out / "checkpoints" / "step-00000001")


@pytest.fixture
def small_disk(tmp_path):
    """A real 800 KB filesystem (tmpfs), so writers fail as they do on a full disk; skipped where mounting
    is not permitted (it needs root and a kernel that allows it, as in a privileged container)."""
    import subprocess

    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=800k", "tmpfs", str(folder)],
                             capture_output=True, text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        reason = mounted.stderr.strip() if mounted is not None else "no mount command"
        pytest.skip(f"cannot mount a small tmpfs here (needs root and mount permission): {reason}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_disk_gives_the_disk_full_line_and_resumes(tiny_setup, tmp_path, small_disk, capsys):
    """Issue 19.3: on a real 800 KB filesystem torch.save failed with `RuntimeError: ... unexpected pos` and
    safetensors with `SafetensorError: ... os error 28`, not the documented line. Now: the line, the
    half-written checkpoint removed, the committed ones intact, and after freeing space --resume ends on
    the weights of a run that never hit the wall."""
    import subprocess

    import torch
    from safetensors.torch import load_file

    extra = {"train.steps": 5, "train.save_every": 1, "data.eval": "null"}
    out = small_disk / "run"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **extra)]
    code, err = _cli(capsys, args)
    _check(code, err, "disk full writing")
    assert "rerun with --resume" in err
    committed = ckpt.list_checkpoints(out)
    assert committed and not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    for folder in committed:
        ckpt.verify_checksums(folder)
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    assert main([*args, "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(["train", "on_policy_rkl", *base_overrides(tiny_setup, straight, **extra)]) == 0
    expected = load_file(str(straight / "final" / "model.safetensors"))
    got = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _fill(folder: Path) -> None:
    """Write into ``folder`` until its filesystem refuses another byte."""
    with (folder / "ballast").open("wb", buffering=0) as handle:
        try:
            while handle.write(b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _writers():
    import torch
    import torch.distributed.checkpoint as dcp
    import yaml
    from safetensors.torch import save_file, save_model

    big = torch.randn(64, 256)
    return {
        "torch.save": lambda d: torch.save({"w": big}, d / "optimizer.pt"),
        "safetensors.save_file": lambda d: save_file({"w": big}, str(d / "rng.safetensors")),
        "safetensors.save_model": lambda d: save_model(torch.nn.Linear(256, 64), str(d / "model.safetensors")),
        "json": lambda d: (d / "state.json").write_text(json.dumps({"x": list(range(20000))})),
        "yaml": lambda d: (d / "config.yaml").write_text(yaml.safe_dump({"x": list(range(20000))})),
        "dcp": lambda d: dcp.save({"w": big}, checkpoint_id=str(d / "student")),
    }


@pytest.mark.parametrize("writer", list(_writers()))
def test_every_checkpoint_writer_maps_a_full_disk_to_one_error(small_disk, writer):
    """Each library fails differently on ENOSPC; the guard around checkpoint writes names them all."""
    import warnings

    from opd.errors import DiskFullError, disk_writes

    _fill(small_disk)
    target = small_disk / "step-00000001"
    target.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group
        with pytest.raises(DiskFullError, match="disk full writing .*step-00000001; free space and rerun"):
            with disk_writes(target, cleanup=target):
                _writers()[writer](target)
    assert not target.exists()  # the half-written folder is gone, its space free again


def test_other_write_errors_are_not_taken_for_a_full_disk(tmp_path):
    from opd.errors import disk_writes

    with pytest.raises(RuntimeError, match="unrelated"):
        with disk_writes(tmp_path / "x"):
            raise RuntimeError("unrelated")


_STRICT_ROLES = ("{% for message in messages %}\n{% if message['role'] not in ['user', 'assistant', 'system'] %}\n"
                 "{{ raise_exception('Unknown role: ' + message['role']) }}\n{% endif %}"
                 "{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}")
_ANY_ROLE = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"


@pytest.mark.parametrize("strict", ["student", "teacher"])
def test_a_chat_template_that_raises_names_the_row_and_the_template(tiny_setup, tmp_path, capsys, strict):
    """Issue 19.6: `Unknown role: wizard` came with no file or line. Now the data row (file:line) and the
    template's file and line are named, whether the student's template raises at load or the teacher's
    own template while scoring."""
    from transformers import AutoTokenizer

    dirs = {}
    for name in ("student", "teacher"):
        dirs[name] = tmp_path / name
        shutil.copytree(tiny_setup / name, dirs[name])
        tokenizer = AutoTokenizer.from_pretrained(dirs[name])
        tokenizer.chat_template = _STRICT_ROLES if name == strict else _ANY_ROLE
        tokenizer.save_pretrained(dirs[name])
    data = write_rows(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "1 2 ="}, {"role": "assistant", "content": "+ 1"}]},
        {"messages": [{"role": "wizard", "content": "3 4 ="}, {"role": "assistant", "content": "+ 3"}]},
    ])
    out = tmp_path / "run"
    args = ["train", "on_policy_rkl", *base_overrides(tiny_setup, out, **{
        "model.student": dirs["student"], "teacher.model": dirs["teacher"], "data.train": data,
        "data.eval": "null", "train.batch_size": 2, "train.steps": 1})]
    code, err = _cli(capsys, args)
    whose = "chat template" if strict == "student" else "teacher's chat template"
    _check(code, err, f"chat.jsonl:2: the {whose} {dirs[strict] / 'chat_template.jinja'} (line 3) failed on this "
                      "row: Unknown role: wizard")
