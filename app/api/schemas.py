"""Request bodies, validated with pydantic (and the source of their JSON schema)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

# At least one non-blank character (the JSON schema says so too, so fuzzers know).
Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128, pattern=r"\S")
]


def _integral_float_to_int(value: object) -> object:
    """JSON has one number type: 7.0 is the integer 7 (JSON Schema agrees); 7.5 stays invalid."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Id = Annotated[int, Field(ge=1, le=2**31 - 1), BeforeValidator(_integral_float_to_int)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class WorkspaceCreate(Strict):
    name: Name
    parent_id: Id | None = None


class SecretPut(Strict):
    value: Annotated[str, StringConstraints(min_length=1, max_length=65536)]


class TokenCreate(Strict):
    model_config = ConfigDict(
        json_schema_extra={
            # A user token names its user; an agent token may name its human owner; a service
            # token names none.
            "if": {"properties": {"kind": {"const": "user"}}},
            "then": {"required": ["user"], "properties": {"user": {"type": "string"}}},
            "else": {
                "if": {"properties": {"kind": {"const": "service"}}},
                "then": {"properties": {"user": {"type": "null"}}},
            },
        }
    )

    kind: Literal["agent", "user", "service"]
    name: Name
    workspace_id: Id | None = None
    user: Name | None = None


class MemberPut(Strict):
    role: Literal["owner", "approver", "viewer"]


class Decision(Strict):
    """A denial needs a reason (the agent is told it)."""

    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"decision": {"const": "deny"}}},
            "then": {
                "required": ["reason"],
                "properties": {"reason": {"type": "string", "pattern": "\\S"}},
            },
        }
    )

    decision: Literal["approve", "deny"]
    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)] | None = None


# ---- responses (documentation: the OpenAPI document and the schemathesis run check them) ----

STATUS_VALUES = {"pending", "approved", "denied", "expired", "consumed", "withdrawn"}
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class Error(BaseModel):
    error: str
    message: str
    field: str | None = None


class Pending(BaseModel):
    status: Literal["pending"]
    approval_id: int
    action: str
    workspace_id: int
    summary: str
    expires_at: Timestamp
    status_url: str


class WorkspaceOut(BaseModel):
    id: int
    name: str
    parent_id: int | None
    created_at: Timestamp


class WorkspaceList(BaseModel):
    workspaces: list[WorkspaceOut]


class PathItem(BaseModel):
    id: int
    name: str


class WorkspaceDetail(WorkspaceOut):
    path: list[PathItem]
    children: list[WorkspaceOut]


class SecretOut(BaseModel):
    """Never carries the value."""

    workspace_id: int
    name: str
    created_at: Timestamp
    updated_at: Timestamp


class SecretList(BaseModel):
    secrets: list[SecretOut]


class MemberOut(BaseModel):
    workspace_id: int
    username: str
    role: Literal["owner", "approver", "viewer"]
    created_at: Timestamp


class MemberList(BaseModel):
    members: list[MemberOut]


class TokenOut(BaseModel):
    id: int
    prefix: str
    kind: Literal["agent", "user", "service"]
    name: str
    workspace_id: int | None
    user: str | None
    created_at: Timestamp
    revoked_at: Timestamp | None


class TokenMinted(TokenOut):
    token: str = Field(description="The plaintext token: shown once, never again.")


class TokenList(BaseModel):
    tokens: list[TokenOut]


class Requester(BaseModel):
    token_id: int | None
    kind: str
    name: str


class VoteOut(BaseModel):
    user: str
    decision: Literal["approve", "deny"]
    level: int
    reason: str | None
    created_at: Timestamp


class ApprovalOut(BaseModel):
    id: int
    status: Literal["pending", "approved", "denied", "expired", "consumed", "withdrawn"]
    action: str
    workspace_id: int
    workspace_path: list[PathItem]
    summary: str
    context: dict
    request_hash: str
    requested_by: Requester
    created_at: Timestamp
    expires_at: Timestamp
    decided_at: Timestamp | None
    decided_by: str | None
    decided_level: int | None
    reason: str | None
    approval_expires_at: Timestamp | None
    consumed_at: Timestamp | None
    status_url: str
    approvals_required: int = Field(description="Distinct human approvals the policy needs")
    approvals_count: int
    votes: list[VoteOut]
    escalation_level: int = Field(description="0, or the level of the ancestor escalated to")
    next_escalation_at: Timestamp | None
    policy_version: str | None = Field(description="Short hash of the policy it was made under")


class ApprovalEventOut(BaseModel):
    id: int
    kind: str
    actor: str
    detail: dict
    created_at: Timestamp


class ApprovalDetail(ApprovalOut):
    events: list[ApprovalEventOut]


class ApprovalList(BaseModel):
    approvals: list[ApprovalOut]


# ---- webhooks ----------------------------------------------------------------------------------

WEBHOOK_EVENTS = (
    "created",
    "voted",
    "escalated",
    "approved",
    "denied",
    "decided",
    "consumed",
    "expired",
    "withdrawn",
)


PORT = r"(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3}|0)"
WEBHOOK_URL = rf"^https?://[A-Za-z0-9.-]+(?::{PORT})?(?:[/?#][!-~]*)?$"


class WebhookCreate(Strict):
    """A receiver for the workspace's subtree; "decided" means approved and denied."""

    # http(s), a plain host (no credentials), an optional valid port, printable ASCII after it;
    # app/outbox.validate_target checks the same, the pattern tells clients and fuzzers.
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048, pattern=WEBHOOK_URL)]
    events: Annotated[
        list[Literal[WEBHOOK_EVENTS]],  # type: ignore[valid-type]
        Field(min_length=1, max_length=len(WEBHOOK_EVENTS)),
    ]
    format: Literal["json", "slack"] = "json"


class WebhookOut(BaseModel):
    id: int
    workspace_id: int
    url: str
    format: Literal["json", "slack"]
    events: list[str]
    created_by: str
    created_at: Timestamp


class WebhookCreated(WebhookOut):
    secret: str = Field(description="The HMAC signing secret: shown once, never again.")


class WebhookList(BaseModel):
    webhooks: list[WebhookOut]


class DeliveryAttemptOut(BaseModel):
    attempt: int
    started_at: Timestamp
    duration_ms: int
    status_code: int | None
    error: str | None


class DeliveryOut(BaseModel):
    id: int = Field(description="Sent as X-Countersign-Delivery; the same on every retry")
    event_id: int
    event: str
    approval_id: int
    status: Literal["pending", "delivered", "dead"]
    attempts: int
    next_attempt_at: Timestamp | None
    delivered_at: Timestamp | None
    last_status_code: int | None
    last_error: str | None
    created_at: Timestamp
    log: list[DeliveryAttemptOut]


class DeliveryList(BaseModel):
    deliveries: list[DeliveryOut]
