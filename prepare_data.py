"""
Text in, tokens out: corpora, the tokenizer, token shards and the batch loader the training script imports.

(Work in progress: the tokenizer core is here; sources, shards and the loader follow.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from modern_llm import UserError

# -----------------------------------------------------------------------------
# Tokenizer

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML role markers for the chat template
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]
# ChatML: every message is "<|im_start|>role\ncontent<|im_end|>\n"; the prompt for a reply ends in
# "<|im_start|>assistant\n". The {% generation %} markers let transformers return the assistant-token mask
# (return_assistant_tokens_mask=True) that chat fine-tuning puts the loss on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE (GPT-2 style): every byte is in the base alphabet, so there is no unknown
    token and any Unicode text round-trips exactly. Returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise UserError(f"vocab_size {vocab_size} is too small: the 256 byte tokens and {len(SPECIAL_TOKENS)} "
                        f"special tokens alone need {smallest}", "Tokenizer and vocabulary")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    """A transformers fast tokenizer around a `tokenizers` one, with our special tokens and chat template,
    so save_pretrained writes tokenizer.json + tokenizer_config.json that AutoTokenizer loads as they are."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def load_tokenizer(name_or_path: str | Path):
    """A pretrained tokenizer by directory or hub name, through transformers.AutoTokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer {name_or_path!r}: {first}", "Tokenizer and vocabulary") from None
