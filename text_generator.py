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
from typing import Callable, Iterator

import torch

from checkpoint import CheckpointError, is_int8, load_model, quantize_int8, resolve_checkpoint
from cli import UserError, parse_flags, pick_device, pick_dtype, run_main, settings_block, utf8_text

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
            ("seed", self.seed is None or isinstance(self.seed, int) and 0 <= self.seed < 2**63,
             "must be a whole number in [0, 2**63)"),
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


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep every token at least as likely as the k-th best, so all tokens tied with it stay, as transformers'
    TopKLogitsWarper does; top_k (B, 1), V = off. One topk of the largest k in the batch serves every row."""
    on = top_k < logits.size(-1)
    k = torch.where(on, top_k, 1)
    kth_best = logits.topk(int(k.max()), dim=-1).values.gather(-1, k - 1)
    return logits.masked_fill(on & (logits < kth_best), float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus, as transformers' TopPLogitsWarper: drop the tokens whose probability summed from the least likely
    up is at most 1 - p, never the best one; top_p (B, 1) float64, the values as given (1 = off). Done the way
    theirs is (an ascending sort of the same values, 1 - p rounded from float64), so the sums agree to the bit and
    so does which of several tokens tied at the boundary stays: an unstable sort's order decides that."""
    sorted_logits, order = logits.sort(dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = (cumulative <= (1 - top_p).to(cumulative.dtype)) & (top_p < 1)  # p = 1 is off, whatever the rounding
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's (min_p (B, 1)), as
    transformers' MinPLogitsWarper does; the best token is never below it, so one token always stays."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


class Sampler:
    """The per-row parameters of a batch as tensors, so one step processes every row at once."""

    def __init__(self, params: list[SamplingParams], prompts: list[list[int]], vocab_size: int,
                 device: torch.device, generator: torch.Generator):
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        B, V = len(params), vocab_size
        self.greedy = column([p.temperature == 0 for p in params], torch.bool)
        self.temperature = column([p.temperature or 1.0 for p in params])
        self.top_k = column([min(p.top_k, V) or V for p in params], torch.long)  # k above V keeps all
        self.top_p = column([p.top_p for p in params], torch.float64)  # 1 - p is rounded as transformers does
        self.min_p = column([p.min_p for p in params])
        self.repetition = column([p.repetition_penalty for p in params])
        self.presence = column([p.presence_penalty for p in params])
        self.frequency = column([p.frequency_penalty for p in params])
        self.seen = self.counts = None  # allocated only when a row uses them
        if any(p.repetition_penalty != 1 for p in params):
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            for i, prompt in enumerate(prompts):
                self.seen[i, prompt] = True
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            self.counts = torch.zeros(B, V, device=device)
        self.use_top_k = any(p.top_k for p in params)
        self.use_top_p = any(p.top_p < 1 for p in params)
        self.use_min_p = any(p.min_p > 0 for p in params)
        self.all_greedy = all(p.temperature == 0 for p in params)
        # A row with a seed draws from its own generator: its text does not depend on the rest of the batch.
        self.generators = [torch.Generator(device).manual_seed(p.seed) if p.seed is not None else generator
                           for p in params]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row (B,), from the last position's logits (B, V)."""
        logits = apply_penalties(logits.float(), self.seen, self.counts, self.repetition, self.presence,
                                 self.frequency)
        if self.all_greedy:
            return logits.argmax(dim=-1)
        greedy_choice = logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.use_top_k:
            logits = top_k_filter(logits, self.top_k)
        if self.use_top_p:
            logits = top_p_filter(logits, self.top_p)
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


def load_checkpoint_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a damaged tokenizer.json raises anything: KeyError, or the Rust library's Exception
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: no usable tokenizer (tokenizer.json) beside the weights: {first}") from None


class Engine:
    """A loaded checkpoint that generates text for a batch of prompts, one step at a time.

    One batch runs at a time (a lock serialises callers); serve.py forms the batches.
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
            # Each (batch, cache length) pair is its own static graph; allow enough of them before falling back.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self._decode = torch.compile(self._decode_step, dynamic=False)

    # -- the model steps ---------------------------------------------------------------------------------------
    def cache_length(self, needed: int) -> int:
        """Round up to a quarter of the context so a compiled decode step sees few distinct shapes."""
        quarter = max(1, self.max_seq_len // 4)
        return -(-needed // quarter) * quarter

    @torch.inference_mode()
    def _prefill(self, idx: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts (B, P) through the model once; the last position's logits (B, V).
        A padding query may see only itself, so no attention row is empty (an empty one would give NaN)."""
        B, P = idx.shape
        slots = torch.arange(P, device=idx.device)
        pos = (slots - pad[:, None]).clamp(min=0)
        keys = torch.arange(self.model.cache_len, device=idx.device)
        mask = (keys <= slots[:, None]) & ((keys >= pad[:, None, None]) | (keys == slots[:, None]))
        return self.model(idx, pos=pos, slots=slots, mask=mask[:, None]).float()[:, -1]

    def _decode_step(self, tokens: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """One token per row (B, 1) at cache slot `slot` (1,); its logits (B, V). Fixed shapes: compilable."""
        keys = torch.arange(self.model.cache_len, device=tokens.device)
        mask = (keys >= pad[:, None]) & (keys <= slot)
        return self.model(tokens, pos=slot - pad[:, None], slots=slot, mask=mask[:, None, None]).float()[:, -1]

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
        for prompt, p in zip(prompts, params):
            self.check_prompt(prompt)
            p.validate()
        with self._lock:
            yield from self._stream(prompts, params, cancelled or (lambda row: False))

    def _stream(self, prompts, params, cancelled) -> Iterator[list[TokenEvent | None]]:
        B, P = len(prompts), max(map(len, prompts))
        budgets = [min(p.max_new_tokens, self.max_seq_len - len(x)) for x, p in zip(prompts, params)]
        rows = [RowState(self.tokenizer, x, p, n) for x, p, n in zip(prompts, params, budgets)]
        pad = torch.tensor([P - len(x) for x in prompts], device=self.device)
        idx = torch.tensor([[self.pad_id] * (P - len(x)) + x for x in prompts], device=self.device)
        sampler = Sampler(params, prompts, self.model.cfg.vocab_size, self.device, self.generator)
        self.model.setup_cache(B, self.cache_length(P + max(budgets)))
        try:
            logits = self._prefill(idx, pad)
            for slot in range(P, P + max(budgets)):
                with torch.inference_mode():
                    tokens = sampler(logits)
                    sampler.update(tokens)
                step: list[TokenEvent | None] = []
                for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
                    if row.finished:
                        step.append(None)
                    elif cancelled(i):
                        step.append(row.finish(None, "", "cancelled"))
                    else:
                        step.append(row.event(token, self.end_tokens))
                yield step
                if all(row.finished for row in rows):
                    return
                with torch.inference_mode():
                    logits = self._decode(tokens[:, None], torch.tensor([slot], device=self.device), pad)
        finally:
            self.model.clear_cache()

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
        chat = tok.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        return tok.encode(chat, add_special_tokens=False)

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
    prompts = [utf8_text(p, "--prompt") for p in cfg["prompt"]]
    if cfg["prompts_file"]:
        try:
            lines = Path(cfg["prompts_file"]).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompts_file={cfg['prompts_file']}: {e}", "Generation errors") from None
        if not any(line.strip() for line in lines):
            raise UserError(f"--prompts_file={cfg['prompts_file']} has no prompt in it: write one per line",
                            "Generation errors")
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
                            stop=[utf8_text(t, "--stop") for t in cfg["stop"]],
                            seed=None if cfg["seed"] < 0 else cfg["seed"])
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
