"""Node implementations of the ``order-pipeline`` example.

An order is validated, then four things happen in parallel: stock is
checked, a fraud score computed, shipping quoted, and each order line priced
(a dynamic fan-out). ``decide`` joins them; a risky order goes to manual
review, a safe one is charged (with a retry and a fallback), and ``notify``
runs after whichever branch was taken.

Every node is deterministic in its input, so a distributed run can be
compared with an in-memory run of the same order. ``dependencies["latency"]``
(seconds, default 0.05) makes each node take a moment, like real I/O.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from ..nodes.base import NodeContext

PRICES = {"widget": 4.5, "gadget": 12.0, "gizmo": 30.0, "doohickey": 2.25}


async def _io(ctx: NodeContext) -> None:
    await asyncio.sleep(float(ctx.dependencies.get("latency", 0.05)))


async def validate(ctx: NodeContext) -> dict[str, Any]:
    order = ctx.input or {}
    lines = order.get("lines") or []
    if not order.get("id") or not lines:
        raise ValueError("an order needs an 'id' and at least one line")
    for line in lines:
        if line.get("sku") not in PRICES:
            raise ValueError(f"unknown sku {line.get('sku')!r}")
    await _io(ctx)
    return {"id": order["id"], "customer": order.get("customer", "anonymous"), "lines": lines,
            "country": order.get("country", "DE")}


async def check_inventory(ctx: NodeContext) -> dict[str, Any]:
    await _io(ctx)
    quantity = sum(int(line.get("qty", 1)) for line in ctx.input["lines"])
    return {"inStock": quantity <= 20, "units": quantity}


async def score_fraud(ctx: NodeContext) -> float:
    await _io(ctx)
    digest = hashlib.sha256(f"{ctx.input['customer']}:{ctx.input['id']}".encode()).digest()
    return round(digest[0] / 255, 3)


async def quote_shipping(ctx: NodeContext) -> dict[str, Any]:
    await _io(ctx)
    return {"carrier": "DHL" if ctx.input["country"] == "DE" else "UPS",
            "cost": 4.99 if ctx.input["country"] == "DE" else 14.99}


async def price_line(ctx: NodeContext) -> dict[str, Any]:
    await _io(ctx)
    line = ctx.input
    return {"sku": line["sku"], "total": round(PRICES[line["sku"]] * int(line.get("qty", 1)), 2)}


async def decide(ctx: NodeContext) -> dict[str, Any]:
    subtotal = round(sum(line["total"] for line in ctx.input["lines"]), 2)
    return {
        "risk": ctx.input["risk"],
        "inStock": ctx.input["stock"]["inStock"],
        "amount": round(subtotal + ctx.input["shipping"]["cost"], 2),
    }


async def manual_review(ctx: NodeContext) -> dict[str, Any]:
    await _io(ctx)
    return {"outcome": "queued for review", "amount": ctx.input["amount"]}


async def charge(ctx: NodeContext) -> dict[str, Any]:
    await _io(ctx)
    # ctx.idempotency_key keeps a retried or redelivered charge from charging twice.
    return {"outcome": "charged", "amount": ctx.input["amount"], "reference": ctx.idempotency_key}


async def charge_later(ctx: NodeContext) -> dict[str, Any]:
    return {"outcome": "charge scheduled", "amount": ctx.input["amount"]}


async def notify(ctx: NodeContext) -> str:
    outcome = ctx.input or {}
    if isinstance(outcome, dict) and len(outcome) == 1:
        outcome = next(iter(outcome.values()))
    await _io(ctx)
    return f"customer notified: {outcome.get('outcome')} ({outcome.get('amount')} EUR)"


registry: dict[str, Any] = {
    "orders.validate": validate,
    "orders.check_inventory": check_inventory,
    "orders.score_fraud": score_fraud,
    "orders.quote_shipping": quote_shipping,
    "orders.price_line": price_line,
    "orders.decide": decide,
    "orders.manual_review": manual_review,
    "orders.charge": charge,
    "orders.charge_later": charge_later,
    "orders.notify": notify,
}


def sample_orders(count: int) -> list[dict[str, Any]]:
    """Deterministic sample orders; some are risky, some are large."""
    skus = list(PRICES)
    orders = []
    for i in range(count):
        lines = [{"sku": skus[(i + j) % len(skus)], "qty": 1 + (i * 7 + j) % 5}
                 for j in range(1 + i % 4)]
        orders.append({"id": f"ord-{1000 + i}", "customer": f"customer-{i % 13}",
                       "country": "DE" if i % 3 else "FR", "lines": lines})
    return orders
