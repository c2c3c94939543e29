"""The built-in demo agent: prints progress, exits 0 when done or on SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetwire-demo-agent")
    parser.add_argument("--task", default="")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"demo agent: task {args.task!r}, {args.steps} steps", flush=True)
    for step in range(1, args.steps + 1):
        if stop.wait(args.interval):
            print(f"demo agent: SIGTERM at step {step}, stopping cleanly", flush=True)
            return 0
        print(f"demo agent: step {step}/{args.steps}", flush=True)
    print("demo agent: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
