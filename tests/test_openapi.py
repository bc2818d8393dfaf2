"""The OpenAPI document the API serves is a valid OpenAPI 3.1 document.

Checked with ``openapi-spec-validator`` (the OpenAPI Initiative's published JSON Schemas
and its reference checks), which a hand-written check of a few keys would not replace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from tracker.api.app import create_app
from tracker.settings import Settings

pytestmark = pytest.mark.filterwarnings(
    # Litestar 2.25 deprecates `{session_id:str}` path parameters declared by name alone;
    # the routes still work, and the served document is what is checked here.
    "ignore::litestar.exceptions.LitestarDeprecationWarning"
)


def document(tmp_path: Path) -> dict[str, Any]:
    app = create_app(Settings(data_dir=tmp_path / "data"), insecure=True, env={})
    schema: dict[str, Any] = app.openapi_schema.to_schema()
    return schema


def test_the_openapi_document_validates(tmp_path: Path) -> None:
    spec = document(tmp_path)
    validate(spec)  # raises on any violation of the OpenAPI 3.1 schema
    assert spec["openapi"].startswith("3.1")
    paths = spec["paths"]
    for path, methods in {
        "/api/sessions": {"get", "post"},
        "/api/sessions/{session_id}": {"get", "patch", "delete"},
        "/api/sessions/{session_id}/offsets/{consumer}/reset": {"post"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }.items():
        assert methods <= set(paths[path]), path


def test_a_broken_document_is_refused(tmp_path: Path) -> None:
    """The validator is not a no-op: the same document with a bad parameter fails."""
    spec = document(tmp_path)
    operation = spec["paths"]["/api/sessions/{session_id}"]["get"]
    operation["parameters"][0]["in"] = "nowhere"
    try:
        validate(spec)
    except Exception as exc:  # the validator's own error types
        assert "nowhere" in str(exc)
    else:
        raise AssertionError("an invalid parameter location was accepted")
