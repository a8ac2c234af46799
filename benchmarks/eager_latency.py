"""Eager PyTorch fp32 latency of the paper-configuration STLM per image, at several input sizes.

    python -m stlm_bench.eager_latency --sizes 256 1024 --runs 5 --json benchmarks/results/eager_latency.json

The reference every engine is compared with in `stlm-bench`; weights are random (latency does not
depend on them).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .measure import environment, time_fn
from .output import run_main, write_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--config", default="paper")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from stlm_train import get_config
    from stlm_train.modeling import build_model

    torch.set_num_threads(args.threads)
    rows = []
    print("| config | img | params | eager fp32 ms/img (p50) | mean | min |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        model = build_model(get_config(args.config, size)).eval()  # any family (--config stfpm)
        x = torch.randint(0, 256, (1, size, size, 3), dtype=torch.uint8)
        t = time_fn(lambda: model.predict(x), runs=args.runs, warmup=1)
        n = sum(p.numel() for p in model.parameters())
        rows.append({"config": args.config, "img_size": size, "params": n, **t.to_dict()})
        print(f"| {args.config} | {size} | {n:,} | {t.p50_ms:.0f} | {t.mean_ms:.0f} | {t.min_ms:.0f} |")
    if args.json:
        write_json(args.json, {"rows": rows, "environment": environment(args.threads)})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
