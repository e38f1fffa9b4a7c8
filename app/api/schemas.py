"""Request bodies, validated with pydantic (and the source of their JSON schema)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
Id = Annotated[int, Field(ge=1, le=2**31 - 1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WorkspaceCreate(Strict):
    name: Name
    parent_id: Id | None = None


class SecretPut(Strict):
    value: Annotated[str, StringConstraints(min_length=1, max_length=65536)]


class TokenCreate(Strict):
    kind: Literal["agent", "user", "service"]
    name: Name
    workspace_id: Id | None = None
    user: Name | None = None


class MemberPut(Strict):
    role: Literal["owner", "approver", "viewer"]


class Decision(Strict):
    decision: Literal["approve", "deny"]
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)] | None = None
