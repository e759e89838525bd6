"""One run of one contender on one workload, driven from the parent.

A throughput run (``one``, ``chain``): fresh database -> ``schema`` child -> counters ->
``enqueue`` child (N workflows, one at a time) -> counters -> ``worker`` child: ``go``, then
the parent counts complete workflows every ``PROBE_S`` until all N are, then ``stop`` ->
counters. Workflows/s = N / (moment the last completion was seen - moment the worker child
was told to start, its own clock ``time.time()``); the start includes connecting and the
worker's own start-up (``DBOS.launch()``, opening Procrastinate's pool, ...), reported apart
as ``startup_s``. The parent's probes end in ROLLBACK, so they add nothing to ``xact_commit``.

A latency run: fresh database -> ``schema`` child -> ``worker`` child started, left idle for
``IDLE_S`` -> ``starter`` child starts L chains one at a time, each after the previous one
completed and a pause. Latency = the contender's own completion timestamp (read from its
tables) - the starter's clock just before the start call; same machine, same clock.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from ..timing import summarize
from . import targets
from .child import PREFIX
from .contenders import Contender

ROOT = Path(__file__).resolve().parents[2]
PROBE_S = 0.02
IDLE_S = 1.0
PAUSE_S = 0.1
STEP_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 900.0


def python_for(contender: Contender) -> str:
    """The interpreter of a contender's children: this one, or
    ``SAYIIR_BENCH_PEERS_PYTHON_<FAMILY>`` (a separate virtualenv for a peer whose
    dependencies clash with ours)."""
    return os.environ.get(f"SAYIIR_BENCH_PEERS_PYTHON_{contender.family.upper()}", sys.executable)


class Child:
    """A child process of ``benchmarks.peers.child``, spoken to line by line."""

    def __init__(self, contender: Contender, spec: dict[str, Any]) -> None:
        env = dict(os.environ)
        # The library measured is the one of the tree the benchmark was started from.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.name = f"{contender.name}/{spec['role']}"
        self.process = subprocess.Popen(
            [python_for(contender), "-m", "benchmarks.peers.child", json.dumps(spec)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                self.messages.put(json.loads(line[len(PREFIX) :]))
        self.messages.put(None)

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.errors.append(line.rstrip())
            del self.errors[:-40]

    def expect(self, event: str, timeout: float = STEP_TIMEOUT_S) -> dict[str, Any]:
        try:
            message = self.messages.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise TimeoutError(f"{self.name}: no {event!r} after {timeout:.0f} s") from None
        if message is None or message["event"] != event:
            self.process.wait(timeout=30)
            tail = "\n".join(self.errors[-15:])
            raise RuntimeError(f"{self.name}: expected {event!r}, got {message!r}\n{tail}")
        return message

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60.0) -> None:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if code != 0:
            tail = "\n".join(self.errors[-15:])
            raise RuntimeError(f"{self.name}: exit code {code}\n{tail}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _spec(
    contender: Contender, target: targets.Target, kind: str, role: str, **more: Any
) -> dict[str, Any]:
    return {
        "module": contender.module,
        "target": target.spec(contender.name),
        "kind": kind,
        "role": role,
        "options": contender.options,
        **more,
    }


def _once(contender: Contender, spec: dict[str, Any]) -> dict[str, Any]:
    child = Child(contender, spec)
    try:
        message = child.expect("done")
        child.finish()
        return message
    finally:
        child.kill()


def ids_for(kind: str, count: int) -> list[str]:
    return [f"{kind}-{number:06d}" for number in range(count)]


def throughput(contender: Contender, db: str, kind: str, count: int) -> dict[str, Any]:
    """Drain ``count`` workflows of ``kind`` saved beforehand; the row of the run."""
    target = targets.fresh(db)
    try:
        _once(contender, _spec(contender, target, kind, "schema"))
        before_start = targets.counters(target)
        enqueued = _once(
            contender, _spec(contender, target, kind, "enqueue", ids=ids_for(kind, count))
        )
        before_run = targets.counters(target)
        loads = os.getloadavg()
        worker = Child(contender, _spec(contender, target, kind, "worker"))
        try:
            ready = worker.expect("ready")
            engine = sa.create_engine(target.probe_url(contender.name), poolclass=NullPool)
            count_sql = sa.text(contender.count_sql(db, kind))
            try:
                with engine.connect() as conn:
                    worker.send("go")
                    started = worker.expect("started")
                    deadline = time.monotonic() + RUN_TIMEOUT_S
                    while True:
                        done = conn.execute(count_sql).scalar_one()
                        seen = time.time()
                        conn.rollback()
                        if done >= count:
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"{contender.name}: {done}/{count} complete")
                        if worker.process.poll() is not None:
                            raise RuntimeError(f"{contender.name}: the worker died")
                        time.sleep(PROBE_S)
            finally:
                engine.dispose()
            worker.send("stop")
            finished = worker.expect("done")
            worker.finish()
        finally:
            worker.kill()
        after_run = targets.counters(target)
    finally:
        targets.drop(target)
    wall = max(seen - started["t0"], 1e-9)
    row: dict[str, Any] = {
        "contender": contender.name,
        "db": db,
        "kind": kind,
        "workflows": count,
        "wall_s": wall,
        "workflows_per_s": count / wall,
        "startup_s": started["startup_s"],
        # The same, the worker's start-up (connecting, launching) left out.
        "workflows_per_s_after_startup": count / max(wall - started["startup_s"], 1e-9),
        "cpu_s": finished["cpu_s"],
        "cpu_ms_per_workflow": finished["cpu_s"] * 1000 / count if count else None,
        "enqueue_s": enqueued["seconds"],
        "start_counters": targets.difference(before_run, before_start),
        "run_counters": targets.difference(after_run, before_run),
        "load_before": loads[0],
        "load_after": os.getloadavg()[0],
    }
    if ready.get("library"):
        row["library"] = ready["library"]
    return row


def latency(contender: Contender, db: str, count: int) -> dict[str, Any]:
    """Start ``count`` chains one at a time while the workers idle; the row of the run."""
    target = targets.fresh(db)
    try:
        _once(contender, _spec(contender, target, "latency", "schema"))
        worker = Child(contender, _spec(contender, target, "latency", "worker"))
        starter = Child(
            contender,
            _spec(
                contender,
                target,
                "latency",
                "starter",
                ids=ids_for("latency", count),
                probe_url=target.probe_url(contender.name),
                done_sql=contender.done_sql(db, "latency"),
                probe_s=PROBE_S / 4,
                pause_s=PAUSE_S,
                timeout_s=60.0,
            ),
        )
        try:
            worker.expect("ready")
            starter.expect("ready")
            worker.send("go")
            worker.expect("started")
            time.sleep(IDLE_S)
            starter.send("go")
            starts: dict[str, float] = starter.expect("done", RUN_TIMEOUT_S)["starts"]
            starter.finish()
            worker.send("stop")
            worker.expect("done")
            worker.finish()
        finally:
            starter.kill()
            worker.kill()
        engine = sa.create_engine(target.probe_url(contender.name), poolclass=NullPool)
        try:
            with engine.connect() as conn:
                completed = {
                    str(instance_id): float(at)
                    for instance_id, at in conn.execute(sa.text(contender.times_sql(db, "latency")))
                }
        finally:
            engine.dispose()
    finally:
        targets.drop(target)
    latencies = [completed[key] - started for key, started in starts.items() if key in completed]
    return {
        "contender": contender.name,
        "db": db,
        "kind": "latency",
        "workflows": count,
        "completed": len(latencies),
        "latency": summarize(latencies),
        "latencies_ms": [round(value * 1000, 2) for value in latencies],
    }
