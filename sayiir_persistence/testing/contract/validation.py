"""The contract's input tests: bad arguments refused whole with ``InvalidInputError``, odd but
valid ids and payloads stored verbatim, hostile ids executed never."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from ...backend import PersistentBackend
from ...errors import InvalidInputError, NotFoundError
from ...model import (
    AtFork,
    AtTask,
    IfExists,
    SignalKind,
    SignalRequest,
    WorkflowSnapshot,
    WorkflowStatus,
)
from ..builders import (
    AWKWARD_IDS,
    LONG_TTL,
    LONGEST_ID,
    OTHER,
    WORKER,
    save_at,
    save_new,
    task_pairs,
)
from ..cases import (
    HOSTILE_IDS,
    INVALID_CALLS,
    WRONG_ARGUMENTS,
    WRONG_SNAPSHOT_FIELDS,
    InvalidCall,
    valid_arguments,
    wrong_values,
)
from ..clocks import ContractClock
from .base import ContractBase


class InputValidationContract(ContractBase):
    """Input validation: every bad argument and snapshot field refused (naming it) before any
    write; longest, awkward and hostile ids and largest payloads stored verbatim.

    Checks docs/contract.md, section "Input validation" (``#input-validation``), and the id and
    payload rules of section "General rules" (``#general-rules``).
    """

    # -- bad arguments ----------------------------------------------------------------------

    @pytest.mark.parametrize(("call", "argument"), INVALID_CALLS)
    def test_invalid_argument_raises_invalid_input_naming_it_and_stores_nothing(
        self, backend: PersistentBackend, call: InvalidCall, argument: str
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        with pytest.raises(InvalidInputError, match=argument):
            call(backend)
        self.assert_untouched(backend, before)
        with pytest.raises(NotFoundError):
            backend.load_snapshot("ghost")

    def test_longest_id_with_special_characters_round_trips(
        self, backend: PersistentBackend
    ) -> None:
        assert len(LONGEST_ID) == 255
        name = LONGEST_ID
        snapshot = WorkflowSnapshot.new(name, name, first_task=name, tags=[name])
        backend.save_snapshot(snapshot)
        assert backend.list_snapshots() == [name]
        assert backend.load_snapshot(name).position == AtTask(name)
        [task] = backend.find_available_tasks(name, 1, tags=[name])
        assert (task.instance_id, task.task_id, task.definition_hash) == (name, name, name)
        claim = backend.claim_task(name, name, name, LONG_TTL)
        assert claim is not None
        assert (claim.instance_id, claim.task_id, claim.worker_id) == (name, name, name)
        backend.release_task_claim(name, name, name, token=claim.token)
        backend.save_task_result(name, name, b"out")
        assert backend.load_task_result(name, name) == b"out"
        backend.send_event(name, name, b"ev")
        assert backend.consume_event(name, name) == b"ev"
        backend.delete_snapshot(name)
        assert backend.list_snapshots() == []

    def test_ids_differing_only_in_case_space_or_normalization_are_distinct(
        self, backend: PersistentBackend
    ) -> None:
        for index, instance_id in enumerate(AWKWARD_IDS):
            save_new(backend, instance_id, first_task=f"t{index}")
        for index, instance_id in enumerate(AWKWARD_IDS):
            assert backend.load_snapshot(instance_id).position == AtTask(f"t{index}")
        backend.delete_snapshot("a")
        assert backend.load_snapshot("A").position == AtTask(f"t{AWKWARD_IDS.index('A')}")
        assert len(backend.list_snapshots()) == len(AWKWARD_IDS) - 1

    def test_payloads_round_trip_byte_for_byte(self, backend: PersistentBackend) -> None:
        largest = bytes(range(256)) * (backend.max_payload_bytes // 256) + b"\x00" * (
            backend.max_payload_bytes % 256
        )
        assert len(largest) == backend.max_payload_bytes
        save_at(backend, "wf", AtFork("f", ("empty", "binary", "largest")), initial_input=b"")
        for task_id, payload in (
            ("empty", b""),
            ("binary", bytes(range(256))),
            ("largest", largest),
        ):
            backend.save_task_result("wf", task_id, payload)
            assert backend.load_task_result("wf", task_id) == payload
        assert backend.load_snapshot("wf").initial_input == b""
        backend.send_event("wf", "ev", largest)
        assert backend.consume_event("wf", "ev") == largest

    # -- hostile input: stored verbatim, or refused whole with InvalidInputError ------------

    @pytest.mark.parametrize(("method", "argument"), WRONG_ARGUMENTS)
    def test_wrong_type_or_range_of_any_argument_is_refused_naming_it(
        self, backend: PersistentBackend, method: str, argument: str
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        for wrong in wrong_values(method, argument):
            arguments = {**valid_arguments(method), argument: wrong}
            with pytest.raises(InvalidInputError, match=argument):
                getattr(backend, method)(**arguments)
        self.assert_untouched(backend, before)

    @pytest.mark.parametrize(("field", "value"), WRONG_SNAPSHOT_FIELDS)
    def test_wrong_snapshot_field_is_refused_naming_it(
        self, backend: PersistentBackend, field: str, value: Any
    ) -> None:
        save_new(backend, "existing")
        before = backend.load_snapshot("existing")
        for call in ("save", "fenced", "start"):
            snapshot = dataclasses.replace(backend.load_snapshot("existing"))
            if call == "start":
                snapshot.version = 0  # a new snapshot, but for the field under test
            setattr(snapshot, field, value)
            with pytest.raises(InvalidInputError, match=field):
                if call == "fenced":
                    backend.save_snapshot_fenced(snapshot, "t1", WORKER)
                elif call == "start":
                    backend.start_workflow(snapshot, if_exists=IfExists.TERMINATE_EXISTING)
                else:
                    backend.save_snapshot(snapshot)
        self.assert_untouched(backend, before)

    @pytest.mark.parametrize("hostile", HOSTILE_IDS)
    def test_hostile_ids_are_stored_verbatim_through_every_call(
        self, backend: PersistentBackend, hostile: str
    ) -> None:
        save_new(backend, "bystander")
        branch = f"{hostile}-branch"
        snapshot = WorkflowSnapshot.new(hostile, hostile, first_task=None, tags=[hostile])
        snapshot.move_to(AtFork(hostile, (hostile, branch)))
        backend.save_snapshot(snapshot)
        assert backend.list_snapshots() == sorted(["bystander", hostile])
        assert backend.list_snapshots(after=hostile) == [
            i for i in sorted(["bystander", hostile]) if i > hostile
        ]
        loaded = backend.load_snapshot(hostile)
        assert (loaded.instance_id, loaded.definition_hash, loaded.tags) == (
            hostile,
            hostile,
            frozenset({hostile}),
        )
        # Tagged with the hostile id: only a worker with that very tag gets its tasks.
        assert task_pairs(backend.find_available_tasks(hostile, 10, tags=["other"])) == [
            ("bystander", "t1")
        ]
        offered = backend.find_available_tasks(hostile, 10, tags=[hostile])
        assert sorted(task_pairs(offered)) == sorted(
            [(hostile, hostile), (hostile, branch), ("bystander", "t1")]
        )
        claim = backend.claim_task(hostile, hostile, hostile, LONG_TTL)
        assert claim is not None
        assert (claim.instance_id, claim.task_id, claim.worker_id) == (hostile, hostile, hostile)
        assert backend.claim_task(hostile, hostile, "rival", LONG_TTL) is None
        backend.extend_task_claim(hostile, hostile, hostile, LONG_TTL, token=claim.token)
        assert backend.save_snapshot_fenced(
            backend.load_snapshot(hostile), hostile, hostile, token=claim.token
        )
        backend.save_task_result(hostile, hostile, hostile.encode())
        backend.release_task_claim(hostile, hostile, hostile, token=claim.token)
        assert backend.load_task_result(hostile, hostile) == hostile.encode()
        [claimed] = backend.claim_available_tasks(hostile, 1, LONG_TTL, tags=[hostile, "x"])
        assert claimed.task.instance_id in (hostile, "bystander")
        backend.send_event(hostile, hostile, hostile.encode())
        assert backend.consume_event(hostile, hostile) == hostile.encode()
        backend.store_signal(hostile, SignalKind.PAUSE, SignalRequest(hostile, hostile))
        request = backend.get_signal(hostile, SignalKind.PAUSE)
        assert request is not None and (request.reason, request.requested_by) == (hostile, hostile)
        assert backend.check_and_pause(hostile)
        assert backend.unpause(hostile).status is WorkflowStatus.IN_PROGRESS
        backend.delete_snapshot(hostile)
        # Nothing was executed as SQL: the bystander and every table are still there.
        assert backend.list_snapshots() == ["bystander"]
        assert backend.load_snapshot("bystander").position == AtTask("t1")
        with pytest.raises(NotFoundError):
            backend.load_snapshot(hostile)

    def test_payload_of_50_mb_is_refused_whole_or_stored_whole(
        self, backend: PersistentBackend
    ) -> None:
        save_at(backend, "existing", AtTask("t1"))
        before = backend.load_snapshot("existing")
        huge = bytes(range(256)) * (50 * 1024 * 1024 // 256)
        if len(huge) <= backend.max_payload_bytes:  # a backend configured for it stores it
            backend.save_task_result("existing", "t1", huge)
            assert backend.load_task_result("existing", "t1") == huge
            return
        big_input = dataclasses.replace(before, initial_input=huge)
        for name, call in (
            ("output", lambda: backend.save_task_result("existing", "t1", huge)),
            ("payload", lambda: backend.send_event("existing", "e", huge)),
            ("initial_input", lambda: backend.save_snapshot(big_input)),
            (
                "completed_tasks",
                lambda: backend.save_snapshot(
                    dataclasses.replace(before, completed_tasks={"t0": huge})
                ),
            ),
        ):
            with pytest.raises(InvalidInputError, match=name):
                call()
        self.assert_untouched(backend, before)

    def test_longest_ttl_is_kept_and_a_longer_one_refused(
        self, backend: PersistentBackend, clock: ContractClock
    ) -> None:
        save_new(backend, "wf")
        longest = timedelta(days=365 * 100)
        claim = backend.claim_task("wf", "t1", WORKER, longest)
        assert claim is not None and claim.expires_at is not None
        self.assert_now(clock, claim.expires_at - longest)
        with pytest.raises(InvalidInputError, match="ttl"):
            backend.extend_task_claim("wf", "t1", WORKER, longest + timedelta(microseconds=1))
        assert backend.claim_task("wf", "t1", OTHER, LONG_TTL) is None
