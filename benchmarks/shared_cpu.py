"""The demo's training iteration alone and beside competing CPU-bound processes, under several thread settings.

Each measurement runs in a fresh subprocess (thread pools and OpenMP settings are fixed at start-up): the digits
demo's Trainer.train_step (batch 64, K = 4), warm-up, then the median of `--repeats` blocks of `--block`
iterations. Competitors are plain Python busy loops (`--competitor python`) or one-thread torch matmul loops
(`--competitor matmul`), started before the trainer and killed after it. A setting is an environment for the
trainer's process: `default` is what `tdm distill` / `tdm demo` do on their own; the others are explicit.

    python benchmarks/shared_cpu.py [--competitors 0 1 2] [--settings default threads1 ...] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tdm.files import write_text_atomic

SETTINGS = {  # environment of the trainer's process
    "default": {},
    "threads1": {"OMP_NUM_THREADS": "1"},
    "threads2": {"OMP_NUM_THREADS": "2"},
    "threads2_active": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"},
    "threads2_passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
}
COMPETITORS = {
    "python": "while True: pass",
    "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True: a @ a",
}


def child(repeats: int, block: int) -> dict:
    """Time the demo's iteration in this process (run as a fresh subprocess)."""
    import torch

    from tdm.config import load_config
    from tdm.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(load_config("digits-demo", ["train.eval_every=0"]), out)
        def iteration():  # as Trainer._iteration runs it: the step, then the thread budget (train.threads)
            trainer.train_step()
            if trainer.thread_budget is not None:
                trainer.thread_budget.update()

        for _ in range(3):
            iteration()
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            for _ in range(block):
                iteration()
            times.append((time.perf_counter() - tic) / block)
        trainer.close()
    return {"threads": torch.get_num_threads(), "seconds": times, "median": statistics.median(times),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def measure(setting: str, competitors: int, competitor: str, repeats: int, block: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(SETTINGS[setting])
    busy = [subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]]) for _ in range(competitors)]
    try:
        time.sleep(1.0 if competitors else 0.0)
        done = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats), "--block", str(block)],
                              env=env, capture_output=True, text=True, check=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--competitors", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--competitor", default="python", choices=list(COMPETITORS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.repeats, args.block)))
        return

    rows = []
    print(f"cores {os.cpu_count()}, competitor {args.competitor}; seconds per demo iteration (median) and slowdown "
          f"against the same setting alone and against `default` alone")
    for setting in args.settings:
        for n in args.competitors:
            r = {"setting": setting, "competitors": n, **measure(setting, n, args.competitor, args.repeats, args.block)}
            rows.append(r)
            alone = next(x["median"] for x in rows if x["setting"] == setting and x["competitors"] == 0)
            base = next((x["median"] for x in rows if x["setting"] == "default" and x["competitors"] == 0), None)
            r["slowdown"] = r["median"] / alone
            r["slowdown_vs_default_alone"] = r["median"] / base if base else None
            print(f"{setting:17} threads {r['threads']}  competitors {n}  {r['median']:.3f} s/it  "
                  f"x{r['slowdown']:.2f} of itself alone" +
                  (f"  x{r['slowdown_vs_default_alone']:.2f} of default alone" if base else ""), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/shared_cpu.py " + " ".join(sys.argv[1:])
    write_text_atomic(out / "shared_cpu.json", json.dumps({"command": command.strip(), "cores": os.cpu_count(),
                                                           "competitor": args.competitor, "rows": rows}, indent=1))
    print(f"wrote {out / 'shared_cpu.json'}")


if __name__ == "__main__":
    main()
