"""Named outcomes shared by the core, the protocol adapters, logs and metrics."""

from __future__ import annotations

from enum import StrEnum


class InquiryOutcome(StrEnum):
    """Why an inquiry was answered the way it was (our finer reason); chosen by dipc_inquire in SQL."""

    SUCCESS = "SUCCESS"
    NOT_FOUND = "NOT_FOUND"
    UNKNOWN_BIN = "UNKNOWN_BIN"
    OTHER_CLIENT = "OTHER_CLIENT"
    EXPIRED = "EXPIRED"
    ALREADY_PAID = "ALREADY_PAID"
    CANCELLED = "CANCELLED"
    CHANNEL_MISMATCH = "CHANNEL_MISMATCH"


class CodeStatus(StrEnum):
    ACTIVE = "active"
    PAID = "paid"
    CANCELLED = "cancelled"


class CheckResult(StrEnum):
    """What one Check Status call told us (server/doku/checkstatus.py), as counted in metrics and kept as
    ``last_result``."""

    PAID = "paid"  # 200, transaction.status SUCCESS: a payment to record
    PENDING = "pending"  # 200, PENDING: not paid yet
    EXPIRED = "expired"  # 200, EXPIRED: final, unpaid
    NOT_FOUND = "not_found"  # 404: DOKU does not know the invoice (yet)
    RATE_LIMITED = "rate_limited"  # 429: slow down
    SERVER_ERROR = "server_error"  # 5xx
    HTTP_ERROR = "http_error"  # any other status (401/403 mean DOKU refuses our signature)
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # DNS, connection refused or reset, TLS
    UNREADABLE = "unreadable"  # a 200 we cannot read, or about another invoice, or an unknown status
    BAD_SIGNATURE = "bad_signature"  # a 200 whose signature does not verify: never trusted

    @property
    def known(self) -> bool:
        """An answer about the invoice, rather than an unknown."""
        return self in (CheckResult.PAID, CheckResult.PENDING, CheckResult.EXPIRED)

    @property
    def backs_off(self) -> bool:
        """DOKU is overloaded or failing: every reconciler slows down."""
        return self in (CheckResult.RATE_LIMITED, CheckResult.SERVER_ERROR)

    @property
    def unanswered(self) -> bool:
        """No answer came at all (DNS, refused, reset, TLS, or no reply within the timeout).

        Such a call tells nothing about the invoice, only that DOKU is not there: it is not an attempt
        at the invoice, and every reconciler stops calling for a while.
        """
        return self in (CheckResult.UNREACHABLE, CheckResult.TIMEOUT)
