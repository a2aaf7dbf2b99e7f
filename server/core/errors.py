"""The one exception hierarchy: every error dipc answers with has a code and an HTTP status.

Edges raise these; one middleware renders them (DOKU's shape on DOKU routes, ``{"error": …}`` elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping


def error_text(error: BaseException) -> str:
    """An exception in one line for a log or a message: its type, and what it says when it says
    anything (a TimeoutError says nothing)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class DipcError(Exception):
    """Base of every error rendered to a caller."""

    code = "INTERNAL"
    http_status = 500

    def __init__(self, message: str, *, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = dict(fields) if fields else None

    def to_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message}
        if self.fields:
            body["fields"] = self.fields
        return body


class InvalidJson(DipcError):
    code = "INVALID_JSON"
    http_status = 400


class InvalidField(DipcError):
    """A mandatory field is missing or malformed; the message names it."""

    code = "INVALID_FIELD"
    http_status = 400

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}", fields={field: problem})
        self.field = field


class BadRequest(DipcError):
    code = "BAD_REQUEST"
    http_status = 400


class AuthenticationFailed(DipcError):
    """A DOKU request whose signature, Client-Id or timestamp is not accepted.

    ``reason`` is our finer reason (``BAD_SIGNATURE``, ``UNKNOWN_CLIENT``, ``STALE_TIMESTAMP``,
    ``MISSING_HEADER``): it goes to logs and metrics, never to the caller.
    """

    code = "INVALID_SIGNATURE"
    http_status = 401

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__("signature, Client-Id or timestamp not accepted")
        self.reason = reason
        self.detail = detail


class Unauthorized(DipcError):
    """Missing or wrong admin Bearer token."""

    code = "UNAUTHORIZED"
    http_status = 401


class NotFound(DipcError):
    code = "NOT_FOUND"
    http_status = 404


class AlreadyExists(DipcError):
    code = "ALREADY_EXISTS"
    http_status = 409


class NotModifiable(DipcError):
    """The object is in a state that forbids the change (a paid or cancelled code)."""

    code = "NOT_MODIFIABLE"
    http_status = 409


class VersionConflict(DipcError):
    code = "VERSION_CONFLICT"
    http_status = 409


class BeingChecked(DipcError):
    """Another dipc process is asking DOKU about this invoice right now."""

    code = "BEING_CHECKED"
    http_status = 409


class NotConfigured(DipcError):
    """What was asked needs a setting this deployment does not have (DOKU's API for Check Status)."""

    code = "NOT_CONFIGURED"
    http_status = 409


class AlreadyResolved(DipcError):
    """An exception (spec §9) has another resolution already; resolutions are final."""

    code = "ALREADY_RESOLVED"
    http_status = 409


class RequestIdReused(DipcError):
    code = "REQUEST_ID_REUSED"
    http_status = 409


class BodyTooLarge(DipcError):
    code = "BODY_TOO_LARGE"
    http_status = 413


class UnsupportedMediaType(DipcError):
    code = "UNSUPPORTED_MEDIA_TYPE"
    http_status = 415


class ValidationFailed(DipcError):
    """Semantically invalid input; ``fields`` maps each offending field to what is wrong with it."""

    code = "VALIDATION_FAILED"
    http_status = 422

    def __init__(self, fields: Mapping[str, str], message: str | None = None) -> None:
        summary = message or "; ".join(f"{name}: {problem}" for name, problem in fields.items())
        super().__init__(summary, fields=fields)


class RequestTimeout(DipcError):
    """The client did not send its whole body within the body-read timeout."""

    code = "REQUEST_TIMEOUT"
    http_status = 408


class ClientAborted(DipcError):
    """The client closed the connection before we had its request: its doing, not ours.

    499 (nginx's "client closed request") is never sent (nobody is listening); it labels the log line and
    the metrics so that aborts are counted apart from our errors.
    """

    code = "CLIENT_ABORTED"
    http_status = 499


class Overloaded(DipcError):
    """Too many bodies are being read from unauthenticated callers at once: a deliberate 503."""

    code = "OVERLOADED"
    http_status = 503


class Unavailable(DipcError):
    """The database cannot be reached within the deadline: fail fast, the caller retries."""

    code = "UNAVAILABLE"
    http_status = 503


class DokuBackoff(DipcError):
    """DOKU answered 429 or 5xx, or did not answer, lately: every reconciler holds back its Check Status
    calls for a while."""

    code = "DOKU_BACKOFF"
    http_status = 503


class Disabled(DipcError):
    """A feature that this deployment has not configured (the admin API without a token)."""

    code = "DISABLED"
    http_status = 404
