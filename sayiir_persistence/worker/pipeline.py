"""``Pipeline``: a workflow shape of steps run in order, a step one task or a fork of tasks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from ..model import AtFork, AtTask, Position, WorkflowSnapshot, WorkflowStatus


@dataclass(frozen=True, init=False)
class Pipeline:
    """A workflow shape: steps run in order; a step is a task id, or a tuple of task ids that
    run in parallel (a fork) and are all joined before the next step.

    ``Pipeline("validate", ("reserve", "charge"), "ship")`` is an :data:`Advance` (call it
    with a snapshot) and makes new snapshots with :meth:`start`. The workflow completes with
    the output of the last task completed in the last step.

    The task after a fork receives the output of the branch that finished last as its
    input (see ``AvailableTask.input``); read the others with :meth:`TaskContext.result_of`.
    """

    steps: tuple[str | tuple[str, ...], ...]

    def __init__(self, *steps: str | tuple[str, ...]) -> None:
        if not steps:
            raise ValueError("a Pipeline needs at least one step")
        seen: set[str] = set()
        for step in steps:
            task_ids = (step,) if isinstance(step, str) else step
            if not task_ids or any(not isinstance(t, str) for t in task_ids):
                raise ValueError(f"a step is a task id or a non-empty tuple of them: {step!r}")
            if seen & set(task_ids) or len(set(task_ids)) != len(task_ids):
                raise ValueError(f"task ids must be unique in a Pipeline: {step!r}")
            seen.update(task_ids)
        object.__setattr__(self, "steps", tuple(steps))

    def position_of(self, index: int) -> Position:
        """The position that runs step ``index``."""
        step = self.steps[index]
        if isinstance(step, str):
            return AtTask(step)
        return AtFork(f"step-{index}", step)

    def start(
        self,
        instance_id: str,
        definition_hash: str,
        *,
        initial_input: bytes | None = None,
        priority: int = 3,
        tags: Iterable[str] = (),
        deadline: datetime | None = None,
    ) -> WorkflowSnapshot:
        """A new snapshot positioned at the first step (start it with
        ``backend.start_workflow``); ``deadline``: the workflow-level timeout."""
        snapshot = WorkflowSnapshot.new(
            instance_id,
            definition_hash,
            initial_input=initial_input,
            priority=priority,
            tags=frozenset(tags),
            deadline=deadline,
        )
        snapshot.move_to(self.position_of(0))
        return snapshot

    def __call__(self, snapshot: WorkflowSnapshot) -> None:
        """Advance ``snapshot`` if every task of its current step is completed."""
        index = self._current_step(snapshot.position)
        if index is None or snapshot.status is not WorkflowStatus.IN_PROGRESS:
            return
        step = self.steps[index]
        task_ids = (step,) if isinstance(step, str) else step
        if not all(task_id in snapshot.completed_tasks for task_id in task_ids):
            return  # a sibling branch is still running; whoever finishes last moves on
        if index + 1 < len(self.steps):
            snapshot.move_to(self.position_of(index + 1))
        else:
            last = snapshot.last_completed_task_id
            assert last is not None  # a task of this step just completed
            snapshot.mark_completed(snapshot.completed_tasks[last])

    def _current_step(self, position: Position) -> int | None:
        for index in range(len(self.steps)):
            if self.position_of(index) == position:
                return index
        return None
