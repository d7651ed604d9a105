"""
Talk to a checkpoint: an interactive prompt, and one-shot generation for scripts, on the engine of engine.py
(serve.py uses the same engine).

    python text_generator.py                                   # newest checkpoint under out/, interactive
    python text_generator.py --checkpoint=out/checkpoint-2000 --quantize=int8
    python text_generator.py --prompt="Once upon a time" --prompt="The king" --temperature=0
    python text_generator.py --prompt="Once upon a time" --temperature=0 --draft=out_tiny   # speculative
    python text_generator.py --benchmark                       # decode tokens/s vs transformers' generate
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from cli import UserError, parse_flags, run_main, settings_block, utf8_text
from engine import Engine, chat_prompt_ids
from sampling import SamplingParams
from speculative import DraftStats, check_draft, speculative_stream

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
DRAFT = ""  # a small checkpoint with the same tokenizer: speculative decoding (one-shot mode, greedy only)
DRAFT_TOKENS = 4  # tokens the draft guesses per round of speculative decoding
BENCHMARK = False  # measure decode tokens/s against transformers' generate and print a table
_FLAG_DEFAULTS = settings_block(globals())  # the settings above are the flags


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


def one_shot_speculative(target: Engine, draft: Engine, prompts: list[str], params: SamplingParams,
                         draft_tokens: int) -> None:
    """Each prompt alone, its continuation streamed; how well the draft guessed goes to stderr."""
    ids = [target.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    for x in ids:
        target.check_prompt(x)
    for i, (prompt, x) in enumerate(zip(prompts, ids)):
        if len(prompts) > 1:
            print(f"--- {i + 1}: {prompt}")
        stats = DraftStats()
        for ev in speculative_stream(target, draft, x, params, draft_tokens, stats):
            print(ev.text_delta, end="", flush=True)
        print()
        print(f"[draft: {stats.accepted} of {stats.proposed} guesses kept ({stats.acceptance:.0%}), "
              f"{stats.target_passes} target passes]", file=sys.stderr)


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
    if cfg["draft"] and (not prompts or cfg["temperature"] != 0 or cfg["draft_tokens"] < 1):
        raise UserError("--draft (speculative decoding) needs --prompt or --prompts_file, --temperature=0 and "
                        "--draft_tokens >= 1", "Speculative decoding")
    if "checkpoint" not in given and not Path(cfg["checkpoint"]).exists():
        raise UserError(f"no checkpoint found: {cfg['checkpoint']}/ does not exist. Train one "
                        "(python gpu_training_optimized.py) or pass --checkpoint=DIR", "Generation errors")
    if cfg["benchmark"]:
        from benchmarks.decode import benchmark
        return benchmark(cfg["checkpoint"], cfg["device"])
    engine = Engine(cfg["checkpoint"], cfg["device"], cfg["dtype"], cfg["quantize"] or None, cfg["compile"],
                    max_batch_size=cfg["batch_size"])
    if cfg["draft"]:
        draft = Engine(cfg["draft"], cfg["device"], cfg["dtype"], cfg["quantize"] or None, cfg["compile"], 1)
        check_draft(engine, draft)
        one_shot_speculative(engine, draft, prompts, params, cfg["draft_tokens"])
    elif prompts:
        one_shot(engine, prompts, params)
    else:
        Session(engine, params, cfg["chat"]).loop()
    return 0


if __name__ == "__main__":
    run_main(main)
