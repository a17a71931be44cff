"""Word-level tokenizer for the demo task (one token per space-separated symbol)."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
SYMBOLS: tuple[str, ...] = tuple(str(d) for d in range(10)) + ("+", "-", "=")
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + SYMBOLS)}
"""``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, digits 0-9 = 4..13, ``+``=14, ``-``=15, ``=``=16."""


def build_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """Build the demo tokenizer.

    * whitespace pre-tokenisation, then a word-level lookup in :data:`VOCAB`;
    * ``<s>`` is prepended when ``add_special_tokens=True`` (the default);
      ``</s>`` is *not* appended (completions append it explicitly);
    * decoding joins tokens with single spaces, so
      ``decode(ids, skip_special_tokens=True)`` gives e.g. ``"+ 3 4 8"``.

    ``model_max_length`` only sets the length ``transformers`` warns about (the sorting task's
    sequences are 99 tokens long, the running-sum task's 28).
    """
    core = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, VOCAB[BOS])],
    )
    # No decoder: the `tokenizers` default joins tokens with single spaces.
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=model_max_length,
    )
