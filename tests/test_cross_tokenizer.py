"""Cross-tokenizer distillation with two genuinely different tokenizers trained here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import base_overrides, tiny_llama
from opd.cross_tokenizer import (
    _merged_log_rows,
    align,
    char_to_byte_offsets,
    cross_tokenizer_loss,
    matched_vocab,
    teacher_view,
    token_byte_ends,
    uld_loss_rows,
)

CORPUS = [
    "the café serves crème brûlée and 日本語 text 🙂 every day",
    "naïve façade résumé coöperate — «quotes» and ünïcödé",
    "numbers 12345 and symbols #@! over and over again the quick brown fox",
    "1 2 3 = + 1 3 6 - 4 5 6 7 8 9 0",
] * 20
TEXTS = ["the café serves 日本語 🙂 résumé", "plain ascii words here", "ü🙂日 x", "1 2 3 = + 1 3 6"]


def _wrap(core):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", bos_token="<s>")


@pytest.fixture(scope="module")
def byte_bpe():
    """GPT-2 style byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(core)


@pytest.fixture(scope="module")
def sentencepiece_bpe():
    """Llama-2 / SentencePiece style: metaspace pre-tokenizer, BPE with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE(byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    specials = ["<pad>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=specials))
    return _wrap(core)


def _token_bytes_by_offsets(tok, text):
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    to_bytes = char_to_byte_offsets(text)
    return encoded.input_ids, [int(to_bytes[end]) for _, end in encoded.offset_mapping]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_ends_of_sampled_ids_match_the_text(byte_bpe, sentencepiece_bpe, text):
    for tok in (byte_bpe, sentencepiece_bpe):
        ids = tok(text, add_special_tokens=False).input_ids
        ends = token_byte_ends(tok, ids)
        decoded = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert ends[-1] == len(decoded.encode("utf-8"))
        real = [e for e in ends if e is not None]
        assert real == sorted(real) and len(set(real)) == len(real)
        # every boundary is a character boundary, and each completed prefix decodes to the text's prefix
        body = decoded.encode("utf-8")
        for k, end in enumerate(ends):
            if end is not None:
                prefix = tok.decode(ids[: k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                assert body[:end].decode("utf-8") == prefix
    if any(ord(c) > 127 for c in text):  # multi-byte characters split across byte-level tokens
        ends = token_byte_ends(byte_bpe, byte_bpe(text, add_special_tokens=False).input_ids)
        assert None in ends


@pytest.mark.parametrize("text", TEXTS)
def test_groups_cover_the_same_bytes_on_both_sides(byte_bpe, sentencepiece_bpe, text):
    s_ids = byte_bpe(text, add_special_tokens=False).input_ids
    s_ends = token_byte_ends(byte_bpe, s_ids)
    decoded = byte_bpe.decode(s_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    t_ids, t_ends = _token_bytes_by_offsets(sentencepiece_bpe, decoded)
    alignment = align(s_ends, t_ends)
    assert alignment.groups >= 2
    # group g ends at the same byte on both sides, and groups are contiguous and ordered
    filled = list(s_ends)
    for i in range(len(filled) - 2, -1, -1):
        filled[i] = filled[i] if filled[i] is not None else filled[i + 1]
    for g in range(alignment.groups):
        s_last = max(i for i in range(len(s_ids)) if alignment.student_group[i] == g)
        t_last = max(j for j in range(len(t_ids)) if alignment.teacher_group[j] == g)
        assert filled[s_last] == t_ends[t_last]
    assert np.all(np.diff(alignment.student_group[alignment.student_group >= 0]) >= 0)
    assert (alignment.student_group >= 0).all() and (alignment.teacher_group >= 0).all()


def test_eos_is_paired_and_prompts_are_re_tokenised(byte_bpe, sentencepiece_bpe):
    s_ids = byte_bpe("the café", add_special_tokens=False).input_ids + [byte_bpe.eos_token_id]
    prompt = byte_bpe("naïve =").input_ids
    view = teacher_view(byte_bpe, sentencepiece_bpe, [prompt], [s_ids])
    alignment = view.alignments[0]
    teacher_completion = view.input_ids_BT[0, -view.completion_len:].tolist()
    assert teacher_completion[-1] == sentencepiece_bpe.eos_token_id
    assert alignment.student_group[-1] == alignment.teacher_group[-1] == alignment.groups - 1
    teacher_prompt = view.input_ids_BT[0, view.attention_mask_BT[0].bool()].tolist()[: -len(teacher_completion)]
    assert sentencepiece_bpe.decode(teacher_prompt, skip_special_tokens=True).strip() == "naïve ="


def test_matched_vocabulary_maps_identical_strings(byte_bpe, sentencepiece_bpe):
    s_ids, t_ids = matched_vocab(byte_bpe, sentencepiece_bpe)
    assert s_ids.numel() > 3  # at least the specials and some characters
    s_vocab = {v: k for k, v in byte_bpe.get_vocab().items()}
    t_vocab = {v: k for k, v in sentencepiece_bpe.get_vocab().items()}
    assert all(s_vocab[int(a)] == t_vocab[int(b)] for a, b in zip(s_ids, t_ids))


def test_uld_is_sorted_l1_and_merged_rows_follow_the_chain_rule():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.7, 0.1]])
    # sorted: p = .5 .3 .2 0 ; q = .7 .1 .1 .1 -> |.2| + |.2| + |.1| + |.1| = 0.6
    assert torch.allclose(uld_loss_rows(p, q), torch.tensor([0.6]))
    assert torch.allclose(uld_loss_rows(q, p), torch.tensor([0.6]))
    from opd.cross_tokenizer import Alignment

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 5, generator=gen)
    ids = torch.tensor([[1, 4, 2]])
    # tokens 0 and 1 form group 0, token 2 is group 1
    alignment = Alignment(np.array([0, 0, 1]), np.array([0, 1]), 2)
    rows = _merged_log_rows(logits, ids, [alignment], "student", 5, 1.0).exp()
    probs = torch.softmax(logits[0], -1)
    assert torch.allclose(rows[0], probs[0] * probs[1, 4])
    assert torch.allclose(rows[1], probs[2])


def test_identical_teacher_gives_zero_loss_and_gradients_are_finite(byte_bpe):
    model = tiny_llama(len(byte_bpe), seed=7, pad_id=byte_bpe.pad_token_id)
    from opd.models import completion_logits
    from opd.rollout import build_batch

    prompts = [byte_bpe("the").input_ids, byte_bpe("naïve").input_ids]
    completions = [byte_bpe(" café 🙂", add_special_tokens=False).input_ids + [byte_bpe.eos_token_id],
                   byte_bpe(" over", add_special_tokens=False).input_ids + [byte_bpe.eos_token_id]]
    batch = build_batch(prompts, completions, byte_bpe.pad_token_id)
    view = teacher_view(byte_bpe, byte_bpe, prompts, completions)
    student_logits = completion_logits(model, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)
    with torch.no_grad():
        teacher_logits = completion_logits(model, view.input_ids_BT, view.attention_mask_BT, view.completion_len)
    teacher_ids = view.input_ids_BT[:, -view.completion_len:]
    for hybrid in (None, matched_vocab(byte_bpe, byte_bpe)):
        loss, metrics = cross_tokenizer_loss(
            student_logits, batch.completion_ids_BC, teacher_logits, teacher_ids, view.alignments,
            student_vocab=len(byte_bpe), teacher_vocab=len(byte_bpe), num_groups=10, matched=hybrid)
        assert abs(loss.item()) < 1e-5, metrics
    other = tiny_llama(len(byte_bpe), seed=8, pad_id=byte_bpe.pad_token_id)
    with torch.no_grad():
        other_logits = completion_logits(other, view.input_ids_BT, view.attention_mask_BT, view.completion_len)
    loss, _ = cross_tokenizer_loss(student_logits, batch.completion_ids_BC, other_logits, teacher_ids,
                                   view.alignments, student_vocab=len(byte_bpe), teacher_vocab=len(byte_bpe),
                                   num_groups=10, matched=matched_vocab(byte_bpe, byte_bpe))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert loss.item() > 0 and grads and all(torch.isfinite(g).all() for g in grads)


def test_cross_tokenizer_recipe_trains_end_to_end(tiny_setup, tmp_path, byte_bpe):
    from opd.cli import main

    teacher_dir = tmp_path / "bpe_teacher"
    tiny_llama(len(byte_bpe), hidden=48, seed=9, pad_id=byte_bpe.pad_token_id).save_pretrained(teacher_dir)
    byte_bpe.save_pretrained(teacher_dir)
    out = tmp_path / "run"
    assert main(["train", "cross_tokenizer", *base_overrides(tiny_setup, out, **{
        "teacher.model": str(teacher_dir), "data.eval": "null"})]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss/total" in r]
    assert len(train_rows) == 3 and all(r["loss/total"] > 0 for r in train_rows)
    assert all(r["loss/groups"] > 0 for r in train_rows)
    assert (out / "final" / "model.safetensors").exists()
