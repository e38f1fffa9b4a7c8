"""The OpenAPI 3.1 document, built from the same pydantic schemas that validate request bodies.

Response shapes are pydantic models too (app/api/schemas.py). Completeness is checked by a test
that compares this table with app.url_map in both directions, and by a schemathesis run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .api import schemas
from .policy import POLICY

JSON = "application/json"
ERROR_REF = {"$ref": "#/components/schemas/Error"}

ERROR_STATUSES = {
    "400": "Malformed request (bad JSON, bad query parameter)",
    "401": "Missing, unknown or revoked bearer token",
    "403": "Not allowed here; or a human denied this request (error=approval_denied)",
    "404": "No such resource (or malformed id)",
    "409": "Conflict with the current state (e.g. not pending, has children)",
    "413": "Body larger than the configured limit (default 1 MiB)",
    "422": "Body failed validation; `field` names the first failing field",
    "429": "Too many failed authentication attempts from this address; see Retry-After",
    "503": "The database or the gate could not decide: nothing was done (fail closed)",
}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    ok: dict[str, type[BaseModel] | None]  # status -> response model (None: empty body)
    body: type[BaseModel] | None = None
    gate: str | None = None  # the gated policy action, if any
    query: list[dict[str, Any]] = field(default_factory=list)
    errors: tuple[str, ...] = ("400", "401", "403", "404", "409", "413", "422", "429", "503")
    public: bool = False


def _id(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
    }


def _str(name: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": 128}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "schema": schema}


RECURSIVE = {
    "name": "recursive",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean"},
    "description": "Delete the whole subtree (needed when the workspace has children).",
}
S = schemas
OPERATIONS: list[Operation] = [
    Operation("get", "/api/workspaces", "List readable workspaces", {"200": S.WorkspaceList}),
    Operation(
        "post", "/api/workspaces", "Create a workspace", {"201": S.WorkspaceOut}, S.WorkspaceCreate
    ),
    Operation(
        "get", "/api/workspaces/{workspace_id}", "Read a workspace", {"200": S.WorkspaceDetail}
    ),
    Operation(
        "delete",
        "/api/workspaces/{workspace_id}",
        "Delete a workspace (gated)",
        {"204": None},
        gate="workspace.delete",
        query=[RECURSIVE],
    ),
    Operation(
        "get", "/api/workspaces/{workspace_id}/secrets", "List secret names", {"200": S.SecretList}
    ),
    Operation(
        "put",
        "/api/workspaces/{workspace_id}/secrets/{name}",
        "Create (201) or replace (200, gated) a secret",
        {"200": S.SecretOut, "201": S.SecretOut},
        S.SecretPut,
        gate="secret.replace",
    ),
    Operation(
        "delete",
        "/api/workspaces/{workspace_id}/secrets/{name}",
        "Delete a secret (gated)",
        {"204": None},
        gate="secret.delete",
    ),
    Operation(
        "get", "/api/workspaces/{workspace_id}/members", "List members", {"200": S.MemberList}
    ),
    Operation(
        "put",
        "/api/workspaces/{workspace_id}/members/{username}",
        "Add (201) a member or change a role (200)",
        {"200": S.MemberOut, "201": S.MemberOut},
        S.MemberPut,
    ),
    Operation(
        "delete",
        "/api/workspaces/{workspace_id}/members/{username}",
        "Remove a member (gated)",
        {"204": None},
        gate="member.remove",
    ),
    Operation("get", "/api/tokens", "List tokens (prefixes only)", {"200": S.TokenList}),
    Operation(
        "post",
        "/api/tokens",
        "Mint a token; plaintext shown once (gated for service/unscoped tokens)",
        {"201": S.TokenMinted},
        S.TokenCreate,
        gate="token.mint",
    ),
    Operation(
        "delete",
        "/api/tokens/{token_id}",
        "Revoke a token (gated)",
        {"204": None},
        gate="token.revoke",
    ),
    Operation(
        "get",
        "/api/approvals",
        "List approval requests the caller may see",
        {"200": S.ApprovalList},
        query=[
            {
                "name": "status",
                "in": "query",
                "schema": {"type": "string", "enum": sorted(S.STATUS_VALUES)},
            },
            {
                "name": "workspace_id",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
            },
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 500},
            },
        ],
    ),
    Operation(
        "get",
        "/api/approvals/{approval_id}",
        "Read an approval request; ?wait=N long-polls while it is pending",
        {"200": S.ApprovalDetail},
        query=[
            {
                "name": "wait",
                "in": "query",
                "schema": {"type": "number", "minimum": 0, "maximum": 60},
                "description": "Seconds to wait for a change (decision, vote, escalation); cap 60.",
            }
        ],
    ),
    Operation(
        "post",
        "/api/approvals/{approval_id}/decision",
        "Approve or deny (humans with owner/approver rights only)",
        {"200": S.ApprovalOut},
        S.Decision,
    ),
    Operation(
        "post",
        "/api/approvals/{approval_id}/withdraw",
        "Withdraw one's own pending request",
        {"200": S.ApprovalOut},
    ),
    Operation(
        "post",
        "/api/workspaces/{workspace_id}/webhooks",
        "Register a signed webhook for the subtree (owners, service tokens); secret shown once",
        {"201": S.WebhookCreated},
        S.WebhookCreate,
    ),
    Operation(
        "get",
        "/api/workspaces/{workspace_id}/webhooks",
        "List the workspace's webhooks (no secrets)",
        {"200": S.WebhookList},
    ),
    Operation(
        "delete",
        "/api/workspaces/{workspace_id}/webhooks/{webhook_id}",
        "Remove a webhook and its undelivered notifications",
        {"204": None},
    ),
    Operation(
        "get",
        "/api/workspaces/{workspace_id}/webhooks/{webhook_id}/deliveries",
        "The delivery log: notifications with their attempts, newest first",
        {"200": S.DeliveryList},
        query=[
            {
                "name": "status",
                "in": "query",
                "schema": {"type": "string", "enum": ["pending", "delivered", "dead"]},
            },
            {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 500},
            },
        ],
    ),
    Operation("get", "/api/openapi.json", "This document", {"200": None}, errors=(), public=True),
    Operation(
        "get",
        "/api/docs",
        "A readable view of this document",
        {"200": None},
        errors=(),
        public=True,
    ),
]
MEDIA_OVERRIDES = {
    "/api/openapi.json": {JSON: {"schema": {"type": "object"}}},
    "/api/docs": {"text/html": {"schema": {"type": "string"}}},
}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    params = []
    for part in path.split("/"):
        if part.startswith("{"):
            name = part.strip("{}")
            if name.endswith("_id"):
                params.append(_id(name))
            elif name == "name":
                params.append(_str(name, r"^[A-Za-z0-9_.-]{1,128}$"))
            else:
                params.append(_str(name))
    return params


def _content(model: type[BaseModel] | None) -> dict[str, Any]:
    if model is None:
        return {}
    return {"content": {JSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


def _responses(op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {
        status: {"description": "Success", **_content(model)} for status, model in op.ok.items()
    }
    if op.path in MEDIA_OVERRIDES:
        responses["200"]["content"] = MEDIA_OVERRIDES[op.path]
    if op.gate:
        responses["202"] = {
            "description": (
                f"Pending human approval ({op.gate}, for gated callers). Retry the identical "
                "request once approved; poll `Location` meanwhile."
            ),
            "headers": {
                "Location": {"schema": {"type": "string"}, "description": "The approval's URL"},
                "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"},
            },
            **_content(schemas.Pending),
        }
    for status in op.errors:
        responses[status] = {
            "description": ERROR_STATUSES[status],
            "content": {JSON: {"schema": ERROR_REF}},
        }
    return responses


def _models() -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {"Pending": schemas.Pending, "Error": schemas.Error}
    for op in OPERATIONS:
        for model in [op.body, *op.ok.values()]:
            if model is not None:
                found[model.__name__] = model
    return list(found.values())


def _components() -> dict[str, Any]:
    components: dict[str, Any] = {}
    for model in _models():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, nested in schema.pop("$defs", {}).items():
            components[name] = nested
        components[model.__name__] = schema
    return components


def _operation_id(op: Operation) -> str:
    words = op.path.removeprefix("/api/").replace("{", "").replace("}", "").split("/")
    return "_".join([op.method, *words]).replace(".", "_")


def build_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": _operation_id(op),
            "parameters": _path_parameters(op.path) + op.query,
            "responses": _responses(op),
        }
        if op.public:
            operation["security"] = []
        if op.gate:
            operation["x-countersign-gate"] = op.gate
            operation["description"] = (
                f"Gated by policy action `{op.gate}`: {POLICY[op.gate].summary}. Callers of kind "
                f"{', '.join(sorted(POLICY[op.gate].gated_kinds))} get 202 until a human approves."
            )
        if op.body is not None:
            operation["requestBody"] = {"required": True, **_content(op.body)}
        paths.setdefault(op.path, {})[op.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Countersign API",
            "version": "1.0.0",
            "description": (
                "Workspace API whose destructive operations need a human countersignature when "
                "an AI agent calls them. A gated call answers 202 with a pending approval; "
                "re-send the identical request after a human approves."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
