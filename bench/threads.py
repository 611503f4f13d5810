"""Two torch processes on one machine: what their intra-op threads cost each other.

Why the test suite sets `OMP_NUM_THREADS=1` under `pytest -n 2` (tests/conftest.py): each process
runs the same small convolution loop, alone and side by side with a second one, at one thread and
at torch's default (one per core). On a 2-core machine two processes at two threads each spin on
each other's OpenMP barriers. Prints one JSON object; compare the ratios, not absolute numbers.

    python bench/threads.py [--passes 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _loop(threads: int, passes: int) -> float:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)])
    x = torch.randn(2, 32, 64, 128)
    with torch.no_grad():
        net(x)  # (warm-up)
        t = time.perf_counter()
        for _ in range(passes):
            net(x)
    return time.perf_counter() - t


def _run(threads: list[int], passes: int) -> list[float]:
    """One process per entry of `threads`, all at once; each one's loop time in seconds."""
    cmd = [sys.executable, __file__, "--child"]
    procs = [subprocess.Popen([*cmd, str(n), str(passes)], stdout=subprocess.PIPE, text=True)
             for n in threads]  # fmt: skip
    out = [float(p.communicate()[0]) for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a child process failed")
    return out


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(_loop(int(sys.argv[2]), int(sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passes", type=int, default=30)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    cases = {
        f"alone_{cores}_threads": [cores],
        "alone_1_thread": [1],
        f"two_processes_{cores}_threads_each": [cores, cores],
        "two_processes_1_thread_each": [1, 1],
    }
    result = {"cores": cores, "passes": args.passes, "seconds": {}}
    for name, threads in cases.items():
        result["seconds"][name] = [round(s, 3) for s in _run(threads, args.passes)]
    s = result["seconds"]
    slow = max(s[f"two_processes_{cores}_threads_each"])
    result["two_processes_default_over_one_thread"] = round(
        slow / max(s["two_processes_1_thread_each"]), 2
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
