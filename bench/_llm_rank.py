"""One rank of bench/llm_throughput.py: examples/pretrain_llm.py with every `Trainer.train_step` timed
(wall and this process's CPU time), written to $LLM_BENCH_TIMES/rank<N>.json at the end."""
from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from engine.run import launch  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

times = {"wall": [], "cpu": []}
_train_step = Trainer.train_step


def timed_train_step(self, data_iter):
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = _train_step(self, data_iter)
    times["wall"].append(time.perf_counter() - wall)
    times["cpu"].append(time.process_time() - cpu)
    return metrics


if __name__ == "__main__":
    Trainer.train_step = timed_train_step
    launch("llm", argv=sys.argv[1:])
    out = os.environ["LLM_BENCH_TIMES"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
        json.dump(times, fh)
