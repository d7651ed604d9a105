"""
Text in, tokens out: corpora, the tokenizer, token shards and the batch loader the training script imports.

    python prepare_data.py                                   # the built-in corpus (no network), BPE of 8192
    python prepare_data.py --dataset=book.txt --vocab_size=4096
    python prepare_data.py --dataset=corpus/ --text_field=content --tokenizer=path/to/tokenizer
    python prepare_data.py --dataset=roneneldan/TinyStories --max_tokens=50000000
    python prepare_data.py --dataset=chats.jsonl --tokenizer=path/to/model   # conversations, for fine-tuning
    python prepare_data.py --benchmark                       # tokenization MB/s, 1 and 2 processes vs a loop

Every source becomes a `datasets.Dataset` with one "text" column (one row per document), is tokenized with
`Dataset.map(batched=True, num_proc=N)` (EOS after every document), split into train/val by document, and
written as flat uint16 (uint32 for vocabularies over 65,536) token files:

    OUT_DIR/<source>-<tokenizer>-<key>/  train.bin  val.bin  meta.json  tokenizer.json  tokenizer_config.json

The folder name holds a hash of the source and the tokenizer settings, so running again reuses the shards.
meta.json records the token and UTF-8 byte counts per split, from which training reports bits per byte.
A .jsonl of conversations ({"messages": [{"role", "content"}, ...]} a line) is chat data instead: see
"Chat data" below.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cli import UserError, check_output_path, parse_flags, run_main, settings_block, temp_dir
from corpora import load_corpus, local_files, looks_like_path, source_identity, source_slug

DATASET = "builtin"  # builtin, a file or folder (.txt .md .jsonl .json .parquet .csv, also .gz/.zst) or a hub dataset
CONFIG_NAME = ""  # hub dataset config, e.g. sample-10BT for HuggingFaceFW/fineweb-edu; empty = its default
TEXT_FIELD = "text"  # the column holding the text in .jsonl/.json/.parquet/.csv files and hub datasets
TOKENIZER = ""  # empty: train a byte-level BPE on the corpus; else a tokenizer folder or hub name
VOCAB_SIZE = 8192  # vocabulary of the trained BPE (a pretrained tokenizer keeps its own)
OUT_DIR = "data"  # each prepared corpus gets a folder here, named by source and tokenizer settings
MAX_TOKENS = 0  # token budget: whole documents until it is reached (hub datasets stream only that much); 0 = all
VAL_FRACTION = 0.01  # share of the documents held out for validation
SEED = 1337  # seeds the train/val split
NUM_PROC = 0  # tokenization processes; 0 = one per CPU core (one for corpora under 16 MB)
TOKENIZER_TRAIN_MB = 200  # at most this much text trains the BPE (a sample is enough)
BENCHMARK = False  # measure tokenization MB/s on the built-in corpus (1 and 2 processes vs a Python loop), then exit

_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags; the token strings below are not

FORMAT_VERSION = 1  # part of every cache key: bump it when the shard format or a source's reading changes
MIN_MB_PER_PROC = 16  # starting a tokenization process costs ~1 s, so small corpora stay in one process
TRAIN_FILE, VAL_FILE, META_FILE = "train.bin", "val.bin", "meta.json"
DATA_ROOT_FLAGS = "the data root: --data_root of training, --out_dir here"  # named when it cannot be written

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

    check_vocab_size(vocab_size)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def check_vocab_size(vocab_size: int) -> None:
    """Before any data is read: the byte alphabet and the special tokens must fit."""
    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise UserError(f"vocab_size {vocab_size} is too small: the 256 byte tokens and {len(SPECIAL_TOKENS)} "
                        f"special tokens alone need {smallest}", "Tokenizer and vocabulary")


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

    if looks_like_path(str(name_or_path)) and not Path(name_or_path).exists():  # else it would ask the hub
        raise UserError(f"cannot load tokenizer {str(name_or_path)!r}: no such folder", "Tokenizer and vocabulary")
    if Path(name_or_path).is_dir() and not (Path(name_or_path) / "tokenizer.json").exists():
        from checkpoint import list_checkpoints  # a run's OUT_DIR before its final save: its newest checkpoint's

        name_or_path = next(reversed(list_checkpoints(name_or_path)), name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except Exception as e:  # a damaged tokenizer.json raises anything: KeyError, or the Rust library's Exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load tokenizer {name_or_path!r}: {first}", "Tokenizer and vocabulary") from None


# -----------------------------------------------------------------------------
# Tokenizing a source


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokenize_batch(batch: dict, tokenizer, eos_id: int) -> dict:
    """Token ids of each document with EOS appended, and its length in tokens, characters and UTF-8 bytes."""
    texts = batch["text"]
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return {"ids": [x + [eos_id] for x in ids], "n_tokens": [len(x) + 1 for x in ids],
            "n_chars": [len(t) for t in texts], "n_bytes": [len(t.encode("utf-8")) for t in texts]}


def eos_id_of(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to put between documents",
                        "Tokenizer and vocabulary")
    return tokenizer.eos_token_id


def tokenize_documents(ds, tokenizer, num_proc: int | None = None, max_tokens: int | None = None):
    """Dataset.map over the documents with batched fast tokenization in num_proc processes (a progress bar
    shows), then the first documents that together reach max_tokens."""
    if not num_proc:
        num_proc = max(1, min(os.cpu_count() or 1, int(ds.data.nbytes / 1e6 // MIN_MB_PER_PROC)))
    num_proc = min(num_proc, len(ds))
    if num_proc > 1:  # one thread per process; else forked tokenizers warn and turn their threads off anyway
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = ds.map(tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=["text"], desc="tokenizing",
                 fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id_of(tokenizer)})
    if max_tokens:
        counts = np.cumsum(column(out, "n_tokens"))
        out = out.select(range(min(len(out), int(np.searchsorted(counts, max_tokens)) + 1)))
    return out


def column(ds, name: str) -> np.ndarray:
    """A numeric column as a numpy array, straight from Arrow."""
    return np.asarray(ds.with_format("numpy")[name])  # indexing the lazy Column would not mask, so materialize


def token_batches(tokens, batch_size: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(all token ids, tokens per document) for consecutive blocks of documents, without Python lists."""
    for table in tokens.with_format("arrow").iter(batch_size=batch_size):
        yield table.column("ids").combine_chunks().flatten().to_numpy(), table.column("n_tokens").to_numpy()


def as_tokenizer(tokenizer):
    return load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer


def tokenize_source(dataset: str, tokenizer, text_field: str = "text", config_name: str | None = None,
                    max_tokens: int | None = None, num_proc: int | None = None) -> tuple[np.ndarray, int]:
    """All tokens of a source (EOS after each document) and the UTF-8 bytes of its text, read and tokenized
    exactly as prepare() does, so evaluation on any text measures the same thing as training's validation."""
    tokenizer = as_tokenizer(tokenizer)
    tokens = tokenize_documents(load_corpus(dataset, text_field, config_name, max_tokens), tokenizer,
                                num_proc, max_tokens)
    dtype = token_dtype(len(tokenizer))
    ids = [values.astype(dtype) for values, _ in token_batches(tokens)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype), int(column(tokens, "n_bytes").sum())


# -----------------------------------------------------------------------------
# Token shards


def text_sample(ds, max_chars: int) -> Iterator[list[str]]:
    """Batches of documents from the start of the corpus, up to max_chars of text, to train the BPE on."""
    total = 0
    for batch in ds.iter(batch_size=1000):
        yield batch["text"]
        total += sum(len(t) for t in batch["text"])
        if total >= max_chars:
            return


def pick_validation(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean per document, True for the held-out ones: a fixed-size random subset, the same every run."""
    is_val = np.zeros(n_docs, dtype=bool)
    if val_fraction > 0:
        if n_docs < 2:
            raise UserError("the corpus has a single document, so none can be held out for validation: separate "
                            "documents with blank lines (or use --val_fraction=0)", "Data")
        n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
        is_val[np.random.default_rng(seed).choice(n_docs, n_val, replace=False)] = True
    return is_val


def write_shards(tokens, is_val: np.ndarray, out: Path, dtype: np.dtype) -> None:
    """train.bin and val.bin: each split's tokens, documents in corpus order, as one flat array."""
    start = 0
    with open(out / TRAIN_FILE, "wb") as train, open(out / VAL_FILE, "wb") as val:
        for values, lengths in token_batches(tokens):
            token_is_val = np.repeat(is_val[start:start + len(lengths)], lengths)
            start += len(lengths)
            values = values.astype(dtype)
            values[~token_is_val].tofile(train)
            values[token_is_val].tofile(val)


def split_counts(tokens, is_val: np.ndarray) -> dict:
    counts = {}
    for split, chosen in (("train", ~is_val), ("val", is_val)):
        counts[f"{split}_documents"] = int(chosen.sum())
        for what in ("tokens", "chars", "bytes"):
            counts[f"{split}_{what}"] = int(column(tokens, f"n_{what}")[chosen].sum())
    return counts


def cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def tokenizer_identity(tokenizer) -> str:
    """A pretrained tokenizer is known by its contents, not its name: the same files anywhere give the same key."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}{tokenizer.eos_token}".encode()).hexdigest()[:16]


def prepare(dataset: str = "builtin", data_root: str | Path = "data", vocab_size: int = 8192, tokenizer=None,
            text_field: str = "text", config_name: str | None = None, max_tokens: int | None = None,
            val_fraction: float = 0.01, seed: int = 1337, num_proc: int | None = None,
            tokenizer_train_mb: float = TOKENIZER_TRAIN_MB) -> Path:
    """The data folder for a source and tokenizer settings: reused when it exists, else built and written
    atomically (a temporary folder renamed into place), so an interrupted run leaves nothing half-written.
    `tokenizer` None trains a byte-level BPE of vocab_size on the corpus; a path, hub name or tokenizer object
    uses that one (with its own vocabulary)."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}", "Data")
    dataset, tokenizer = str(dataset), as_tokenizer(tokenizer)
    tok_settings, tok_name, tok_about = tokenizer_settings(tokenizer, vocab_size, tokenizer_train_mb)
    settings = {"format": FORMAT_VERSION, "source": source_identity(dataset, text_field, config_name),
                "tokenizer": tok_settings, "max_tokens": max_tokens or None, "val_fraction": val_fraction,
                "seed": seed}
    key = cache_key(settings)
    data_dir = Path(data_root) / f"{source_slug(dataset)}-{tok_name}-{key}"
    if (data_dir / META_FILE).is_file():
        return data_dir
    check_output_path(data_root, DATA_ROOT_FLAGS)

    docs = load_corpus(dataset, text_field, config_name, max_tokens)
    if tokenizer is None:  # minutes on a large corpus, with no progress bar of its own
        print(f"training a byte-level BPE of {vocab_size} tokens on up to {tokenizer_train_mb:g} MB of {dataset}",
              file=sys.stderr)
        tokenizer = train_tokenizer(text_sample(docs, int(tokenizer_train_mb * 1e6)), vocab_size)
    tokens = tokenize_documents(docs, tokenizer, num_proc, max_tokens)
    is_val = pick_validation(len(tokens), val_fraction, seed)
    dtype = token_dtype(len(tokenizer))
    meta = {"format": FORMAT_VERSION, "cache_key": key, "source": dataset, "config_name": config_name,
            "text_field": text_field, "tokenizer": tok_about,
            "vocab_size": len(tokenizer), "dtype": dtype.name, "documents": len(tokens),
            **split_counts(tokens, is_val), "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id, "max_tokens": max_tokens or None, "val_fraction": val_fraction,
            "seed": seed}
    publish(data_dir, lambda tmp: write_shards(tokens, is_val, tmp, dtype), tokenizer, meta)
    return data_dir


def tokenizer_settings(tokenizer, vocab_size: int, train_mb: float) -> tuple[dict, str, str]:
    """(what the cache key knows of the tokenizer, a short name for the folder, a description for meta.json)."""
    if tokenizer is None:
        check_vocab_size(vocab_size)
        return ({"bpe": vocab_size, "train_mb": train_mb}, f"bpe{vocab_size}",
                f"byte-level BPE trained here (vocab_size {vocab_size})")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(tokenizer.name_or_path or "tok").name)[:30]
    return {"pretrained": tokenizer_identity(tokenizer)}, name, tokenizer.name_or_path or "a tokenizer object"


def publish(data_dir: Path, write, tokenizer, meta: dict) -> None:
    """Write a data folder atomically: write(tmp) adds the token files to a temporary folder, then the
    tokenizer and meta.json go beside them and the folder is renamed into place."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(f".{data_dir.name}.tmp-", data_dir.parent)  # not owner-only: a data root may be shared
    try:
        write(tmp)
        tokenizer.save_pretrained(str(tmp))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for f in tmp.iterdir():  # on disk before the rename makes the folder count as complete
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, data_dir)
    except OSError:
        if not (data_dir / META_FILE).is_file():  # else another process finished the same folder first: use it
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared data folder, plus where its tokenizer files are."""
    data_dir = Path(data_dir)
    try:
        meta = json.loads((data_dir / META_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"{data_dir} is not a prepared data folder (no {META_FILE}): run "
                        f"python prepare_data.py --dataset=...", "Data") from None
    except ValueError as e:
        raise UserError(f"{data_dir / META_FILE} is damaged ({e}): delete the folder and prepare again",
                        "Data") from None
    return {**meta, "data_dir": str(data_dir), "tokenizer_dir": str(data_dir)}


# -----------------------------------------------------------------------------
# The batch loader


class BatchLoader:
    """Random windows of seq_len+1 tokens from a split's memmap, as (x, y) int64 tensors shifted by one.

    Batch number `step` is a pure function of (seed, split, step, micro_step, rank): a resumed run draws exactly
    the batches it would have drawn, with no loader state to save. Under torchrun the draw is of the global batch
    (batch_size x world_size windows) and rank r takes rows r, r+world_size, ...: ranks get different rows, and
    2 processes x 4 rows train on the very sequences 1 process x 8 rows does.
    """

    SPLITS = {"train": 0, "val": 1}

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, seed: int = 1337,
                 rank: int = 0, world_size: int = 1):
        check_loader_args(split, batch_size, seq_len, rank, world_size)
        meta = load_meta(data_dir)
        n_tokens = meta[f"{split}_tokens"]
        if n_tokens < seq_len + 1:
            raise UserError(f"the {split} split of {data_dir} has {n_tokens:,} tokens, fewer than "
                            f"seq_len+1 = {seq_len + 1}: use a shorter --seq_len or more text", "Data")
        self.data = read_array(Path(data_dir) / f"{split}.bin", meta["dtype"], n_tokens)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.offsets = np.arange(seq_len + 1)

    def get_batch(self, step: int, micro_step: int = 0, device="cpu"):
        import torch

        starts = rows_of_rank(self.seed, self.split, step, micro_step, len(self.data) - self.seq_len,
                              self.batch_size, self.rank, self.world_size)
        windows = torch.from_numpy(self.data[starts[:, None] + self.offsets].astype(np.int64))
        return to_device(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), device)


def rows_of_rank(seed: int, split: str, step: int, micro_step: int, high: int, batch_size: int, rank: int,
                 world_size: int) -> np.ndarray:
    """This rank's batch_size random indices below `high`: the global batch (batch_size x world_size) is drawn
    from (seed, split, step, micro_step) and rank r takes rows r, r + world_size, ... (see BatchLoader)."""
    rng = np.random.default_rng([seed, BatchLoader.SPLITS[split], step, micro_step])
    return rng.integers(0, high, size=batch_size * world_size)[rank::world_size]


def check_loader_args(split: str, batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if split not in BatchLoader.SPLITS:
        raise UserError(f"split must be 'train' or 'val', got {split!r}", "Data")
    if batch_size < 1 or seq_len < 1:
        raise UserError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}", "Data")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}", "Data")


def read_array(path: Path, dtype: str, count: int) -> np.ndarray:
    """A token file as a read-only memmap, refused when missing or not the size meta.json records."""
    dtype = np.dtype(dtype)
    if not path.is_file() or path.stat().st_size != count * dtype.itemsize:
        raise UserError(f"{path} is missing or not the {count:,} values meta.json records: delete "
                        f"{path.parent} and prepare again", "Data")
    return np.memmap(path, dtype=dtype, mode="r")


def to_device(x, y, device):
    import torch

    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap the previous step
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# Chat data: conversations for fine-tuning (SFT), the loss on the assistant's tokens only
#
# A .jsonl file (or a folder of them) with one conversation a line, the common format:
#   {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
# Each is rendered with the tokenizer's chat template. The folder holds per split the token ids of all
# conversations one after another ({split}.bin), a byte per token that is 1 on the assistant's tokens
# ({split}_mask.bin), and where each conversation starts ({split}_starts.bin, int64, one more than there are).

CHAT_ROLES = ("system", "user", "assistant", "tool")
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' assistant-mask markers


def chat_files(dataset: str) -> list[Path]:
    """The .jsonl files of a chat dataset, or [] when `dataset` is not one (the first record has no "messages")."""
    path = Path(dataset).expanduser()
    if dataset == "builtin" or not path.exists():
        return []
    files = [f for f in local_files(path) if f.name.lower().endswith(".jsonl")]
    if not files:
        return []
    with open(files[0], encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except ValueError:
        return []
    return files if isinstance(record, dict) and "messages" in record else []


def read_conversations(path: Path) -> Iterator[tuple[int, list[dict]]]:
    """(line number, messages) of each conversation, every one checked: a mistake names its line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{where}: not valid JSON ({e})", "Chat data") from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise UserError(f"{where}: no \"messages\" list of {{\"role\", \"content\"}} objects", "Chat data")
            for i, m in enumerate(messages, 1):
                if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
                    role = m.get("role") if isinstance(m, dict) else None
                    raise UserError(f"{where}: message {i} has role {role!r}; use one of {', '.join(CHAT_ROLES)}",
                                    "Chat data")
                if not isinstance(m.get("content"), str):
                    raise UserError(f"{where}: message {i} ({m['role']}) has no text \"content\"", "Chat data")
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{where}: no assistant message, so nothing to learn from", "Chat data")
            yield n, [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and a 0/1 mask of the assistant's tokens.

    A template with {% generation %} markers (ours has them) marks the assistant's text itself and
    transformers returns the mask. Without markers (most pretrained templates) the spans are found by
    rendering: the conversation up to an assistant turn with the generation prompt is a prefix of the
    conversation including that turn, and the characters in between (trailing whitespace dropped) are the
    assistant's reply with its end-of-turn token; tokens overlapping those characters are the mask."""
    if GENERATION_MARKER.search(str(tokenizer.chat_template)):  # str: a few tokenizers hold a dict of templates
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return list(out["input_ids"]), list(out["assistant_masks"])
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(tokenizer, messages[:i], add_generation_prompt=True), render(tokenizer, messages[:i + 1])
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise UserError(f"tokenizer {tokenizer.name_or_path!r}: its chat template renders earlier turns "
                            "differently once later turns follow, so the assistant's tokens cannot be found; "
                            "use a template with {% generation %} markers", "Chat data")
        spans.append((len(prompt), len(upto.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < b and e > a for a, b in spans)) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


def render_tokens(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[int]]:
    """chat_tokens, with a template's own refusal (e.g. "roles must alternate") as a UserError naming the line."""
    from jinja2 import TemplateError

    try:
        return chat_tokens(tokenizer, messages)
    except TemplateError as e:
        raise UserError(f"{where}: the chat template refuses this conversation: {e}", "Chat data") from None


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_tokenizer(tokenizer, conversations: list, vocab_size: int, train_mb: float):
    """The given tokenizer, which must have a chat template, or a BPE trained on the messages' text."""
    if tokenizer is None:
        from datasets import Dataset

        texts = Dataset.from_dict({"text": [m["content"] for _, msgs in conversations for m in msgs]})
        return train_tokenizer(text_sample(texts, int(train_mb * 1e6)), vocab_size)
    if not tokenizer.chat_template:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no chat template to render conversations "
                        "with: use a chat model's tokenizer (--tokenizer=...)", "Chat data")
    return tokenizer


def prepare_chat(dataset: str, data_root: str | Path = "data", vocab_size: int = 8192, tokenizer=None,
                 val_fraction: float = 0.01, seed: int = 1337, tokenizer_train_mb: float = TOKENIZER_TRAIN_MB) -> Path:
    """prepare() for chat data: the data folder of a conversations .jsonl, reused when it exists. The cache key
    includes the tokenizer and its chat template; meta.json lists the held-out conversations' line numbers."""
    files = chat_files(str(dataset))
    if not files:
        raise UserError(f"{dataset} is not chat data: a .jsonl file (or folder of them) with a \"messages\" list "
                        "on every line", "Chat data")
    tokenizer = as_tokenizer(tokenizer)
    tok_settings, tok_name, tok_about = tokenizer_settings(tokenizer, vocab_size, tokenizer_train_mb)
    if tokenizer is not None:
        tok_settings["chat_template"] = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()[:16]
    settings = {"format": FORMAT_VERSION, "task": "sft", "source": source_identity(str(dataset), "messages", None),
                "tokenizer": tok_settings, "val_fraction": val_fraction, "seed": seed}
    key = cache_key(settings)
    data_dir = Path(data_root) / f"{source_slug(str(dataset))}-chat-{tok_name}-{key}"
    if (data_dir / META_FILE).is_file():
        return data_dir
    check_output_path(data_root, DATA_ROOT_FLAGS)

    conversations = [(f"{f}, line {n}", msgs) for f in files for n, msgs in read_conversations(f)]
    tokenizer = chat_tokenizer(tokenizer, conversations, vocab_size, tokenizer_train_mb)
    convs = [(where, render_tokens(tokenizer, msgs, where), msgs) for where, msgs in conversations]
    is_val = pick_validation(len(convs), val_fraction, seed)
    dtype = token_dtype(len(tokenizer))
    meta = {"format": FORMAT_VERSION, "task": "sft", "cache_key": key, "source": str(dataset), "tokenizer": tok_about,
            "vocab_size": len(tokenizer), "dtype": dtype.name, "documents": len(convs),
            "val_conversations": [where for (where, _, _), v in zip(convs, is_val) if v],
            "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id,
            "val_fraction": val_fraction, "seed": seed}
    for split, chosen in (("train", ~is_val), ("val", is_val)):
        picked = [c for c, keep in zip(convs, chosen) if keep]
        text = [m["content"] for _, _, msgs in picked for m in msgs]
        replies = [m["content"] for _, _, msgs in picked for m in msgs if m["role"] == "assistant"]
        meta.update({f"{split}_documents": len(picked), f"{split}_tokens": sum(len(ids) for _, (ids, _), _ in picked),
                     f"{split}_chars": sum(map(len, text)), f"{split}_bytes": sum(len(t.encode()) for t in text),
                     # what the loss is on, for bits per byte: the assistant's tokens and the bytes of its text
                     f"{split}_target_tokens": sum(sum(mask) for _, (_, mask), _ in picked),
                     f"{split}_target_bytes": sum(len(t.encode()) for t in replies)})

    def write(tmp: Path) -> None:
        for split, chosen in (("train", ~is_val), ("val", is_val)):
            picked = [tokens for (_, tokens, _), keep in zip(convs, chosen) if keep]
            np.array([i for ids, _ in picked for i in ids], dtype=dtype).tofile(tmp / f"{split}.bin")
            np.array([k for _, mask in picked for k in mask], dtype=np.uint8).tofile(tmp / f"{split}_mask.bin")
            starts = np.cumsum([0] + [len(ids) for ids, _ in picked], dtype=np.int64)
            starts.tofile(tmp / f"{split}_starts.bin")

    publish(data_dir, write, tokenizer, meta)
    return data_dir


class ChatBatchLoader:
    """BatchLoader for chat data: each row one conversation (cut to seq_len + 1 tokens, padded after its end),
    targets -100 except on the assistant's tokens, so the loss counts only those. Rows are drawn as
    BatchLoader draws windows (rows_of_rank)."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, seed: int = 1337,
                 rank: int = 0, world_size: int = 1):
        check_loader_args(split, batch_size, seq_len, rank, world_size)
        meta = load_meta(data_dir)
        data_dir, n = Path(data_dir), meta[f"{split}_tokens"]
        self.data = read_array(data_dir / f"{split}.bin", meta["dtype"], n)
        self.mask = read_array(data_dir / f"{split}_mask.bin", "uint8", n)
        self.starts = np.asarray(read_array(data_dir / f"{split}_starts.bin", "int64",
                                            meta[f"{split}_documents"] + 1))
        # only conversations with an assistant token among their first seq_len + 1 (else the loss is 0/0)
        ends = np.minimum(self.starts[1:], self.starts[:-1] + seq_len + 1)
        seen = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        self.usable = np.flatnonzero(seen[ends] - seen[self.starts[:-1] + 1] > 0)
        if len(self.usable) == 0:
            raise UserError(f"no {split} conversation of {data_dir} has an assistant token within its first "
                            f"{seq_len + 1} tokens: raise --seq_len", "Chat data")
        self.pad_id = meta["pad_id"] if meta["pad_id"] is not None else meta["eos_id"] or 0
        self.split, self.batch_size, self.seq_len, self.seed, self.rank = split, batch_size, seq_len, seed, rank
        self.world_size = world_size

    def get_batch(self, step: int, micro_step: int = 0, device="cpu"):
        import torch

        picks = rows_of_rank(self.seed, self.split, step, micro_step, len(self.usable), self.batch_size, self.rank,
                             self.world_size)
        x = np.full((self.batch_size, self.seq_len), self.pad_id, dtype=np.int64)
        y = np.full((self.batch_size, self.seq_len), -100, dtype=np.int64)
        for row, c in enumerate(self.usable[picks]):
            a = self.starts[c]
            b = min(self.starts[c + 1], a + self.seq_len + 1)
            ids = self.data[a:b].astype(np.int64)
            x[row, :b - a - 1] = ids[:-1]
            y[row, :b - a - 1] = np.where(self.mask[a + 1:b] == 1, ids[1:], -100)
        return to_device(torch.from_numpy(x), torch.from_numpy(y), device)


def batch_loader(data_dir: str | Path, split: str, batch_size: int, seq_len: int, seed: int = 1337,
                 rank: int = 0, world_size: int = 1):
    """The loader a prepared folder needs: ChatBatchLoader for chat data, else BatchLoader."""
    chat = load_meta(data_dir).get("task") == "sft"
    return (ChatBatchLoader if chat else BatchLoader)(data_dir, split, batch_size, seq_len, seed, rank, world_size)



# -----------------------------------------------------------------------------
# Command line


def summary(meta: dict, seconds: float, reused: bool) -> str:
    rows = [("documents", "documents"), ("characters", "chars"), ("UTF-8 bytes", "bytes"), ("tokens", "tokens")]
    lines = [f"{'reused' if reused else 'wrote'} {meta['data_dir']}", f"  {'':<12} {'train':>14} {'val':>12}"]
    lines += [f"  {label:<12} {meta[f'train_{key}']:>14,} {meta[f'val_{key}']:>12,}" for label, key in rows]
    total_bytes, total_tokens = meta["train_bytes"] + meta["val_bytes"], meta["train_tokens"] + meta["val_tokens"]
    lines.append(f"  bytes/token  {total_bytes / max(total_tokens, 1):.2f}   vocabulary {meta['vocab_size']:,} "
                 f"({meta['dtype']}), tokenizer {meta['tokenizer']}")
    lines.append(f"  time         {seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    cfg, _ = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    if cfg["benchmark"]:
        from benchmarks.tokenization import benchmark
        return benchmark(cfg["vocab_size"], cfg["tokenizer"] or None)
    for name in ("max_tokens", "num_proc"):
        if cfg[name] < 0:
            raise UserError(f"--{name} must be >= 0 (0 = {'all' if name == 'max_tokens' else 'one per core'}), "
                            f"got {cfg[name]}", "Data")
    if not cfg["tokenizer_train_mb"] > 0:
        raise UserError(f"--tokenizer_train_mb must be > 0, got {cfg['tokenizer_train_mb']}", "Data")
    t0 = time.time()
    if chat_files(cfg["dataset"]):  # conversations: the chat folder that fine-tuning (SFT) reads
        data_dir = prepare_chat(cfg["dataset"], cfg["out_dir"], cfg["vocab_size"], cfg["tokenizer"] or None,
                                cfg["val_fraction"], cfg["seed"], cfg["tokenizer_train_mb"])
    else:
        data_dir = prepare(cfg["dataset"], cfg["out_dir"], cfg["vocab_size"], cfg["tokenizer"] or None,
                           cfg["text_field"], cfg["config_name"] or None, cfg["max_tokens"] or None,
                           cfg["val_fraction"], cfg["seed"], cfg["num_proc"] or None, cfg["tokenizer_train_mb"])
    reused = (data_dir / META_FILE).stat().st_mtime < t0
    print(summary(load_meta(data_dir), time.time() - t0, reused))
    return 0


if __name__ == "__main__":
    run_main(main)
