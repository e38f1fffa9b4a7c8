"""The JSON API blueprint: every request is authenticated by bearer token first."""

from __future__ import annotations

from typing import TypeVar

from flask import Blueprint, g, request
from pydantic import BaseModel, ValidationError
from sqlalchemy import delete

from ..auth import caller_from_bearer
from ..errors import ApiError
from ..extensions import db

bp = Blueprint("api", __name__, url_prefix="/api")

Model = TypeVar("Model", bound=BaseModel)


@bp.before_request
def authenticate() -> None:
    """Resolve the bearer token to g.caller before any view runs (401 otherwise)."""
    g.caller = caller_from_bearer(request.headers.get("Authorization"))


def parse_body(model: type[Model]) -> Model:
    """Validate the JSON body against a schema: 400 if not JSON, 422 naming the failing field."""
    if not request.is_json:
        raise ApiError(400, "bad_request", "send a JSON body with Content-Type: application/json")
    try:
        payload = request.get_json(silent=True)
    except RecursionError:  # nested deeper than the parser can follow: still just bad JSON
        payload = None
    if payload is None:
        raise ApiError(400, "bad_request", "the body is not valid JSON")
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(
            422,
            "validation_error",
            f"{field}: {first['msg']}",
            field=field,
            details=[
                {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                for e in error.errors(include_url=False, include_input=False)
            ],
        ) from None


def query_flag(name: str) -> bool:
    """A boolean query parameter: absent/false/0 → False, true/1 → True, else 400."""
    raw = request.args.get(name, "false").lower()
    if raw in ("true", "1"):
        return True
    if raw in ("false", "0", ""):
        return False
    raise ApiError(400, "bad_request", f"{name} must be true or false", field=name)


def delete_described(row: db.Model, what: str) -> None:
    """Delete the row a gate's describe step loaded, in one statement; 404 if it is gone.

    A concurrent request (another approved caller) may have deleted it since: the 404 makes the
    gate roll back, so an approval consumed for this request is not spent on nothing.
    """
    table = type(row).__table__
    if db.session.execute(delete(table).where(table.c.id == row.id)).rowcount != 1:
        raise ApiError(404, "not_found", f"{what} not found")


from . import approvals, members, secrets, tokens, webhooks, workspaces  # noqa: E402, F401  (routes)
