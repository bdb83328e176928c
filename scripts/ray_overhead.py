#!/usr/bin/env python
"""Ray's fixed costs on this machine, for the cost plan of docs/sweeps.md: starting a local instance, a no-op
task, a task that returns a sweep task's worth of session rows (107 KB), and shutting down.

Usage: ``python scripts/ray_overhead.py [--cpus 2] [--tasks 2000]`` (needs ``kvcast[ray]``).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--result-bytes", type=int, default=107_000)
    args = parser.parse_args()
    t0 = time.perf_counter()
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    t1 = time.perf_counter()

    @ray.remote(num_cpus=1)
    def echo(x):
        return x

    ray.get([echo.remote(i) for i in range(50)])  # warm the workers
    t2 = time.perf_counter()
    ray.get([echo.remote(i) for i in range(args.tasks)])
    t3 = time.perf_counter()
    payload = b"x" * args.result_bytes
    n_big = max(args.tasks // 4, 1)
    ray.get([echo.remote(payload) for _ in range(n_big)])
    t4 = time.perf_counter()
    ray.shutdown()
    t5 = time.perf_counter()
    print(f"import + ray.init: {t1 - t0:.2f} s; {args.tasks} no-op tasks: {(t3 - t2) / args.tasks * 1e3:.2f} ms each; "
          f"{n_big} tasks of {args.result_bytes / 1e3:.0f} KB: {(t4 - t3) / n_big * 1e3:.2f} ms each; "
          f"shutdown: {t5 - t4:.2f} s")


if __name__ == "__main__":
    main()
