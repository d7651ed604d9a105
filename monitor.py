"""
What a training run shows and records: a tqdm bar with loss, learning rate, tokens/s, MFU and memory; a line of
CPU/RAM/GPU figures every LOG_INTERVAL steps; OUT_DIR/metrics.jsonl (one JSON line per step and per evaluation);
loss.png, redrawn at each evaluation; and TensorBoard scalars when TensorBoard is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

GiB = 2**30


def system_line(device: torch.device) -> str:
    """CPU and RAM (psutil), and on NVIDIA GPUs utilisation, temperature and power (nvidia-ml-py)."""
    import psutil

    vm = psutil.virtual_memory()
    parts = [f"cpu {psutil.cpu_percent():.0f}%", f"ram {vm.used / GiB:.1f}/{vm.total / GiB:.1f} GiB",
             f"process {psutil.Process().memory_info().rss / GiB:.2f} GiB"]
    if device.type == "cuda":
        try:
            import pynvml
        except ImportError:
            return " | ".join(parts + ["GPU figures need: pip install nvidia-ml-py"])
        try:
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            parts.append(f"gpu {pynvml.nvmlDeviceGetUtilizationRates(h).gpu}% "
                         f"{pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)}C "
                         f"{pynvml.nvmlDeviceGetPowerUsage(h) / 1000:.0f} W")
        except pynvml.NVMLError as e:
            parts.append(f"gpu figures unavailable ({e})")
    return " | ".join(parts)


def memory_in_use(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / GiB:.1f}G"
    import psutil

    return f"{psutil.Process().memory_info().rss / GiB:.1f}G rss"


class Monitor:
    """Where the figures go: OUT_DIR/metrics.jsonl (a line per step and per evaluation), loss.png (redrawn at
    each evaluation), TensorBoard when installed, and the tqdm bar. A resumed run keeps the lines up to its
    step and drops those of the steps it will redo."""

    def __init__(self, out: Path, start_step: int, total: int | None, enabled: bool = True):
        from tqdm import tqdm

        self.path, self.png = out / "metrics.jsonl", out / "loss.png"
        self.history, self.file, self.tb = [], None, None
        self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, disable=not enabled)
        if not enabled:  # under torchrun only rank 0 writes and draws
            return
        if start_step and self.path.is_file():
            lines = self.path.read_text().splitlines()
            self.history = [r for r in map(json.loads, filter(None, lines)) if r["step"] <= start_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # TensorBoard is optional: pip install tensorboard
            self.tb = None

    def evaluation(self, step: int, result: dict, text: str) -> None:
        self.log({"step": step, **result})
        self.plot()
        self.bar.write(f"step {step}: val loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.1f}, "
                       f"{result['val_bpb']:.3f} bits/byte | {text!r}")

    def train_step(self, record: dict, device: torch.device, log_interval: int) -> None:
        self.log(record)
        self.bar.update()
        mfu = f"{record['mfu']:.1%}" if record["mfu"] else "n/a"
        self.bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} "
                                 f"tok/s mfu {mfu} mem {memory_in_use(device)}")
        if record["step"] % log_interval == 0:
            self.bar.write(f"step {record['step']}: {system_line(device)}")

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def plot(self) -> None:
        if self.file is None:
            return
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 4.5))
        ax = fig.subplots()
        for key, style, label in (("loss", "-", "train"), ("val_loss", "o-", "validation")):
            points = [(r["step"], r[key]) for r in self.history if key in r]
            if points:
                ax.plot(*zip(*points), style, lw=1, label=label)
        ax.set(xlabel="step", ylabel="loss (nats per token)", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, self.png)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
