"""Errors the HTTP API answers with: one class per failure a client can see, each with one
status and an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequestError(APIError):
    status = 400
    type = "invalid_request_error"


class UnauthorizedError(APIError):
    status = 401
    type = "authentication_error"


class NotFoundError(APIError):
    status = 404
    type = "not_found_error"


class PayloadTooLargeError(APIError):
    status = 413
    type = "invalid_request_error"


class QueueFullError(APIError):
    """Every engine's queue is full: come back later."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, code="queue_full")
        self.headers["Retry-After"] = str(retry_after)


class EngineFailureError(APIError):
    status = 500
    type = "server_error"


class UnavailableError(APIError):
    """No engine can take the request: still loading, or dead."""

    status = 503
    type = "service_unavailable"
