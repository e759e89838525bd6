"""The contract's tests of the trace context: written when a run begins, kept by every later
write, returned with every task handed out."""

from __future__ import annotations

import dataclasses

import pytest

from ...backend import PersistentBackend
from ...errors import InvalidInputError
from ...model import AtTask, IfExists, SignalKind, TaskCompletion, WorkflowSnapshot
from ..builders import LONG_TTL, WORKER, apply_signal, make_snapshot, offered_tasks
from .base import ContractBase
from .completions import chain, done

FIRST = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SECOND = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def traced(instance_id: str, trace_context: str | None = FIRST) -> WorkflowSnapshot:
    """A new workflow at ``AtTask("t1")`` carrying ``trace_context``."""
    return dataclasses.replace(make_snapshot(instance_id), trace_context=trace_context)


class TraceContextContract(ContractBase):
    """``WorkflowSnapshot.trace_context``: stored by the write that begins a run, kept by
    every later one, handed out with the workflow's tasks.

    Checks docs/contract.md, section "Trace context" (``#trace-context``).
    """

    @pytest.mark.parametrize("via", ["start_workflow", "save_snapshot"])
    def test_trace_context_is_stored_by_the_write_that_creates_the_workflow(
        self, backend: PersistentBackend, via: str
    ) -> None:
        if via == "start_workflow":
            backend.start_workflow(traced("wf"))
        else:
            backend.save_snapshot(traced("wf"))
        backend.save_snapshot(traced("plain", None))

        assert backend.load_snapshot("wf").trace_context == FIRST
        assert backend.load_snapshot("plain").trace_context is None

    @pytest.mark.parametrize("via", ["find", "claim"])
    def test_trace_context_comes_with_every_task_handed_out(
        self, backend: PersistentBackend, via: str
    ) -> None:
        backend.save_snapshot(traced("wf"))
        backend.save_snapshot(traced("plain", None))

        offered = {task.instance_id: task.trace_context for task in offered_tasks(backend, via)}

        assert offered == {"wf": FIRST, "plain": None}

    def test_trace_context_comes_with_next_claims_of_complete_tasks(
        self, backend: PersistentBackend
    ) -> None:
        backend.save_snapshot(traced("wf"))
        claim = backend.claim_task("wf", "t1", WORKER, ttl=LONG_TTL)
        assert claim is not None

        [result] = backend.complete_tasks(
            [done(claim, advance=chain("t1", "t2"))], ttl=LONG_TTL, claim_next=1
        )

        assert [(n.task.task_id, n.task.trace_context) for n in result.next_tasks] == [
            ("t2", FIRST)
        ]

    def test_later_saves_keep_the_trace_context_whatever_they_carry(
        self, backend: PersistentBackend
    ) -> None:
        backend.save_snapshot(traced("wf"))
        for index, carried in enumerate((SECOND, None), start=1):
            snapshot = backend.load_snapshot("wf")
            snapshot.mark_task_completed(f"t{index}", b"r")
            snapshot.move_to(AtTask(f"t{index + 1}"))
            snapshot.trace_context = carried
            backend.save_snapshot(snapshot, expected_version=snapshot.version)
            assert backend.load_snapshot("wf").trace_context == FIRST

        claim = backend.claim_task("wf", "t3", WORKER, ttl=LONG_TTL)
        fenced = backend.load_snapshot("wf")
        fenced.trace_context = SECOND
        assert claim is not None
        assert backend.save_snapshot_fenced(fenced, "t3", WORKER, token=claim.token)
        assert backend.load_snapshot("wf").trace_context == FIRST

    def test_completions_signals_and_retries_keep_the_trace_context(
        self, backend: PersistentBackend
    ) -> None:
        backend.save_snapshot(traced("wf"))
        claim = backend.claim_task("wf", "t1", WORKER, ttl=LONG_TTL)
        assert claim is not None
        backend.complete_tasks([done(claim, advance=chain("t1", "t2"))], ttl=LONG_TTL)
        apply_signal(backend, "wf", SignalKind.PAUSE)
        assert backend.unpause("wf").trace_context == FIRST

        claim = backend.claim_task("wf", "t2", WORKER, ttl=LONG_TTL)
        assert claim is not None
        failure = TaskCompletion("wf", "t2", WORKER, claim.token, error="boom")
        backend.complete_tasks([failure], ttl=LONG_TTL)
        retried = backend.retry_workflow("wf")

        assert retried.trace_context == FIRST
        assert backend.load_snapshot("wf").trace_context == FIRST

    def test_a_new_run_replaces_the_trace_context_an_existing_one_keeps_it(
        self, backend: PersistentBackend
    ) -> None:
        backend.start_workflow(traced("wf"))

        used = backend.start_workflow(traced("wf", SECOND), if_exists=IfExists.USE_EXISTING)
        assert used.trace_context == FIRST

        replaced = backend.start_workflow(
            traced("wf", SECOND), if_exists=IfExists.TERMINATE_EXISTING
        )
        assert replaced.trace_context == SECOND
        assert backend.load_snapshot("wf").trace_context == SECOND

        backend.start_workflow(traced("wf", None), if_exists=IfExists.TERMINATE_EXISTING)
        assert backend.load_snapshot("wf").trace_context is None

    def test_a_keyed_save_repeated_with_another_trace_context_is_the_same_save(
        self, backend: PersistentBackend
    ) -> None:
        snapshot = traced("wf")
        first = backend.save_snapshot(snapshot, write_id="w1")

        repeat = dataclasses.replace(snapshot, trace_context=SECOND)
        again = backend.save_snapshot(repeat, write_id="w1")

        assert again == first
        assert backend.load_snapshot("wf").trace_context == FIRST

    @pytest.mark.parametrize(
        "bad",
        [
            "not a traceparent",
            FIRST.upper(),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            FIRST + "-extra",
            b"00",
        ],
    )
    def test_a_bad_trace_context_is_refused_and_nothing_is_stored(
        self, backend: PersistentBackend, bad: object
    ) -> None:
        snapshot = traced("wf")
        snapshot.trace_context = bad  # type: ignore[assignment]

        with pytest.raises(InvalidInputError, match=r"snapshot\.trace_context"):
            backend.start_workflow(snapshot)
        with pytest.raises(InvalidInputError, match=r"snapshot\.trace_context"):
            backend.save_snapshot(snapshot)

        assert backend.list_snapshots() == []
