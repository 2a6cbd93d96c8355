"""The OpenAI-compatible HTTP API: now :mod:`maskstore.serve.http` (a router per API); these
names stay importable from here."""

from __future__ import annotations

from .http import create_app
from .http.protocol import ApiError, check_api_key, error_response

__all__ = ["ApiError", "check_api_key", "create_app", "error_response"]
