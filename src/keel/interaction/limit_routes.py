"""The operator's API of per-tenant limits: read what applies to a tenant and where it stands, set its own, forget
them. Setting limits, and reading another tenant's, needs a key with ``operator`` (:mod:`keel.scopes`): a tenant's
own admin may read its limits and usage, never lift them."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Annotated

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from keel.errors import Forbidden
from keel.interaction.auth import Admin, Operator
from keel.interaction.deps import App, errors, problem
from keel.interaction.schemas import RequestBody
from keel.memory.limits import TenantLimits
from keel.memory.types import ApiKey
from keel.scopes import OPERATOR, holds
from keel.service import LimitsView

router = APIRouter(prefix="/v1")
TAGS: list[str | Enum] = ["admin"]
Tenant = Annotated[
    str,
    Path(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$", description="The tenant, as its keys name it."),
]


class Limits(RequestBody):
    """A tenant's limits. Each is optional: unset (null) takes the server's default (`KEEL_LIMIT_*`)."""

    # Bounded above so that every value fits a 64-bit column and means something (a 500 from an overflowing
    # INTEGER is what a huge Last-Event-ID once gave).
    rate_per_s: float | None = Field(
        None, gt=0, le=1e9, description="Requests per second (token bucket); over it: 429 with Retry-After."
    )
    burst: int | None = Field(None, ge=1, le=10**9, description="The bucket's size (default: the rate, at least 1).")
    max_tasks: int | None = Field(None, ge=1, le=10**9, description="Tasks queued or running at once; beyond: 429.")
    daily_cost_usd: float | None = Field(None, ge=0, le=1e12, description="Model spend per UTC day; once spent: 429.")
    monthly_cost_usd: float | None = Field(
        None, ge=0, le=1e12, description="Model spend per UTC month; once spent: 429."
    )

    @classmethod
    def of(cls, limits: TenantLimits) -> Limits:
        return cls.model_validate(dataclasses.asdict(limits))

    def limits(self) -> TenantLimits:
        return TenantLimits(**self.model_dump())


class Usage(BaseModel):
    active_tasks: int = Field(description="Tasks queued or running now.")
    cost_today_usd: float = Field(description="Model spend this UTC day.")
    cost_month_usd: float = Field(description="Model spend this UTC month.")


class TenantLimitsView(BaseModel):
    tenant: str
    limits: Limits = Field(description="The tenant's own limits, as last set.")
    defaults: Limits = Field(description="The server's defaults (`KEEL_LIMIT_*`).")
    effective: Limits = Field(description="What applies: the tenant's own over the defaults.")
    usage: Usage


def _may_read(key: ApiKey, tenant: str) -> None:
    """Refuses (403) another tenant's limits and usage to a key without ``operator``."""
    if tenant != key.tenant and not holds(key.scopes, OPERATOR):
        raise Forbidden(f"another tenant's limits need the scope {OPERATOR!r}")


def _view(v: LimitsView) -> TenantLimitsView:
    return TenantLimitsView(
        tenant=v.tenant,
        limits=Limits.of(v.own),
        defaults=Limits.of(v.defaults),
        effective=Limits.of(v.effective),
        usage=Usage(active_tasks=v.active_tasks, cost_today_usd=v.cost_today_usd, cost_month_usd=v.cost_month_usd),
    )


@router.get(
    "/tenants/{tenant}/limits",
    response_model=TenantLimitsView,
    responses=errors(),
    summary="A tenant's limits",
    operation_id="getTenantLimits",
    tags=TAGS,
)
async def get_limits(tenant: Tenant, keel: App, key: Admin) -> TenantLimitsView:
    """The tenant's own limits, the defaults, what applies, and its usage against them. Needs `admin`, and for
    another tenant's, `operator` too."""
    _may_read(key, tenant)
    return _view(await keel.limits_view(tenant))


@router.put(
    "/tenants/{tenant}/limits",
    response_model=TenantLimitsView,
    responses={**errors(), 422: problem("Invalid limits")},
    summary="Set a tenant's limits",
    operation_id="setTenantLimits",
    tags=TAGS,
)
async def set_limits(tenant: Tenant, body: Limits, keel: App, key: Operator) -> TenantLimitsView:
    """Replace the tenant's own limits (a field left out takes the default). Every replica applies them within a
    second. Needs `operator`: a tenant's own admin cannot lift its limits."""
    return _view(await keel.set_limits(tenant, body.limits()))


@router.delete(
    "/tenants/{tenant}/limits",
    response_model=TenantLimitsView,
    responses=errors(),
    summary="Forget a tenant's limits",
    operation_id="deleteTenantLimits",
    tags=TAGS,
)
async def delete_limits(tenant: Tenant, keel: App, key: Operator) -> TenantLimitsView:
    """The tenant's own limits are forgotten: the defaults apply again. Needs `operator`."""
    return _view(await keel.set_limits(tenant, TenantLimits()))
