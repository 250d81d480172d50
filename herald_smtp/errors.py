"""Errors are values with a code: one mapping from failure to (status, error_code, message).

Every route and every framework error handler answers through `envelope`. Messages are for
an operator and never carry the SMTP host, an address, a credential, the recipient or a body.
"""

STATUS = {
    "unauthorized": 401,
    "invalid_request": 400,
    "invalid_destination": 400,
    "validation_failed": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "idempotency_conflict": 409,
    "rate_limited": 429,
    "send_failed": 500,
    "provider_down": 503,
    "timeout": 504,
}


class SendError(Exception):
    """A failure Herald sees as `error_code`; `status` overrides the code's usual status (413, 415).
    `relay` names the SMTP relay whose failure it is, when there is one (for the log)."""

    relay = ""

    def __init__(self, code: str, message: str, status: int = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS[code]

    def __repr__(self):
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class DeliveryUnknown(SendError):
    """The message data went out but its final reply never came (connection lost, deadline
    passed): the server may have accepted the mail, so it must never be retried here."""


def envelope(err: SendError):
    """The JSON body and status of a failure."""
    return {"ok": False, "error_code": err.code, "error_message": err.message}, err.status


def from_http_status(status: int, description: str = "") -> SendError:
    """Map a framework (werkzeug) HTTP error onto the contract's codes."""
    if status == 404:
        return SendError("not_found", "no such endpoint")
    if status == 405:
        return SendError("method_not_allowed", "method not allowed on this endpoint")
    if status == 413:
        return SendError("invalid_request", "request body too large", 413)
    if status == 415:
        return SendError("invalid_request", "Content-Type must be application/json", 415)
    if 400 <= status < 500:
        return SendError("invalid_request", description or "bad request", status)
    return SendError("send_failed", "internal error")
