"""Train a byte-level BPE tokenizer with the MOSS special tokens, for tiny models trained from scratch.

Byte-level BPE decodes back to exactly the input (Chinese included), and the MOSS end tokens are registered
as special so they stay single ids wherever they appear in text, as in the MOSS-003 tokenizer. Every digit
is a token of its own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf import formats
from rlhf.data import DataFileError, load_parsed, parse_preference, parse_steps
from rlhf.records import has_steps
from rlhf.moss import CHAT_TEMPLATE, EOM, PAD, SPECIAL_TOKENS, Dialogue, render


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Train on `texts`, save to out_dir with save_pretrained, and return the HF tokenizer."""
    specials = SPECIAL_TOKENS + [PAD]
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(specials)
    if vocab_size <= minimum:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the 256 bytes and {len(specials)} special "
                         f"tokens alone need {minimum}; use at least {minimum + 100}")
    backend = Tokenizer(models.BPE())
    # Digits are split one by one first (as Llama and Qwen do): a number is then the same tokens wherever it
    # stands (` 14` in a question, `("14` in a command, `是14` in Chinese), so a model copies it token for token.
    # No prefix space: decode(encode(x)) must give back x exactly.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        # Every byte is in the vocabulary, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOM,
        pad_token=PAD,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t != EOM],
        # Cleaning up spaces would break the exact round trip.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _texts_of_record(obj: object) -> list[str]:
    """Rendered MOSS text of one record of any kind (steps joined as the reply); raises FieldError on bad input."""
    if isinstance(obj, dict) and ("responses" in obj or "chosen" in obj):
        preference = parse_preference(obj)
        dialogues = [preference.prompt.with_reply(r) for r in preference.responses]
    elif has_steps(obj):
        dialogues = [parse_steps(obj).dialogue()]  # the steps as the reply
    else:
        dialogues = [Dialogue.from_json(obj)]  # an SFT dialogue or a prompt
    return [text for dialogue in dialogues for text in _rendered(dialogue)]


def _rendered(dialogue: Dialogue) -> list[str]:
    """A dialogue's text; a plugin dialogue's also as the plugin model sees it (`None` segments, its prompt ending)."""
    return [render(dialogue)] + ([render(dialogue, plugin=True)] if any(t.has_tools for t in dialogue.turns) else [])


def texts_from_files(paths: list[str], data_format: str = "auto") -> Iterator[str]:
    """Rendered MOSS text of every record in data files of any kind (SFT, prompts, preferences, steps): this project's
    JSONL record by record (a file may mix kinds), a file in another named format (`rlhf.formats`) as a whole."""
    for path in paths:
        if data_format in ("auto", "moss"):
            for texts in load_parsed(path, _texts_of_record):  # the whole file parses before any text is used
                yield from texts
        else:
            for record in formats.load(path, None, data_format):
                yield from (text for d in formats.texts_of(record) for text in _rendered(d))


def run_tokenizer(data: list[str], vocab_size: int, out: str, data_format: str = "auto") -> int:
    """`rlhf tokenizer`: train on the data files and print a one-line summary."""
    try:
        tokenizer = train_tokenizer(texts_from_files(data, data_format), vocab_size, out)
    except DataFileError as error:  # every bad line, as `rlhf validate` prints them
        for line in error.errors:
            print(line, file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"rlhf tokenizer: {error}", file=sys.stderr)
        return 2
    print(f"tokenizer: byte-level BPE, vocab {len(tokenizer)} (asked {vocab_size}), "
          f"trained on {len(data)} file(s) -> {out}")
    return 0
