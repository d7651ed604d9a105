"""
Talk to a checkpoint: an interactive prompt, one-shot generation for scripts, and the engine behind both
(serve.py uses the same engine).

    python text_generator.py                                   # newest checkpoint under out/, interactive
    python text_generator.py --checkpoint=out/checkpoint-2000 --quantize=int8
    python text_generator.py --prompt="Once upon a time" --prompt="The king" --temperature=0
    python text_generator.py --benchmark                       # decode tokens/s vs transformers' generate

The engine runs the prompt once (prefill), then one token per step over the preallocated KV cache of
modern_llm.py; with --compile the decode step is compiled once for its fixed shapes. Prompts of different
lengths share a batch: rows are left-padded, an attention mask hides the padding and each row gets its own
RoPE positions, so every row generates exactly what it would alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from checkpoint import CheckpointError, is_int8, load_model, quantize_int8, resolve_checkpoint
from cli import UserError, parse_flags, pick_device, pick_dtype, run_main, settings_block

CHECKPOINT = "out"  # a checkpoint directory, or a training run's OUT_DIR (its newest checkpoint)
PROMPT: list = []  # one-shot mode: continue this text and exit (repeatable)
PROMPTS_FILE = ""  # one-shot mode: continue each non-empty line of this file and exit
CHAT = False  # start the interactive prompt in chat mode (the tokenizer's chat template)
MAX_NEW_TOKENS = 256  # tokens to generate per answer at most
TEMPERATURE = 0.8  # 0 = greedy
TOP_K = 50  # sample among the k most likely tokens only (0 = off)
TOP_P = 0.95  # nucleus: sample from the smallest set of tokens whose probability reaches p (1 = off)
MIN_P = 0.0  # drop tokens less likely than min_p x the most likely one (0 = off)
REPETITION_PENALTY = 1.0  # > 1 discourages tokens already in the prompt or the answer (1 = off)
STOP: list = []  # stop when the answer contains this text (repeatable); EOS and <|im_end|> always stop
SEED = -1  # seed for reproducible sampling (-1 = a different sample each time)
BATCH_SIZE = 16  # one-shot mode: prompts generated together in one batch
QUANTIZE = ""  # "int8": weight-only int8, one scale per output channel (faster decoding, ~quarter of the bytes)
COMPILE = False  # torch.compile the decode step (slow first answer, faster after)
DEVICE = "auto"  # auto, cpu, cuda, cuda:1, mps
DTYPE = "auto"  # auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16
BENCHMARK = False  # measure decode tokens/s against transformers' generate and print a table
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags

END_OF_TURN = "<|im_end|>"  # the chat template's end-of-turn token: a reply stops there as at EOS
# A step where rows join runs their prompt tokens and the running rows' tokens as one forward pass when
# (inputs x cache slots read) stays under this: each input then reads a copy of its row's cache.
PACKED_STEP_SLOTS = 65_536


# -----------------------------------------------------------------------------
# Sampling: parameters per row, and the logits processors


@dataclass
class SamplingParams:
    """How one row is sampled. Processors apply in Hugging Face's order: repetition penalty (and the OpenAI
    presence/frequency penalties), temperature, top-k, top-p, min-p; then a token is drawn (argmax if
    temperature is 0)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL: divides positive logits of seen tokens (prompt + answer)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each token already in the answer
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the answer
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # None: the engine's random stream

    def validate(self) -> None:
        """Raise a one-line UserError for the first bad value."""
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be a whole number >= 0 (0 = off)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = off)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1] (0 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 = off)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be a whole number"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"{name} {rule}, got {getattr(self, name)!r}", "Generation errors")


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Repetition penalty as transformers applies it (seen logits: positive / p, negative * p), then the
    OpenAI penalties on the answer's token counts. Per-row values are (B, 1) tensors."""
    if seen is not None:
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalised, logits)
    if counts is not None:
        logits = logits - frequency * counts - presence * (counts > 0)
    return logits


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p on what top-k kept, with one sort. top_k (B, 1) of k (V = off); top_p (B, 1).

    Top-k keeps the k best tokens (ties broken by the sort). Top-p keeps the smallest set of best tokens
    whose probability reaches p: a token stays if the mass of the tokens ranked above it is still below p.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.size(-1), device=logits.device)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop = (mass_above >= top_p) & (top_p < 1)  # p = 1 is off, whatever the rounding of the cumulative sum
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's (min_p (B, 1))."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


class Sampler:
    """The sampling parameters of a batch's rows as (rows, 1) tensors, so one step samples every row at once.
    Rows join at the end and leave by the last row taking their place, as the rows of a Batch do."""

    def __init__(self, capacity: int, vocab_size: int, device: torch.device, generator: torch.Generator):
        self.capacity, self.vocab_size, self.device, self.generator = capacity, vocab_size, device, generator
        self.params: list[SamplingParams] = []
        self.generators: list[torch.Generator] = []
        self.seen = self.counts = None  # (capacity, V), allocated when a row first needs them
        self.stale = True  # the columns need rebuilding: rows joined or left

    def add(self, params: SamplingParams, prompt: list[int]) -> None:
        i = len(self.params)
        self.params.append(params)
        # A row with a seed draws from its own generator: its text does not depend on the rest of the batch.
        self.generators.append(self.generator if params.seed is None else
                               torch.Generator(self.device).manual_seed(params.seed))
        if params.repetition_penalty != 1 and self.seen is None:
            self.seen = torch.zeros(self.capacity, self.vocab_size, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[i] = False
            self.seen[i, prompt] = True
        if (params.presence_penalty or params.frequency_penalty) and self.counts is None:
            self.counts = torch.zeros(self.capacity, self.vocab_size, device=self.device)
        if self.counts is not None:
            self.counts[i] = 0
        self.stale = True

    def remove(self, i: int) -> None:
        last = len(self.params) - 1
        for table in (self.seen, self.counts):
            if table is not None:
                table[i] = table[last]
        self.params[i], self.generators[i] = self.params[last], self.generators[last]
        self.params.pop()
        self.generators.pop()
        self.stale = True

    def columns(self) -> None:
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=self.device)[:, None]

        params, V = self.params, self.vocab_size
        self.greedy = column([p.temperature == 0 for p in params], torch.bool)
        self.temperature = column([p.temperature or 1.0 for p in params])
        self.top_k = column([p.top_k or V for p in params], torch.long)
        self.top_p = column([p.top_p for p in params])
        self.min_p = column([p.min_p for p in params])
        self.repetition = column([p.repetition_penalty for p in params])
        self.presence = column([p.presence_penalty for p in params])
        self.frequency = column([p.frequency_penalty for p in params])
        self.sort = any(p.top_k or p.top_p < 1 for p in params)
        self.use_min_p = any(p.min_p > 0 for p in params)
        self.all_greedy = all(p.temperature == 0 for p in params)
        self.stale = False

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row (B,), from the last position's logits (B, V)."""
        if self.stale:
            self.columns()
        B = logits.size(0)
        seen = None if self.seen is None else self.seen[:B]
        counts = None if self.counts is None else self.counts[:B]
        logits = apply_penalties(logits.float(), seen, counts, self.repetition, self.presence, self.frequency)
        if self.all_greedy:
            return logits.argmax(dim=-1)
        greedy_choice = logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.sort:
            logits = top_k_top_p(logits, self.top_k, self.top_p)
        if self.use_min_p:
            logits = min_p_filter(logits, self.min_p)
        probs = logits.softmax(dim=-1)
        # Exponential race (argmax of p / E, E ~ Exp(1)) draws from probs like multinomial, and lets each row
        # use its own generator.
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in self.generators])
        return torch.where(self.greedy[:, 0], greedy_choice, (probs / noise).argmax(dim=-1))

    def update(self, tokens: torch.Tensor) -> None:
        rows = torch.arange(tokens.size(0), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1


# -----------------------------------------------------------------------------
# From tokens to text, one piece at a time


class TextStream:
    """Turns a row's tokens into text pieces as they come. A character of several bytes can span several
    tokens, so a piece that ends in an incomplete character is held back until the character completes.
    The last few prompt tokens are decoded along, so tokenizers that mark word starts (SentencePiece's
    leading space) decode the first answer token as they would inside the text."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-5:])
        self.prefix, self.read = 0, len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self.flush(final=False)

    def flush(self, final: bool = True) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") and not final:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]


@dataclass
class TokenEvent:
    token_id: int | None  # None when the row was cancelled
    text_delta: str  # text to append; may be "" (a character still incomplete, or held back by a stop string)
    finish_reason: str | None = None  # None, "stop" (EOS, end of turn, stop string), "length" or "cancelled"


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated tokens, the EOS / end-of-turn token that ended the row included
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class RowState:
    """One row's answer so far: its tokens, its text, how much of the text was handed out, and why it ended."""

    def __init__(self, tokenizer, prompt: list[int], params: SamplingParams, max_new_tokens: int):
        self.stream = TextStream(tokenizer, prompt)
        self.params = params
        self.stop = params.stop
        self.max_new_tokens = max_new_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of self.text already handed out
        self.finished = False

    def event(self, token: int, end_tokens: set[int]) -> TokenEvent:
        self.tokens.append(token)
        if token in end_tokens:
            return self.finish(token, self.text[self.sent:] + self.stream.flush(), "stop")
        self.text += self.stream.push(token)
        # A stop string cannot start in text already sent: that text never ends in a prefix of one.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            return self.finish(token, self.text[self.sent:cut], "stop")
        if len(self.tokens) >= self.max_new_tokens:
            return self.finish(token, self.text[self.sent:] + self.stream.flush(), "length")
        end = len(self.text) - self.held_back()
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return TokenEvent(token, delta)

    def held_back(self) -> int:
        """Length of the longest end of the unsent text that could begin a stop string."""
        unsent = self.text[self.sent:]
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(unsent)), 0, -1)
                    if unsent.endswith(s[:n])), default=0)

    def finish(self, token: int | None, delta: str, reason: str) -> TokenEvent:
        self.finished = True
        self.text = self.text[:self.sent] + delta
        self.sent = len(self.text)
        return TokenEvent(token, delta, reason)


# -----------------------------------------------------------------------------
# The engine


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Messages through the tokenizer's chat template, as token ids. The template's markers become control
    tokens; the messages' own text stays text: "<|im_end|>" typed in a message is encoded as its characters,
    so no message can end its turn early or open a system turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids, at = [], 0
    for m in messages:
        start = text.find(m["content"], at)
        if start < 0:  # the template rewrote the text (trimmed it, say): it cannot be told from the markers
            specials = tokenizer.get_added_vocab()
            if any(s in msg["content"] for msg in messages for s in specials):
                raise UserError("a message contains a special token's text and this chat template rewrites "
                                "messages, so it cannot be kept as text; remove it", "Generation errors")
            return tokenizer.encode(text, add_special_tokens=False)
        ids += tokenizer.encode(text[at:start], add_special_tokens=False)
        ids += tokenizer.encode(m["content"], add_special_tokens=False, split_special_tokens=True)
        at = start + len(m["content"])
    return ids + tokenizer.encode(text[at:], add_special_tokens=False)



def load_checkpoint_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: no usable tokenizer (tokenizer.json) beside the weights: {first}") from None


class Engine:
    """A loaded checkpoint that generates text for rows of prompts, one step at a time.

    One Batch runs at a time (a lock serialises callers): serve.py keeps one open and lets rows join it,
    text_generator's own modes open one per call of stream().
    """

    def __init__(self, checkpoint: str | Path, device: str = "auto", dtype: str = "auto",
                 quantize: str | None = None, compile: bool = False, max_batch_size: int = 16):
        if quantize not in (None, "", "int8"):
            raise UserError(f"unknown quantization {quantize!r}; the choice is int8 (or nothing)", "Generation errors")
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device, cpu_bf16=False)  # fp32 on CPUs: the exact tokens
        self.path = resolve_checkpoint(checkpoint)
        self.model = load_model(self.path, self.device, self.dtype).eval()
        if quantize == "int8" and not is_int8(self.model):
            quantize_int8(self.model)
        self.tokenizer = load_checkpoint_tokenizer(self.path)
        self.max_seq_len = self.model.cfg.max_seq_len
        self.max_batch_size = max_batch_size
        vocab = self.tokenizer.get_vocab()
        self.end_tokens = {t for t in (self.tokenizer.eos_token_id, vocab.get(END_OF_TURN)) if t is not None}
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.generator = torch.Generator(self.device)
        self.generator.seed()  # a fresh random seed; rows with their own seed do not use it
        self._lock = threading.Lock()
        self._decode = self._decode_step
        if compile:
            # Each number of live rows is its own static graph; allow enough of them before falling back.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._decode = torch.compile(self._decode_step, dynamic=False)

    # -- the model steps ---------------------------------------------------------------------------------------
    def span(self, positions: int) -> int:
        """Cache slots attention reads for rows up to `positions` long: rounded up to a quarter of the context,
        so a compiled decode step sees few distinct shapes, and a short row does not read the whole context."""
        quarter = max(1, self.max_seq_len // 4)
        return min(self.max_seq_len, -(-positions // quarter) * quarter)

    def _decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, rows: slice | torch.Tensor,
                     span: int) -> torch.Tensor:
        """One token per input (B, 1), each at its own position pos (B, 1) in its own cache row: rows is a slice
        of the cache's rows, or a tensor (B,) of row numbers that may repeat (a joining prompt's tokens packed
        with the running rows' tokens into one pass, see Batch.logits). Reads the first `span` slots; the logits
        (B, V). With a slice, the shapes are fixed for a number of rows and span: compilable."""
        mask = (torch.arange(span, device=tokens.device) <= pos)[:, None, None]
        return self.model(tokens, pos=pos, slots=pos, mask=mask, view=(rows, span)).float()[:, -1]

    def _prefill(self, prompts: list[list[int]], first_row: int) -> torch.Tensor:
        """Run prompts through the model once, into cache rows first_row.., right-padded: every row starts at
        slot 0 and position 0, as it would alone (the padding's slots are overwritten before any row sees them).
        The logits of each prompt's last token (B, V)."""
        B, P = len(prompts), max(map(len, prompts))
        idx = torch.tensor([x + [self.pad_id] * (P - len(x)) for x in prompts], device=self.device)
        slots = torch.arange(P, device=self.device)
        causal = slots <= slots[:, None]
        logits = self.model(idx, pos=slots, mask=causal, view=(slice(first_row, first_row + B), P))
        last = torch.tensor([len(x) - 1 for x in prompts], device=self.device)
        return logits[torch.arange(B, device=self.device), last].float()

    # -- the public API ----------------------------------------------------------------------------------------
    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise UserError("the prompt is empty: give some text to continue", "Generation errors")
        if len(prompt) >= self.max_seq_len:
            raise UserError(f"the prompt has {len(prompt)} tokens, the model's context is {self.max_seq_len}: "
                            "shorten it to leave room for the answer", "Generation errors")
        vocab = self.model.cfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise UserError(f"prompt token ids must lie in [0, {vocab})", "Generation errors")

    @contextmanager
    def batch(self, capacity: int) -> Iterator[Batch]:
        """An empty Batch of up to `capacity` rows over a KV cache of the whole context per row."""
        with self._lock:
            self.model.setup_cache(capacity, self.max_seq_len)
            try:
                yield Batch(self, capacity)
            finally:
                self.model.clear_cache()

    def stream(self, prompts: list[list[int]], params: list[SamplingParams],
               cancelled: Callable[[int], bool] | None = None) -> Iterator[list[TokenEvent | None]]:
        """Generate for every row together; yield, per decode step, each row's TokenEvent, or None for a row
        that has finished. A row's answer stops at EOS or <|im_end|>, a stop string, its max_new_tokens or
        the end of the context ("length"); cancelled(row) returning True ends it with "cancelled"."""
        if len(prompts) != len(params):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        if not 1 <= len(prompts) <= self.max_batch_size:
            raise UserError(f"{len(prompts)} prompts in one batch; this engine takes 1 to {self.max_batch_size}",
                            "Generation errors")
        with self.batch(len(prompts)) as batch:
            for row, (prompt, p) in enumerate(zip(prompts, params)):
                batch.add(prompt, p, key=row)  # checks the prompt and the parameters
            while batch:
                step: list[TokenEvent | None] = [None] * len(prompts)
                for row, event in batch.step(cancelled or (lambda row: False)):
                    step[row] = event
                yield step

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Whole answers, in batches of at most max_batch_size."""
        out = []
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = prompts[start:start + self.max_batch_size]
            texts, tokens, reasons = [""] * len(chunk), [[] for _ in chunk], [""] * len(chunk)
            for step in self.stream(chunk, params[start:start + self.max_batch_size]):
                for i, ev in enumerate(step):
                    if ev is not None:
                        texts[i] += ev.text_delta
                        tokens[i] += [] if ev.token_id is None else [ev.token_id]
                        reasons[i] = ev.finish_reason or ""
            out += [Completion(t, ids, r, len(x), len(ids)) for t, ids, r, x in zip(texts, tokens, reasons, chunk)]
        return out


@dataclass(eq=False)
class Row:
    """A row of a Batch: who it answers (key), its answer so far, and what the next step feeds the model."""

    key: Any
    state: RowState
    prompt: list[int]
    token: int | None = None  # the last sampled token, fed to the model at the next step; None before prefill

    @property
    def pos(self) -> int:  # the position (and cache slot) of `token`
        return len(self.prompt) + len(self.state.tokens) - 1


class Batch:
    """Rows decoding together, joining and leaving between steps (continuous batching).

    Each row has its own cache row and its own positions, from slot 0, so a row that joins a running batch
    computes what it would alone, and a seeded row draws from its own generator. A row added between steps is
    prefilled at the next one (and gets its first token there); a row that ends, or is cancelled, leaves at
    once: the last row moves into its place, so the live rows stay at the front and a decode step runs on a
    view of the cache, not a copy. Open one with Engine.batch().
    """

    def __init__(self, engine: Engine, capacity: int):
        self.engine, self.capacity = engine, capacity
        self.rows: list[Row] = []
        self.joining: list[Row] = []  # added since the last step
        self.sampler = Sampler(capacity, engine.model.cfg.vocab_size, engine.device, engine.generator)

    def __len__(self) -> int:
        return len(self.rows) + len(self.joining)

    def free(self) -> int:
        return self.capacity - len(self)

    def add(self, prompt: list[int], params: SamplingParams, key: Any) -> None:
        """A row that joins at the next step; key is what step() reports its events under."""
        if not self.free():
            raise ValueError(f"the batch is full ({self.capacity} rows)")
        self.engine.check_prompt(prompt)
        params.validate()
        budget = min(params.max_new_tokens, self.engine.max_seq_len - len(prompt))
        self.joining.append(Row(key, RowState(self.engine.tokenizer, prompt, params, budget), prompt))

    def step(self, cancelled: Callable[[Any], bool] = lambda key: False) -> list[tuple[Any, TokenEvent]]:
        """One token for every row: the (key, TokenEvent) of each row, cancelled rows' last events included."""
        events = []
        for row in [r for r in self.rows + self.joining if cancelled(r.key)]:
            events.append((row.key, row.state.finish(None, "", "cancelled")))
            if row in self.joining:
                self.joining.remove(row)
            else:
                self.remove(self.rows.index(row))
        running, joining = len(self.rows), self.joining
        for row in joining:
            self.rows.append(row)
            self.sampler.add(row.state.params, row.prompt)
        self.joining = []
        if not self.rows:
            return events
        with torch.inference_mode():
            tokens = self.sampler(self.logits(running, joining))
            self.sampler.update(tokens)
        ended = []
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            row.token = token
            events.append((row.key, row.state.event(token, self.engine.end_tokens)))
            if row.state.finished:
                ended.append(i)
        for i in reversed(ended):
            self.remove(i)
        return events

    def logits(self, running: int, joining: list[Row]) -> torch.Tensor:
        """The next-token logits of every row: the running rows (0..running-1) feed their last token, the
        joining ones their prompt. One forward pass for all when small enough (see PACKED_STEP_SLOTS); else
        a decode step on a view of the cache and a prefill of the joining rows."""
        engine, old = self.engine, self.rows[:running]
        inputs = [(r.token, r.pos, i) for i, r in enumerate(old)]
        ends = list(range(running))  # the input whose logits each row samples from
        for j, row in enumerate(joining):
            inputs += [(t, p, running + j) for p, t in enumerate(row.prompt)]
            ends.append(len(inputs) - 1)
        tokens, pos, rows = (torch.tensor(column, device=engine.device) for column in zip(*inputs))
        span = engine.span(int(pos.max()) + 1)
        if joining and len(inputs) * span <= PACKED_STEP_SLOTS:  # one pass; each input reads a copy of its row
            logits = engine._decode_step(tokens[:, None], pos[:, None], rows, span)
            return logits[torch.tensor(ends, device=engine.device)]
        logits = []
        if running:
            span = engine.span(int(pos[:running].max()) + 1)
            logits.append(engine._decode(tokens[:running, None], pos[:running, None], slice(0, running), span))
        if joining:
            logits.append(engine._prefill([r.prompt for r in joining], running))
        return torch.cat(logits)

    def remove(self, i: int) -> None:
        """Row i leaves; the last row takes its place in the list, the cache and the sampler."""
        last = len(self.rows) - 1
        if i != last:
            self.engine.model.move_cache_row(last, i)
            self.rows[i] = self.rows[last]
        self.rows.pop()
        self.sampler.remove(i)


# -----------------------------------------------------------------------------
# The interactive prompt

HELP = """commands:
  /temp 0.7    temperature (0 = greedy)       /top_k 50    sample among the k best (0 = off)
  /top_p 0.9   nucleus sampling (1 = off)     /min_p 0.05  drop unlikely tokens (0 = off)
  /rep 1.1     repetition penalty (1 = off)   /max 200     tokens per answer at most
  /seed 1      reproducible sampling (/seed -1: random)     /greedy      same as /temp 0
  /chat        switch chat mode (chat template, keeps the conversation) on or off
  /reset       forget the conversation        /settings    show the settings
  /help        this text                      /quit        leave (or Ctrl-D)
Ctrl-C stops the answer being written, not the program."""

# command -> the SamplingParams field it sets and how to read its value
SETTINGS = {"/temp": ("temperature", float), "/top_k": ("top_k", int), "/top_p": ("top_p", float),
            "/min_p": ("min_p", float), "/rep": ("repetition_penalty", float), "/max": ("max_new_tokens", int),
            "/seed": ("seed", int)}


class Session:
    """The interactive prompt's state: sampling settings, chat mode and the conversation so far."""

    def __init__(self, engine: Engine, params: SamplingParams, chat: bool):
        self.engine, self.params = engine, params
        self.chat = chat and self.has_chat_template()
        self.messages: list[dict] = []

    def has_chat_template(self) -> bool:
        if self.engine.tokenizer.chat_template:
            return True
        print("this checkpoint's tokenizer has no chat template: chat mode is unavailable")
        return False

    def command(self, line: str) -> bool:
        """Carry out a /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name in SETTINGS:
            self.set(name, arg)
        elif name == "/greedy":
            self.params.temperature = 0.0
            print("temperature = 0 (greedy)")
        elif name == "/chat":
            self.chat = not self.chat and self.has_chat_template()
            self.messages = []
            print("chat mode on: a new conversation" if self.chat else "chat mode off: text is continued")
        elif name == "/reset":
            self.messages = []
            print("conversation forgotten")
        elif name == "/settings":
            print(", ".join(f"{k} = {v}" for k, v in asdict(self.params).items()) + f", chat = {self.chat}")
        elif name == "/help":
            print(HELP)
        else:
            print(f"unknown command {name}; /help lists the commands")
        return True

    def set(self, name: str, arg: str) -> None:
        key, kind = SETTINGS[name]
        try:
            value = kind(arg)
        except ValueError:
            print(f"{name} needs a {'whole number' if kind is int else 'number'}, e.g. {name} 1")
            return
        if key == "seed" and value < 0:
            value = None
        new = replace(self.params, **{key: value})
        try:
            new.validate()
        except UserError as e:
            print(e.args[0])
            return
        self.params = new
        print(f"{key} = {value}")

    def prompt_ids(self, text: str) -> list[int]:
        tok = self.engine.tokenizer
        if not self.chat:
            return tok.encode(text, add_special_tokens=False)
        self.messages.append({"role": "user", "content": text})
        return chat_prompt_ids(tok, self.messages)

    def answer(self, text: str) -> None:
        """Stream the answer to `text`; Ctrl-C stops it and keeps what was written."""
        try:
            ids = self.prompt_ids(text)
            events = self.engine.stream([ids], [self.params])
            reply, n, start = "", 0, time.perf_counter()
            try:
                for (ev,) in events:
                    print(ev.text_delta, end="", flush=True)
                    reply += ev.text_delta
                    n += ev.token_id is not None
            except KeyboardInterrupt:
                print(" [stopped]", end="")
            finally:
                events.close()
            seconds = time.perf_counter() - start
            print(f"\n[{n} tokens, {n / seconds:.1f} tokens/s]")
            if self.chat:
                self.messages.append({"role": "assistant", "content": reply})
        except UserError as e:
            if self.chat:
                self.messages.pop()  # the message that did not fit is not part of the conversation
            print(f"error: {e.args[0]}" + (" (/reset starts a new conversation)" if self.chat else ""))

    def loop(self) -> None:
        print(f"{self.engine.path} ({'chat' if self.chat else 'text completion'} mode). /help lists the commands.")
        while True:
            try:
                line = input("chat> " if self.chat else ">>> ")
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                print("\n(/quit or Ctrl-D leaves)")
                continue
            if line.strip().startswith("/"):
                if not self.command(line.strip()):
                    return
            elif line.strip():
                self.answer(line)
            else:
                print("empty prompt: type some text, or /help")


# -----------------------------------------------------------------------------
# One-shot mode and main


def read_prompts(cfg: dict) -> list[str]:
    prompts = list(cfg["prompt"])
    if cfg["prompts_file"]:
        try:
            lines = Path(cfg["prompts_file"]).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts_file={cfg['prompts_file']}: {e}", "Generation errors") from None
        prompts += [line for line in lines if line.strip()]
    if any(not p.strip() for p in prompts):
        raise UserError("--prompt is empty: give some text to continue", "Generation errors")
    return prompts


def one_shot(engine: Engine, prompts: list[str], params: SamplingParams) -> None:
    """A single prompt streams its continuation; several print theirs one after another, batched."""
    ids = [engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    for x in ids:
        engine.check_prompt(x)
    if len(prompts) == 1:
        for (ev,) in engine.stream(ids, [params]):
            print(ev.text_delta, end="", flush=True)
        print()
        return
    # each row its own seed, so a prompt's text does not depend on where it sits in the batch
    rows = [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(len(ids))]
    for i, (prompt, c) in enumerate(zip(prompts, engine.generate(ids, rows))):
        print(f"--- {i + 1}: {prompt}\n{c.text}")


def main(argv: list[str]) -> int:
    cfg, given = parse_flags(_FLAG_DEFAULTS, argv, __file__, usage=__doc__)
    if cfg["batch_size"] < 1:
        raise UserError(f"--batch_size must be at least 1, got {cfg['batch_size']}", "Generation errors")
    params = SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"],
                            top_p=cfg["top_p"], min_p=cfg["min_p"], repetition_penalty=cfg["repetition_penalty"],
                            stop=cfg["stop"], seed=None if cfg["seed"] < 0 else cfg["seed"])
    params.validate()
    prompts = read_prompts(cfg)
    if "checkpoint" not in given and not Path(cfg["checkpoint"]).exists():
        raise UserError(f"no checkpoint found: {cfg['checkpoint']}/ does not exist. Train one "
                        "(python gpu_training_optimized.py) or pass --checkpoint=DIR", "Generation errors")
    if cfg["benchmark"]:
        from benchmarks.decode import benchmark
        return benchmark(cfg["checkpoint"], cfg["device"])
    engine = Engine(cfg["checkpoint"], cfg["device"], cfg["dtype"], cfg["quantize"] or None, cfg["compile"],
                    max_batch_size=cfg["batch_size"])
    if prompts:
        one_shot(engine, prompts, params)
    else:
        Session(engine, params, cfg["chat"]).loop()
    return 0


if __name__ == "__main__":
    run_main(main)
