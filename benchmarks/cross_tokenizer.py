"""How much a cross-tokenizer step spends on alignment, next to the model work it sits beside.

Trains two different tokenizers on a generated multilingual corpus (byte-level BPE for the
student, SentencePiece-style BPE with byte fallback for the teacher), then for a batch of
B sequences of T student tokens measures, side by side in one process:

- ``align``: decode the student's ids, re-tokenise for the teacher, byte-span alignment
  (:func:`opd.cross_tokenizer.teacher_view`),
- ``loss``: merged rows + GOLD hybrid loss, forward and backward,
- ``student fwd+bwd``: a small Llama (hidden 256, 4 layers) forward and backward on the batch,
  a lower bound of what a real training step costs.

    python benchmarks/cross_tokenizer.py [--batch 8] [--tokens 512] [--threads 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

WORDS = ("the quick brown fox jumps over lazy dogs café crème brûlée naïve façade résumé 日本語 中文 "
         "emoji 🙂 🚀 numbers 12345 67890 symbols #@! — «quotes» data model token align distill").split()


def _corpus(lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(lines)]


def _tokenizers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _corpus(4000)
    student = Tokenizer(models.BPE())
    student.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    student.decoder = decoders.ByteLevel()
    student.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    teacher = Tokenizer(models.BPE(byte_fallback=True))
    teacher.pre_tokenizer = pre_tokenizers.Metaspace()
    teacher.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    teacher.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=3000, special_tokens=["<pad>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]))

    def wrap(core):
        return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", bos_token="<s>")

    return wrap(student), wrap(teacher)


def _median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd.cross_tokenizer import cross_tokenizer_loss, matched_vocab, teacher_view
    from opd.models import completion_logits
    from opd.rollout import build_batch

    s_tok, t_tok = _tokenizers()
    texts = _corpus(args.batch * 40, seed=1)
    completions = []
    for i in range(args.batch):
        ids = s_tok(" ".join(texts[i * 40 : (i + 1) * 40]), add_special_tokens=False).input_ids[: args.tokens - 1]
        completions.append(ids + [s_tok.eos_token_id])
    prompts = [s_tok("translate this").input_ids for _ in range(args.batch)]
    batch = build_batch(prompts, completions, s_tok.pad_token_id)

    def config(vocab: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)

    student, teacher = LlamaForCausalLM(config(len(s_tok))), LlamaForCausalLM(config(len(t_tok))).eval()
    matched = matched_vocab(s_tok, t_tok)

    view = teacher_view(s_tok, t_tok, prompts, completions)
    align_s = _median(lambda: teacher_view(s_tok, t_tok, prompts, completions), args.reps)
    with torch.no_grad():
        t_logits = completion_logits(teacher, view.input_ids_BT, view.attention_mask_BT, view.completion_len)
    t_ids = view.input_ids_BT[:, -view.completion_len:]

    def student_step() -> torch.Tensor:
        return completion_logits(student, batch.input_ids_BT, batch.attention_mask_BT, batch.completion_len)

    def model_only() -> None:
        student_step().float().logsumexp(-1).mean().backward()

    def loss_only() -> None:
        logits = student_step().detach().requires_grad_(True)
        loss, _ = cross_tokenizer_loss(logits, batch.completion_ids_BC, t_logits, t_ids, view.alignments,
                                       student_vocab=len(s_tok), teacher_vocab=len(t_tok),
                                       num_groups=batch.num_tokens, matched=matched)
        loss.backward()

    model_s = _median(model_only, args.reps)
    loss_s = _median(loss_only, args.reps) - _median(lambda: student_step(), args.reps)
    groups = sum(a.groups for a in view.alignments)
    tokens = batch.num_tokens
    teacher_tokens = int(view.attention_mask_BT[:, -view.completion_len:].sum())
    print(f"B={args.batch} student tokens={tokens} teacher tokens={teacher_tokens}"
          f" groups={groups} (vocab {len(s_tok)} / {len(t_tok)}, {matched[0].numel()} shared), {args.threads} threads")
    print(f"{'phase':<22}{'seconds':>10}{'per 1k tokens':>16}")
    for name, seconds in (("align (teacher_view)", align_s), ("loss fwd+bwd", loss_s),
                          ("student fwd+bwd", model_s)):
        print(f"{name:<22}{seconds:>10.3f}{1000 * seconds / tokens:>16.4f}")
    print(f"alignment / student fwd+bwd = {align_s / model_s:.2f}")


if __name__ == "__main__":
    main()
