"""Server CPU per small call, thread by thread, for two or more versions of the code, interleaved.

    python -m bench.thread_cpu set 100 --trees main,.           # main against this work tree
    python -m bench.thread_cpu get 100 --trees main,. --clients 1 --rounds 5
    python -m bench.thread_cpu set 100 --trees bare,.           # the bare servicer and this tree

Each round starts every tree's server in turn on a fresh data folder (same client code, from
this tree), runs bench.load's closed loop against it and reads the server's threads' user and
system CPU ticks from /proc/PID/task/*/stat before and after. CPU per call moves far less with
the shared machine's load than calls per second do, and A/B/A/B rounds spread what load there
is over both. A tree is a git revision (exported to build/bench/trees/), "." for the work
tree as it is, or "bare" for bench.bare's aio servicer (the transport's own cost). Threads
are grouped by their Python names (read with py-spy dump); the event loop is the main thread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.load import Load, measure, preload

TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
PACKAGES = {
    "v1": "protos/blobstore/v1",
    "internal": "protos/blobstore/internal",
    "client": "client",
    "server": "server",
}
SERVE = "import sys; from blobstore.client.cli import main; sys.argv[0] = 'blobstore'; sys.exit(main())"


def import_root(tree: str) -> Path:
    """A folder whose blobstore/ links to `tree`'s sources: put first on PYTHONPATH, it wins over
    the editable install (whose finder comes after the path)."""
    if tree == ".":
        source, name = procs.ROOT, "worktree"
    else:
        sha = subprocess.run(
            ["git", "rev-parse", "--verify", f"{tree}^{{commit}}"], cwd=procs.ROOT, capture_output=True, text=True
        ).stdout.strip()
        if not sha:
            raise SystemExit(f"no such revision: {tree}")
        source = procs.ROOT / "build/bench/trees" / sha
        name = sha
        if not source.exists():
            source.mkdir(parents=True)
            archive = subprocess.run(["git", "archive", sha], cwd=procs.ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    root = procs.ROOT / "build/bench/trees/roots" / name / "blobstore"
    root.mkdir(parents=True, exist_ok=True)
    for package, folder in PACKAGES.items():
        link = root / package
        if not link.is_symlink():
            link.symlink_to(source / folder)
    return root.parent


def start_server(tree: str, workdir: Path) -> procs.Service:
    data = workdir / "data"
    subprocess.run(["rm", "-rf", str(data)], check=True)
    port = procs.free_port()
    argv = [procs.PYTHON, "-c", SERVE, "serve", "--data-dir", str(data), "--port", str(port), "--log-level", "warning"]
    env = dict(procs.CHILD_ENV, PYTHONPATH=os.pathsep.join([str(import_root(tree)), procs.CHILD_ENV["PYTHONPATH"]]))
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "blobstore.log", "ab")  # noqa: SIM115 (the child keeps it)
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    service = procs.Service("blobstore", process, port, workdir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server of {tree} exited; see {workdir / 'blobstore.log'}")
        try:
            if procs.grpc_ready(service):
                return service
        except Exception:
            time.sleep(0.1)
    service.stop()
    raise RuntimeError(f"the server of {tree} did not start; see {workdir / 'blobstore.log'}")


def python_thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name, from py-spy (Python 3.11 does not name the OS threads)."""
    py_spy = procs.BIN / "py-spy"
    if not py_spy.exists():
        subprocess.run([procs.PYTHON, "-m", "pip", "install", "--quiet", "py-spy"], check=False)
    if not py_spy.exists():
        return {}  # threads keep their OS names (all "python")
    dump = subprocess.run([str(py_spy), "dump", "--pid", str(pid)], capture_output=True, text=True)
    return {int(tid): name for tid, name in re.findall(r'^Thread (\d+) \(.*?\): "(.*)"', dump.stdout, re.MULTILINE)}


def thread_ticks(pid: int, names: dict[int, str]) -> dict[str, tuple[int, int]]:
    """(user, system) clock ticks per thread group: threads named alike (worker_0, worker_1) add up."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        tid = int(task.name)
        group = "event loop" if tid == pid else re.sub(r"[_-]?\d+$", "", names.get(tid, name))
        groups[group][0] += int(fields[11])
        groups[group][1] += int(fields[12])
    return {name: (user, system) for name, (user, system) in groups.items()}


@dataclass
class Run:
    tree: str
    calls_per_s: float
    # Thread group -> (user, system) CPU microseconds per call.
    threads: dict[str, tuple[float, float]]

    @property
    def us_per_call(self) -> float:
        return sum(user + system for user, system in self.threads.values())

    def row(self) -> dict[str, object]:
        return {
            "tree": self.tree,
            "calls_per_s": round(self.calls_per_s),
            "us_per_call": round(self.us_per_call),
            "threads_user_sys_us": {
                name: [round(user), round(system)] for name, (user, system) in self.threads.items()
            },
        }


def one_run(tree: str, op: str, size: int, clients: int, processes: int, seconds: float) -> Run:
    workdir = procs.ROOT / "build/bench/thread_cpu"
    server = procs.start_bare(workdir, "aio") if tree == "bare" else start_server(tree, workdir)
    try:
        load = Load("bare" if tree == "bare" else "blobstore", server.address, op, size, "p")
        preload(load)
        measure(load, min(clients, 4), min(processes, 4), 1.0)  # warm up the server's paths and pages
        names = python_thread_names(server.pid)
        before = thread_ticks(server.pid, names)
        rate = measure(load, clients, processes, seconds)
        after = thread_ticks(server.pid, names)
    finally:
        server.stop()
    calls = rate["calls_per_s"] * seconds
    threads = {}
    for name, (user, system) in after.items():
        user0, system0 = before.get(name, (0, 0))
        if user + system > user0 + system0:
            threads[name] = ((user - user0) * TICK_US / calls, (system - system0) * TICK_US / calls)
    return Run(tree, rate["calls_per_s"], threads)


def summary(tree: str, runs: list[Run]) -> dict[str, object]:
    names = sorted({name for run in runs for name in run.threads})
    return {
        "median": tree,
        "calls_per_s": round(statistics.median(run.calls_per_s for run in runs)),
        "us_per_call": round(statistics.median(run.us_per_call for run in runs)),
        "range": [round(min(run.us_per_call for run in runs)), round(max(run.us_per_call for run in runs))],
        "threads_user_sys_us": {
            name: [round(statistics.median(run.threads.get(name, (0, 0))[i] for run in runs)) for i in (0, 1)]
            for name in names
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=["set", "get"])
    parser.add_argument("size", type=int, nargs="?", default=100)
    parser.add_argument("--trees", default=".", help="comma-separated git revisions; '.' is the work tree")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = args.trees.split(",")
    runs: dict[str, list[Run]] = defaultdict(list)
    for round_number in range(args.rounds):
        # Alternate the order, so that neither tree always runs right after the other.
        for tree in trees if round_number % 2 == 0 else trees[::-1]:
            run = one_run(tree, args.op, args.size, args.clients, args.processes, args.seconds)
            runs[tree].append(run)
            head = {"round": round_number, "op": args.op, "size": args.size, "clients": args.clients}
            print(json.dumps({**head, **run.row()}), flush=True)
    for tree in trees:
        print(json.dumps(summary(tree, runs[tree])), flush=True)


if __name__ == "__main__":
    main()
