"""``/v1/keys``: a tenant's admin manages its own API keys over HTTP, through the same :class:`keel.service.Keys`
operations as ``keel keys`` (create with an expiry, list, revoke, rotate). Another tenant's keys do not exist
here, and a key holding a scope the asking key lacks (``operator``) is not its to make, revoke or rotate; an
operator manages every tenant's with the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter
from pydantic import AwareDatetime, BaseModel, Field, field_validator

from keel.interaction.auth import Admin
from keel.interaction.deps import App, errors, problem
from keel.interaction.schemas import RequestBody
from keel.memory.types import KeyRecord
from keel.scopes import SCOPES

router = APIRouter(prefix="/v1", tags=["keys"])
ERRORS = errors("No such key for this tenant")


class KeyView(BaseModel):
    """A key as listing shows it: never its secret, which is shown once, when it is made."""

    id: str = Field(description="The key's id: the part after `keel_` in the key itself.")
    tenant: str
    scopes: list[str]
    state: str = Field(description="`active`, `revoked` or `expired`.")
    created_at: float
    expires_at: float | None = Field(description="When the key stops working (null: never).")
    revoked_at: float | None
    last_used_at: float | None = Field(description="Its last use, accurate to a minute (null: never used).")

    @classmethod
    def of(cls, key: KeyRecord, now: float) -> KeyView:
        return cls(**key.public(now))


class NewKey(KeyView):
    key: str = Field(description="The key itself, `keel_<id>_<secret>`: shown only in this answer.")


class CreateKey(RequestBody):
    scopes: Annotated[list[str], Field(min_length=1, description="What the key may do (see the security scheme).")]
    # JSON has no datetime: the RFC 3339 string is parsed (the one field not strict), and must carry its zone.
    expires_at: AwareDatetime | None = Field(
        None, strict=False, description="When it stops working (RFC 3339 with a zone; null: never)."
    )

    @field_validator("scopes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - SCOPES)
        if unknown:
            raise ValueError(f"unknown scopes {unknown}; choose from {sorted(SCOPES)}")
        return v


class RotateKey(RequestBody):
    grace_s: float = Field(
        0.0, ge=0, le=90 * 86400, description="Keep the old key working this many seconds (0: revoked at once)."
    )


def _timestamp(when: datetime | None) -> float | None:
    return when.timestamp() if when is not None else None


@router.get("/keys", response_model=list[KeyView], responses=errors(), summary="List API keys", operation_id="listKeys")
async def list_keys(keel: App, key: Admin) -> list[KeyView]:
    """Every key of this tenant, revoked and expired ones too, oldest first."""
    now = keel.clock()
    return [KeyView.of(k, now) for k in await keel.keys.list(key.tenant)]


@router.post(
    "/keys",
    response_model=NewKey,
    status_code=201,
    responses={**errors(), 422: problem("Unknown scopes, or an expiry in the past")},
    summary="Create an API key",
    operation_id="createKey",
)
async def create_key(body: CreateKey, keel: App, key: Admin) -> NewKey:
    """A new key of this tenant. The answer is the only place its secret ever appears."""
    scopes = frozenset(body.scopes)
    record, plaintext = await keel.keys.create(
        key.tenant, scopes, expires_at=_timestamp(body.expires_at), by=key.scopes
    )
    return NewKey(**record.public(keel.clock()), key=plaintext)


@router.post(
    "/keys/{key_id}/revoke",
    response_model=KeyView,
    responses=ERRORS,
    summary="Revoke an API key",
    operation_id="revokeKey",
)
async def revoke_key(key_id: str, keel: App, key: Admin) -> KeyView:
    """Refused from the next request on, on every replica. Repeatable (the first revocation time stays)."""
    return KeyView.of(await keel.keys.revoke(key_id, tenant=key.tenant, by=key.scopes), keel.clock())


@router.post(
    "/keys/{key_id}/rotate",
    response_model=NewKey,
    status_code=201,
    responses={**ERRORS, 422: problem("The key is already revoked or expired")},
    summary="Rotate an API key",
    operation_id="rotateKey",
)
async def rotate_key(key_id: str, keel: App, key: Admin, body: RotateKey | None = None) -> NewKey:
    """A new key with the old one's scopes and expiry; the old one stops at once, or after `grace_s`."""
    grace_s = body.grace_s if body else 0.0
    record, plaintext = await keel.keys.rotate(key_id, grace_s=grace_s, tenant=key.tenant, by=key.scopes)
    return NewKey(**record.public(keel.clock()), key=plaintext)
