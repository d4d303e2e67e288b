"""Run N processes of one command on this machine as a multi-host JAX job (CPU, gloo collectives).

Each process gets the coordinator environment that ``bifrost_jax.parallel.mesh.initialize_distributed`` reads
(BIFROST_COORDINATOR, BIFROST_NUM_PROCESSES, BIFROST_PROCESS_ID), JAX_PLATFORMS=cpu and
``--xla_force_host_platform_device_count`` simulated devices. Use it to try multi-host code paths (data sharding
per host, checkpoints written by several processes) without a pod:

    python launch/local_multiprocess.py --num_processes 2 --devices_per_process 4 -- \\
        bifrost train --config configs/toy.py --workdir runs/toy_mp

Output lines are prefixed with ``[i]``. The exit code is the first non-zero exit code of the processes (all
others are then stopped), else 0.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, devices_per_process: int, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", BIFROST_COORDINATOR=f"127.0.0.1:{port}",
               BIFROST_NUM_PROCESSES=str(n), BIFROST_PROCESS_ID=str(i), PYTHONUNBUFFERED="1")
    return env


def _pump(i: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{i}] {line}")
        out.flush()
    stream.close()


def run(command: list[str], num_processes: int, devices_per_process: int, *, timeout: float | None = None,
        env: dict | None = None, cwd: str | None = None, out=None) -> int:
    """Start the processes, stream their output, return the job's exit code (see the module docstring)."""
    out = out or sys.stdout
    port = free_port()
    procs, pumps = [], []
    for i in range(num_processes):
        p = subprocess.Popen(command, env=process_env(i, num_processes, port, devices_per_process, env), cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        t = threading.Thread(target=_pump, args=(i, p.stdout, out), daemon=True)
        t.start()
        pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                break
            if deadline is not None and time.monotonic() > deadline:
                out.write(f"local_multiprocess: timed out after {timeout}s\n")
                code = 124
                break
            time.sleep(0.1)
        else:
            code = next((p.returncode for p in procs if p.returncode != 0), 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before all processes are killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (put it after --)")
    return run(command, args.num_processes, args.devices_per_process, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
