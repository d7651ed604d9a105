"""
Speculative decoding, greedy: a small draft model (same tokenizer) guesses the next few tokens one at a time,
the target model checks all of them in one forward pass, and every guess up to the first wrong one is kept,
plus the target's own token there. The output is exactly the target's greedy text; it comes faster when the
target's pass over k + 1 tokens costs about one decode step (reading the weights dominates) and the draft
guesses well.

    python text_generator.py --checkpoint=out --draft=out_tiny --prompt="Once upon a time" --temperature=0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from cli import UserError
from engine import Engine, RowState, TokenEvent
from sampling import SamplingParams


@dataclass
class DraftStats:
    """How well the draft guessed: tokens it proposed, how many the target kept, and target passes run."""

    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.proposed)


def check_draft(target: Engine, draft: Engine) -> None:
    if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise UserError(f"the draft {draft.path} has another tokenizer than {target.path}: speculative decoding "
                        "needs the same one (train the draft with --tokenizer=<the target's checkpoint>)",
                        "Speculative decoding")


def forward(engine: Engine, tokens: list[int], start: int) -> torch.Tensor:
    """Run tokens at positions start.. over the engine's cache (one row); the greedy token after each (T,)."""
    idx = torch.tensor([tokens], device=engine.device)
    pos = torch.arange(start, start + len(tokens), device=engine.device)
    return engine.model(idx, pos=pos)[0].argmax(dim=-1)


def speculative_stream(target: Engine, draft: Engine, prompt: list[int], params: SamplingParams,
                       draft_tokens: int = 4, stats: DraftStats | None = None) -> Iterator[TokenEvent]:
    """The TokenEvents of the target's greedy answer to `prompt`, found with the draft's help.

    Both caches hold every position before `pos`; `last` (at `pos`) is in neither yet. A round: the draft
    feeds last, d1, .. and proposes d1..dk; the target feeds last, d1..dk at once and gives its greedy choice
    g0..gk after each. d1..dn are kept while d(i+1) == g(i), then g(n) follows. Cache slots past the kept
    tokens hold rejected guesses; the next round overwrites them before any position reads them (the mask
    lets a token see the slots up to its own position only)."""
    if draft is target:
        raise ValueError("the draft must be another Engine (each holds its own KV cache)")
    target.check_prompt(prompt)
    params.validate()
    if params.temperature != 0 or params.repetition_penalty != 1 or params.presence_penalty or params.frequency_penalty:
        raise UserError("speculative decoding (--draft) is plain greedy only: add --temperature=0, no penalties",
                        "Speculative decoding")
    stats = stats or DraftStats()
    limit = min(target.max_seq_len, draft.max_seq_len)
    state = RowState(target.tokenizer, prompt, params, min(params.max_new_tokens, limit - len(prompt)))
    with target.batch(1), draft.batch(1), torch.inference_mode():
        for engine in (target, draft) if len(prompt) > 1 else ():
            forward(engine, prompt[:-1], 0)
        last, pos = prompt[-1], len(prompt) - 1
        while not state.finished:
            k = max(0, min(draft_tokens, limit - 1 - pos, state.max_new_tokens - len(state.tokens) - 1))
            guesses, token = [], last
            for i in range(k):
                token = int(forward(draft, [token], pos + i)[0])
                guesses.append(token)
            greedy = forward(target, [last] + guesses, pos).tolist()
            n = next((i for i, g in enumerate(guesses) if g != greedy[i]), k)
            if n == k and k:  # all kept: the draft has not seen its last guess yet
                forward(draft, guesses[-1:], pos + k)
            stats.proposed, stats.accepted, stats.target_passes = \
                stats.proposed + k, stats.accepted + n, stats.target_passes + 1
            for token in guesses[:n] + [greedy[n]]:
                yield state.event(token, target.end_tokens)
                if state.finished:
                    return
            last, pos = greedy[n], pos + n + 1
