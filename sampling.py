"""
Sampling: how one row is sampled (SamplingParams), the logits processors in Hugging Face's order, and the
Sampler that applies every row's parameters to a batch's logits in one step. The engine (engine.py) and the
HTTP server (serve.py) use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cli import UserError

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
        self.top_k = column([min(p.top_k, V) or V for p in params], torch.long)  # k above V keeps all
        self.top_p = column([p.top_p for p in params], torch.float64)  # 1 - p is rounded as transformers does
        self.min_p = column([p.min_p for p in params])
        self.repetition = column([p.repetition_penalty for p in params])
        self.presence = column([p.presence_penalty for p in params])
        self.frequency = column([p.frequency_penalty for p in params])
        self.use_top_k = any(p.top_k for p in params)
        self.use_top_p = any(p.top_p < 1 for p in params)
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
