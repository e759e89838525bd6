"""The demo's order pipeline: its definition and its four tasks, small, realistic, passing
JSON along (each output carries its execution id and the execution ids it consumed)."""

from __future__ import annotations

import json
import random
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any

from ..worker import Pipeline, TaskContext, TaskFunction
from .executions import Recorder

DEFINITION_HASH = "sayiir-demo/order-v1"
DEMO_TAG = "sayiir-demo"
ORDER_PIPELINE = Pipeline("validate", ("reserve_stock", "charge_payment"), "ship")


# The tasks whose output each task consumes (the lineage check follows these links).
CONSUMES = {
    "validate": (),
    "reserve_stock": ("validate",),
    "charge_payment": ("validate",),
    "ship": ("reserve_stock", "charge_payment"),
}


def run_tags(run_id: str) -> tuple[str, ...]:
    return (DEMO_TAG, f"{DEMO_TAG}-{run_id}")


def load_json(payload: bytes | None) -> dict[str, Any]:
    assert payload is not None
    loaded: dict[str, Any] = json.loads(payload)
    return loaded


def _validate(ctx: TaskContext) -> dict[str, Any]:
    order = load_json(ctx.input)
    total = sum(line["qty"] * line["unit_cents"] for line in order["lines"])
    return {
        "order_id": order["order_id"],
        "customer": order["customer"],
        "skus": [line["sku"] for line in order["lines"]],
        "total_cents": total,
        "consumed": {},
    }


def _reserve_stock(ctx: TaskContext) -> dict[str, Any]:
    validated = load_json(ctx.input)
    return {
        "reservation_id": f"RSV-{uuid.uuid4().hex[:10].upper()}",
        "skus": validated["skus"],
        "consumed": {"validate": validated["execution"]},
    }


def _charge_payment(ctx: TaskContext) -> dict[str, Any]:
    validated = load_json(ctx.input)
    return {
        "payment_id": f"PAY-{uuid.uuid4().hex[:10].upper()}",
        "amount_cents": validated["total_cents"],
        "consumed": {"validate": validated["execution"]},
    }


def _ship(ctx: TaskContext) -> dict[str, Any]:
    # After a join the input is the output of whichever branch finished last; read both.
    reservation = load_json(ctx.result_of("reserve_stock"))
    payment = load_json(ctx.result_of("charge_payment"))
    return {
        "tracking_number": f"1Z{random.randrange(10**12):012d}",
        "reservation_id": reservation["reservation_id"],
        "payment_id": payment["payment_id"],
        "consumed": {
            "reserve_stock": reservation["execution"],
            "charge_payment": payment["execution"],
        },
    }


class GatewayTimeout(ConnectionError):
    """The payment gateway did not answer (``--flaky``): retried by the worker's policy."""


def fails_first_payment(instance_id: str, flaky: float) -> bool:
    """Whether this order's first payment attempt fails (the same answer in every process)."""
    return zlib.crc32(instance_id.encode()) % 1000 < flaky * 1000


def order_handlers(recorder: Recorder, *, flaky: float = 0.0) -> dict[str, TaskFunction]:
    """The task functions; ``flaky``: the fraction of orders whose first payment fails."""
    steps: dict[str, Callable[[TaskContext], dict[str, Any]]] = {
        "validate": _validate,
        "reserve_stock": _reserve_stock,
        "charge_payment": _charge_payment,
        "ship": _ship,
    }

    def task(step: Callable[[TaskContext], dict[str, Any]]) -> TaskFunction:
        def run(ctx: TaskContext) -> bytes:
            recorder.started(ctx)
            time.sleep(random.uniform(0.010, 0.060))  # the "real work"
            if (
                ctx.task_id == "charge_payment"
                and ctx.claim.attempt == 1
                and fails_first_payment(ctx.instance_id, flaky)
            ):
                raise GatewayTimeout("payment gateway timed out")
            body = step(ctx)
            body["execution"] = ctx.execution_id
            return json.dumps(body).encode()

        return run

    return {task_id: task(step) for task_id, step in steps.items()}


def new_order(run_id: str, number: int) -> tuple[str, bytes]:
    instance_id = f"order-{run_id}-{number:05d}"
    lines = [
        {
            "sku": f"SKU-{random.randrange(1000, 9999)}",
            "qty": random.randint(1, 3),
            "unit_cents": random.randrange(199, 9999),
        }
        for _ in range(random.randint(1, 4))
    ]
    order = {
        "order_id": instance_id,
        "customer": f"customer-{random.randrange(500)}",
        "lines": lines,
    }
    return instance_id, json.dumps(order).encode()
