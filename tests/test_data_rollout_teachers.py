"""Data loading, behaviour policies, masking and teacher compatibility on real tokenizers/models."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_llama, write_rows
from opd.config import DataConfig, RolloutConfig
from opd.data import load_examples
from opd.errors import DataError, ModelError
from opd.models import completion_logits, shared_vocab_size
from opd.objectives import sequence_nll, token_divergence
from opd.rollout import BehaviourPolicy, SamplingParams, build_batch, hf_generate, truncate_at_eos
from opd.teachers import LocalTeacher, check_same_tokenizer


def test_jsonl_prompts_answers_and_overlong(tmp_path, tokenizer):
    path = write_rows(tmp_path / "d.jsonl", [
        {"prompt": "1 2 3 =", "answer": "+ 1 3 6"},
        {"prompt": " ".join(["1"] * 30) + " =", "answer": "+ 1"},
        {"prompt": "4 5 =", "extra_col": 7},
    ])
    cfg = DataConfig(train=str(path), max_prompt_tokens=10)
    examples, report = load_examples(str(path), cfg, tokenizer)
    assert report.rows == 3 and report.kept == 2 and report.skipped_overlong == 1
    first = examples[0]
    assert first.prompt_ids[0] == tokenizer.bos_token_id
    assert first.answer_ids == tokenizer("+ 1 3 6", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert examples[1].answer_ids is None and examples[1].extra == {"extra_col": 7}
    truncated, report = load_examples(str(path), DataConfig(train=str(path), max_prompt_tokens=10,
                                                            overlong="truncate"), tokenizer)
    assert report.truncated == 1 and len(truncated[1].prompt_ids) == 10


@pytest.mark.parametrize("content, needle", [
    (b'{"prompt": "1 ="}\nnot json\n', "d.jsonl:2: malformed JSON"),
    (b'{"prompt": "1 ="}\n\n{"answer": "x"}\n', "d.jsonl:3: missing field `prompt`"),
    (b'{"prompt": "   "}\n', "d.jsonl:1: `prompt` is empty"),
    (b'{"prompt": "1 \xff\xfe ="}\n', "d.jsonl:1: line is not valid UTF-8"),
    (b"", "dataset is empty"),
    (b'[1, 2]\n', "must be a JSON object"),
])
def test_malformed_data_errors(tmp_path, tokenizer, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=needle.replace("`", ".").replace("(", r"\(")):
        load_examples(str(path), DataConfig(train=str(path)), tokenizer)


def test_parquet_and_chat_messages(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = PreTrainedTokenizerFast.from_pretrained(_save(tokenizer, tmp_path / "tok"))
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}={% endif %}"
    )
    pq.write_table(pa.Table.from_pylist([
        {"messages": [{"role": "user", "content": "1 2"}], "answer": "+ 1 3"},
        {"messages": [{"role": "user", "content": "4"}, {"role": "assistant", "content": "+ 4"}], "answer": None},
    ]), tmp_path / "d.parquet")
    examples, _ = load_examples(str(tmp_path / "d.parquet"), DataConfig(train="x"), tok)
    assert examples[0].prompt == "1 2 ="
    assert tok.convert_ids_to_tokens(examples[0].prompt_ids) == ["1", "2", "="]
    # a trailing assistant turn is the reference answer, not part of the prompt
    assert examples[1].prompt == "4 =" and examples[1].answer == "+ 4"


def test_json_lines_saved_as_json(tmp_path, tokenizer):
    path = tmp_path / "d.json"
    path.write_text('{"prompt": "1 =", "answer": "+ 1"}\n{"prompt": "2 ="}\n')
    examples, _ = load_examples(str(path), DataConfig(train="x"), tokenizer)
    assert [e.prompt for e in examples] == ["1 =", "2 ="]


def _save(tokenizer, path):
    tokenizer.save_pretrained(path)
    return str(path)


def test_build_batch_masks_prompt_padding_and_after_eos(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    raw = [5, 6, eos, 7, 8]
    assert truncate_at_eos(raw, {eos}) == [5, 6, eos]
    batch = build_batch([[1, 4], [1, 4, 5, 6]], [[5, 6, eos], [7]], pad, [True, False])
    assert batch.prompt_len == 4
    assert batch.input_ids_BT.tolist() == [[pad, pad, 1, 4, 5, 6, eos], [1, 4, 5, 6, 7, pad, pad]]
    assert batch.completion_mask_BC.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.attention_mask_BT.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    assert batch.num_tokens == 4


def test_generation_stops_at_eos_and_respects_vocab(tokenizer):
    model = tiny_llama(len(tokenizer) + 5, seed=3)
    with torch.no_grad():  # make EOS and the padding rows very likely, so both rules are exercised
        model.lm_head.bias = None
        model.lm_head.weight[len(tokenizer):] = 0
        model.model.norm.weight.fill_(1.0)
    prompts = [tokenizer("1 2 3 =").input_ids, tokenizer("4 =").input_ids]
    torch.manual_seed(0)
    outs = hf_generate(model, prompts, SamplingParams(max_new_tokens=12, vocab_size=len(tokenizer)), tokenizer)
    for seq in outs:
        assert all(t < len(tokenizer) for t in seq)
        assert tokenizer.eos_token_id not in seq[:-1]
    greedy = hf_generate(model, prompts, SamplingParams(max_new_tokens=5, greedy=True), tokenizer)
    again = hf_generate(model, prompts, SamplingParams(max_new_tokens=5, greedy=True), tokenizer)
    assert greedy == again


def test_greedy_generation_matches_scoring_forward(tokenizer):
    """The logits the loss uses are the ones that chose the tokens (left padding, position ids)."""
    model = tiny_llama(len(tokenizer), seed=4)
    prompts = [tokenizer("1 2 3 4 5 =").input_ids, tokenizer("7 =").input_ids]
    outs = hf_generate(model, prompts, SamplingParams(max_new_tokens=6, greedy=True), tokenizer)
    batch = build_batch(prompts, outs, tokenizer.pad_token_id)
    logits = completion_logits(model, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    chosen = logits.argmax(-1)
    mask = batch.completion_mask_BC.bool()
    assert torch.equal(chosen[mask], batch.completion_ids_BC[mask])


def test_per_sample_mixture(tokenizer, tiny_setup):
    from opd.data import Example

    model = tiny_llama(len(tokenizer), seed=5)
    answer = tokenizer("+ 1 2", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    examples = [Example("1 2 =", tokenizer("1 2 =").input_ids, "+ 1 2", answer) for _ in range(400)]
    policy = BehaviourPolicy(RolloutConfig(on_policy_fraction=0.3, max_new_tokens=4), 1.0, tokenizer)
    torch.manual_seed(0)
    batch, metrics = policy.rollout(model, examples)
    realised = metrics["rollout/on_policy_fraction"]
    assert 0.22 < realised < 0.38
    assert realised == pytest.approx(batch.on_policy_B.float().mean().item())
    off = ~batch.on_policy_B
    assert (batch.completion_ids_BC[off, : len(answer)] == torch.tensor(answer)).all()


def test_padding_rows_are_sliced_and_different_tokenizers_refused(tokenizer, tiny_setup, tmp_path):
    teacher = LocalTeacher.from_config(
        __import__("opd.config", fromlist=["TeacherConfig"]).TeacherConfig(model=str(tiny_setup / "teacher")),
        tokenizer)
    student = tiny_llama(len(tokenizer))
    assert teacher.model.config.vocab_size == len(tokenizer) + 7
    vocab = shared_vocab_size(tokenizer, student, teacher.model)
    assert vocab == len(tokenizer)
    batch = build_batch([tokenizer("1 2 =").input_ids], [[5, 6, tokenizer.eos_token_id]], tokenizer.pad_token_id)
    teacher_logits = teacher.score(batch).logits_BCV
    student_logits = completion_logits(student, batch.input_ids_BT, batch.attention_mask_BT, 3)
    assert teacher_logits.shape == (1, 3, vocab + 7) and student_logits.shape == (1, 3, vocab)
    # padded teacher logits are compared on the shared vocabulary only
    from opd.divergences import per_token

    sliced = per_token("reverse_kl", student_logits, teacher_logits[..., :vocab].contiguous())
    torch.testing.assert_close(per_token("reverse_kl", student_logits, teacher_logits, vocab_size=vocab), sliced)

    other = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "a": 2, "b": 3, "<unk>": 4}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other_tok = PreTrainedTokenizerFast(tokenizer_object=other, eos_token="</s>", pad_token="<pad>")
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_same_tokenizer(tokenizer, other_tok)


def test_normalising_by_step_tokens(tokenizer):
    torch.manual_seed(6)
    student = torch.randn(2, 5, 17, requires_grad=True)
    teacher = torch.randn(2, 5, 17)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    whole, _ = token_divergence(student, teacher, mask, kind="forward_kl", num_tokens=8)
    part0, _ = token_divergence(student[:1], teacher[:1], mask[:1], kind="forward_kl", num_tokens=8)
    part1, _ = token_divergence(student[1:], teacher[1:], mask[1:], kind="forward_kl", num_tokens=8)
    torch.testing.assert_close(whole, part0 + part1)
    empty, _ = token_divergence(student, teacher, torch.zeros(2, 5), kind="reverse_kl", num_tokens=0)
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(student.grad).all()


def test_sequence_nll_matches_cross_entropy():
    torch.manual_seed(7)
    logits = torch.randn(2, 4, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    loss, _ = sequence_nll(logits, targets, mask, num_tokens=6, chunk_size=2)
    expected = torch.nn.functional.cross_entropy(logits[mask.bool()], targets[mask.bool()], reduction="sum") / 6
    torch.testing.assert_close(loss, expected)
    empty, _ = sequence_nll(logits, targets, torch.zeros(2, 4), num_tokens=0)
    assert empty.item() == 0.0


def test_metrics_are_json(tmp_path):
    from opd.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=True)
    log.log(1, {"loss/total": 0.5, "eval/curve": [1.0, 0.5], "x": float("nan")})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["loss/total"] == 0.5 and row["eval/curve"] == [1.0, 0.5] and row["x"] == "nan"
    assert any((tmp_path / "tensorboard").iterdir())


def test_saved_datasets_directory(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list([{"prompt": "1 2 =", "answer": "+ 1 3"}, {"prompt": "3 ="}]).save_to_disk(
        str(tmp_path / "ds"))
    examples, report = load_examples(str(tmp_path / "ds"), DataConfig(train="x"), tokenizer)
    assert report.kept == 2 and examples[0].answer == "+ 1 3" and examples[1].answer is None


def test_first_error_survival_curve():
    from opd.eval import first_error_vs_reference, survival_curve

    assert first_error_vs_reference("p", "+ 1 2 9", "+ 1 2 3") == 3
    assert first_error_vs_reference("p", "+ 1 2 3", "+ 1 2 3") == 4
    assert survival_curve([0, 2, 4], 4) == [2 / 3, 2 / 3, 1 / 3, 1 / 3]


def test_checkpoint_generation_config_does_not_change_the_behaviour_policy(tokenizer):
    """Penalties / top_k saved with a checkpoint must not leak into rollouts."""
    from transformers import GenerationConfig

    model = tiny_llama(len(tokenizer), seed=9)
    prompts = [tokenizer("1 2 3 =").input_ids, tokenizer("5 5 =").input_ids]
    params = SamplingParams(max_new_tokens=8, greedy=True)
    clean = hf_generate(model, prompts, params, tokenizer)
    model.generation_config = GenerationConfig(repetition_penalty=50.0, no_repeat_ngram_size=1, top_k=1)
    assert hf_generate(model, prompts, params, tokenizer) == clean
    assert model.generation_config.repetition_penalty == 50.0  # restored afterwards


def test_extra_stop_tokens_from_the_model_are_honoured(tokenizer):
    from transformers import GenerationConfig

    from opd.rollout import stop_token_ids

    model = tiny_llama(len(tokenizer), seed=10)
    prompt = [tokenizer("1 2 =").input_ids]
    params = SamplingParams(max_new_tokens=6, greedy=True)
    first = hf_generate(model, prompt, params, tokenizer)[0][0]
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, first])
    assert stop_token_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, first})
    assert hf_generate(model, prompt, params, tokenizer) == [[first]]


def test_pad_equal_to_eos_is_masked_correctly():
    """With pad == eos the first EOS is a real token (kept in the loss), the padding after it is not."""
    eos = pad = 2
    batch = build_batch([[1, 7]], [[5, 6, eos]], pad)
    batch2 = build_batch([[1, 7], [1, 7, 8]], [[5, 6, eos], [9]], pad)
    assert batch.completion_mask_BC.tolist() == [[1, 1, 1]]
    assert batch2.completion_mask_BC.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch2.input_ids_BT[1].tolist()[-3:] == [9, pad, pad]
    assert truncate_at_eos([5, eos, eos, eos], {eos}) == [5, eos]
