"""The OpenAPI document and its human-readable viewer; public, like any API reference."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from ..openapi import build_document

bp = Blueprint("api_docs", __name__, url_prefix="/api")


@bp.get("/openapi.json")
def openapi_document():
    """The OpenAPI 3.1 document of every /api route."""
    document = current_app.extensions.get("countersign_openapi")
    if document is None:
        document = current_app.extensions["countersign_openapi"] = build_document()
    return document


@bp.get("/docs")
def api_docs():
    """A vendored viewer of the document (no CDN)."""
    return render_template("api_docs.html")
