"""Our conventions where DOKU's public material is silent — the spec's [ours] parts, in one place.

Change a convention here and nowhere else; the inquiry's answers are the one exception, kept with the
rules that choose them in the database function dipc_inquire (schemas/migrations/0005_inquire.sql).
"""

from __future__ import annotations

# --- limits and windows --------------------------------------------------------------------------

DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_SKEW_S = 300
DEFAULT_NOTIFICATION_MAX_AGE_S = 7 * 24 * 3600
NOTIFICATION_MAX_FUTURE_S = 300
REQUEST_ID_MAX_LENGTH = 128
INFO_MAX_LENGTH = 40
INVOICE_MAX_LENGTH = 64
INVOICE_PATTERN = r"^[A-Za-z0-9_/-]{1,64}$"

# --- invoice numbers of reusable codes ---------------------------------------------------------

# Every successful inquiry of a reusable code mints "<code invoice>-<sequence>" (in dipc_inquire, where
# the inquiry's answers live: schemas/migrations/0005_inquire.sql), so each payment of the code is its
# own transaction. The base invoice is kept short enough for "-" and any bigint sequence to fit in 64.
REUSABLE_INVOICE_BASE_MAX_LENGTH = INVOICE_MAX_LENGTH - len("-") - 15

# --- protocol errors ---------------------------------------------------------------------------

# The answers to inquiries (status word and HTTP status per outcome) are rendered by dipc_inquire.
# A request we could not use at all gets one of these words.
STATUS_INVALID_SIGNATURE = "invalid_signature"
STATUS_DECLINE = "decline"


def protocol_error_status(http_status: int) -> str:
    """The status word of a protocol error (the request itself was unusable)."""
    return STATUS_INVALID_SIGNATURE if http_status == 401 else STATUS_DECLINE


# --- notifications -------------------------------------------------------------------------------

# Every notification we have recorded (normal, repeat, conflict or anomaly) gets this, HTTP 200:
# DOKU cannot fix any of them by retrying.
NOTIFICATION_ACK = b'{"status":"success"}'
# transaction.status meaning "paid"; other values are recorded and change nothing.
PAID_STATUS = "SUCCESS"


def transaction_reference(
    original_request_id: str | None, agent: tuple[str | None, str | None, str | None], fallback: str
) -> str:
    """The identity of one store transaction across DOKU's retries (spec §4 rule 2, §8 rule 3).

    ``transaction.original_request_id``; else the ``AGENT_TRX_ID`` identifier; else ``fallback`` (see
    :func:`request_reference` and :func:`check_status_reference`). Retries of one transaction carry the
    same reference. A store's transaction number is qualified by its agent and store ids: two stores may
    count transactions alike, and those are two payments, never one. The prefixes keep the kinds of
    reference apart.
    """
    return original_request_id or agent_reference(agent) or fallback


def agent_reference(agent: tuple[str | None, str | None, str | None]) -> str | None:
    """The reference of a transaction named by its store transaction only: its ``AGENT_TRX_ID``, qualified
    by its agent and store ids (None without one)."""
    agent_id, store_id, trx_id = agent
    return f"agent:{agent_id or ''}/{store_id or ''}/{trx_id}" if trx_id else None


def request_reference(request_id: str) -> str:
    """A notification that names its transaction in no other way is known by its own Request-Id."""
    return f"request:{request_id}"


def check_status_reference(invoice_number: str) -> str:
    """A Check Status answer that names its transaction in no other way (spec §8 rule 3)."""
    return f"check-status:{invoice_number}"


# --- Check Status (spec §8) ----------------------------------------------------------------------

CHECK_STATUS_PATH = "/orders/v1/status/"
# transaction.status of a Check Status answer for O2O: not paid yet, paid (final), unpaid (final).
CHECK_PENDING = "PENDING"
CHECK_PAID = "SUCCESS"
CHECK_EXPIRED = "EXPIRED"
