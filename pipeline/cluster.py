"""Start N local `distribution=multi_worker` training processes, to try multi-worker training.

    python -m pipeline.cluster --workers 2 -- architecture=mlp trainer.epochs=5

builds a `TF_CONFIG` on free loopback ports, starts `python -m pipeline.train
distribution=multi_worker ARGS...` once per worker (worker 0 is the chief: it alone
records the MLflow run), streams their output prefixed with `[worker i]`, and exits
with the first non-zero exit code if any worker fails, after stopping the others.
Each worker gets its own Hydra output directory (`.../worker-<i>`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime

from pipeline.cli import unclaimed_dir


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (held open until all are picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(addresses: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def _stream(process: subprocess.Popen, prefix: str) -> None:
    for line in process.stdout:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def launch(workers: int, train_args: list[str], grace_seconds: float = 10.0) -> int:
    """Run the cluster to completion; return 0, or the first failing worker's exit code."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    has_run_dir = any(a.startswith("hydra.run.dir=") for a in train_args)
    # Claimed, not just named: two clusters started in the same second stay apart.
    run_dir = None if has_run_dir else unclaimed_dir(f"outputs/{datetime.now():%Y-%m-%d/%H-%M-%S}")
    processes = []
    for index in range(workers):
        args = [*train_args] if has_run_dir else [*train_args, f"hydra.run.dir={run_dir}/worker-{index}"]
        env = {**os.environ, "TF_CONFIG": tf_config(addresses, index), "PYTHONUNBUFFERED": "1"}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "pipeline.train", "distribution=multi_worker", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1))
    threads = [threading.Thread(target=_stream, args=(p, f"[worker {i}]"), daemon=True)
               for i, p in enumerate(processes)]
    for thread in threads:
        thread.start()

    def stop_all(number=None, frame=None) -> None:
        for process in processes:
            if process.poll() is None:
                process.terminate()

    previous = signal.signal(signal.SIGTERM, stop_all)
    failed: tuple[int, int] | None = None  # (worker, exit code)
    try:
        while any(p.poll() is None for p in processes):
            for index, process in enumerate(processes):
                code = process.poll()
                if code not in (None, 0) and failed is None:
                    failed = (index, code)
                    print(f"[cluster] worker {index} exited with {code}: stopping the others", flush=True)
                    stop_all()
            time.sleep(0.2)
        if failed is None:
            failed = next(((i, p.returncode) for i, p in enumerate(processes) if p.returncode), None)
    except KeyboardInterrupt:
        stop_all()
        failed = failed or (-1, 130)
    finally:
        deadline = time.monotonic() + grace_seconds
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in threads:
            thread.join(timeout=5)
        signal.signal(signal.SIGTERM, previous)
    if failed is not None:
        print(f"error: worker {failed[0]} failed (exit code {failed[1]})", file=sys.stderr, flush=True)
        return failed[1] if failed[1] > 0 else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.cluster",
        description="Start N local multi-worker training processes (distribution=multi_worker) on loopback.",
        epilog="Everything after `--` goes to every `python -m pipeline.train`, e.g. -- architecture=mlp",
    )
    parser.add_argument("--workers", type=int, default=2, help="number of worker processes (default 2)")
    parser.add_argument("train_args", nargs="*", help="overrides for pipeline.train")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1. Received: {args.workers}")
    return launch(args.workers, args.train_args)


if __name__ == "__main__":
    sys.exit(main())
