"""Tools for ``test_endpoints.py``, loaded with ``KEEL_TOOLS=endpoint_tools:TOOLS``: a read tool that records
each run, and a write tool whose effect is one entry in a list."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from keel.orchestration.tools import tool

LOOKUPS: list[str] = []
TICKETS: list[str] = []


class LookupArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sku: str = Field(min_length=1)
    qty: int = Field(1, ge=1)


@tool
async def lookup(args: LookupArgs) -> dict[str, Any]:
    """Price of a product."""
    LOOKUPS.append(args.sku)
    return {"sku": args.sku, "qty": args.qty, "price": 12 * args.qty}


class TicketArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1)


@tool(effect="write")
async def create_ticket(args: TicketArgs) -> dict[str, Any]:
    """Open a ticket."""
    TICKETS.append(args.title)
    return {"ticket": len(TICKETS), "title": args.title}


TOOLS = [lookup, create_ticket]
