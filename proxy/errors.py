"""The gateway's one error hierarchy and its rendering as OpenAI error JSON or an SSE error frame.

Every failure a client can see is a GatewayError; status, type and code are decided here and
nowhere else. Messages never carry secrets, upstream URLs or stack traces.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    should_retry = True

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_frame(self) -> bytes:
        return b"data: " + self.json() + b"\n\n"

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if not self.should_retry:
            headers["x-should-retry"] = "false"
        return headers


class InvalidRequest(GatewayError):
    status, type, should_retry = 400, "invalid_request_error", False
    code: str | None = None


class ContentFiltered(InvalidRequest):
    code = "content_filter"


class Unauthorized(GatewayError):
    status, type, code, should_retry = 401, "invalid_request_error", "invalid_api_key", False

    def response_headers(self) -> dict[str, str]:
        return {**super().response_headers(), "www-authenticate": 'Bearer realm="llm-gateway"'}


class PermissionDenied(GatewayError):
    status, type, code, should_retry = 403, "invalid_request_error", "model_not_allowed", False


class NotFound(GatewayError):
    status, type, code, should_retry = 404, "invalid_request_error", "not_found", False


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status, type, code, should_retry = 405, "invalid_request_error", "method_not_allowed", False


class PayloadTooLarge(GatewayError):
    status, type, code, should_retry = 413, "invalid_request_error", "request_too_large", False


class ClientDisconnected(GatewayError):
    """The client went away before its request was complete: nobody reads this answer, but the
    request line and metrics record it (499, nginx's "client closed request")."""

    status, type, code, should_retry = 499, "invalid_request_error", "client_disconnected", False


class RateLimited(GatewayError):
    """OpenAI names the limit that was hit in `type`: "requests" or "tokens"."""

    status, code = 429, "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.type = limit


class BadGateway(GatewayError):
    status, type, code = 502, "server_error", "bad_gateway"


class ServiceUnavailable(GatewayError):
    status, type, code = 503, "server_error", "service_unavailable"


class GatewayTimeout(GatewayError):
    status, type, code = 504, "server_error", "timeout"


class InternalError(GatewayError):
    """Anything unexpected. The message is fixed: details go to the log, never to the client."""

    def __init__(self) -> None:
        super().__init__("The gateway hit an internal error. It has been logged.")


def from_status(status: int, message: str) -> GatewayError:
    """Map a bare HTTP status (e.g. from Starlette's routing) to our hierarchy."""
    cls = {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge, 400: InvalidRequest}.get(status)
    return cls(message) if cls else InternalError()
