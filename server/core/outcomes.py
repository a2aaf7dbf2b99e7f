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
