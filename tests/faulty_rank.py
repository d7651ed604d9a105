"""gpu_training_optimized.py under torchrun with its last rank failing at step 2, as a crashed or stuck GPU would:
$TRAIN_FAULT=exit makes it die, $TRAIN_FAULT=hang makes it stop answering until torchrun's SIGTERM. The other
ranks must then stop with a clear error (tests/test_distributed.py)."""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_training_optimized as train  # noqa: E402
from distributed import run_torchrun  # noqa: E402

FAULT = os.environ["TRAIN_FAULT"]
real_step = train.train_step
steps = 0


def failing_step(*args, **kwargs):
    global steps
    last_rank = int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1
    if last_rank and steps == 2:
        if FAULT == "hang":
            signal.signal(signal.SIGTERM, lambda *_: os._exit(1))
            while True:
                time.sleep(0.1)
        os._exit(1)
    steps += 1
    return real_step(*args, **kwargs)


train.train_step = failing_step
run_torchrun(train.main)
