"""
The generation engine: a loaded checkpoint that runs the prompt once (prefill), then one token per step over
the preallocated KV cache of modern_llm.py; with compile=True the decode step is compiled once for its fixed
shapes. Prompts of different lengths share a batch (a Batch: continuous batching): each row has its own cache
row and its own RoPE positions, so every row generates exactly what it would alone. text_generator.py (the
prompt and the command line) and serve.py (the HTTP API) drive it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from checkpoint import (
    CheckpointError,
    is_int8,
    load_model,
    quantize_int8,
    resolve_checkpoint,
)
from cli import UserError, pick_device, pick_dtype
from sampling import Sampler, SamplingParams

END_OF_TURN = "<|im_end|>"  # the chat template's end-of-turn token: a reply stops there as at EOS
# A step where rows join runs their prompt tokens and the running rows' tokens as one forward pass when
# (inputs x cache slots read) stays under this: each input then reads a copy of its row's cache.
PACKED_STEP_SLOTS = 65_536


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
    except Exception as e:  # a damaged tokenizer.json raises anything: KeyError, or the Rust library's Exception
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
        self._decode = self._compiled_decode(self.device) if compile else self._decode_step

    def _compiled_decode(self, device: torch.device) -> Callable:
        """The decode step compiled for its static shapes; on CUDA also replayed as a CUDA graph (gpt-fast's
        design: one launch per token instead of one per kernel, the KV cache updated in place inside it)."""
        # Each number of live rows is its own static graph; allow enough of them before falling back.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        step = torch.compile(self._decode_step, dynamic=False,
                             mode="reduce-overhead" if device.type == "cuda" else "default")

        def decode(*args):
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are used up: its buffers may be reused
            return step(*args)

        return decode

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
