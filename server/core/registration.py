"""Registration and changes of payment codes: validation shared by the admin API, the CLI and imports.

A registration or change with a problem is refused with :class:`ValidationFailed` naming every field
that has one, all at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server.core.codes import ANY_CHANNEL, NEW_CODE_COLUMNS, CodeRules, CodeValues, NewCode
from server.core.errors import ValidationFailed
from server.core.text import TooLarge, has_control, whole_number
from server.core.times import parse_timestamp
from server.doku import conventions

MAX_AMOUNT = 999_999_999_999  # far above any counter payment, far below 2**53 (safe in every JSON parser)
CUSTOMER_NAME_MAX_LENGTH = 128
EMAIL_MAX_LENGTH = 254
CODE_CHANNELS = ("ALFA", "INDOMARET", ANY_CHANNEL)

_INVOICE_RE = re.compile(conventions.INVOICE_PATTERN)


PATCHABLE_FIELDS = ("amount", "expires_at", "customer_name", "customer_email", "info1", "info2", "info3")


@dataclass(frozen=True, slots=True)
class CodeChanges:
    """A validated PATCH: the fields to set (``expires_at`` may be None to clear it)."""

    values: Mapping[str, Any]
    expected_version: int | None = None


class _Invalid(ValueError):
    pass


def _text(value: Any, *, max_length: int, required: bool = False) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    value = value.strip()
    if required and not value:
        raise _Invalid("is required")
    if len(value) > max_length:
        raise _Invalid(f"must be at most {max_length} characters")
    if not value.isprintable() and has_control(value):  # most text is printable: not even a call
        raise _Invalid("must not contain control characters")
    return value


def _amount(value: Any, text: bool) -> int:
    if text and isinstance(value, str):
        try:
            value = whole_number(value.strip(), maximum=MAX_AMOUNT)
        except TooLarge:
            raise _Invalid(f"must be at most {MAX_AMOUNT}") from None
        except ValueError:
            raise _Invalid("must be a whole number of rupiah") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid("must be an integer number of rupiah")
    if value <= 0:
        raise _Invalid("must be greater than 0")
    if value > MAX_AMOUNT:
        raise _Invalid(f"must be at most {MAX_AMOUNT}")
    return value


def _boolean(value: Any, text: bool) -> bool:
    if value is None:
        return False
    if text and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("", "false", "0", "no", "f", "n"):
            return False
        if lowered in ("true", "1", "yes", "t", "y"):
            return True
        raise _Invalid("must be true or false")
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _expiry(value: Any, text: bool, now: datetime) -> datetime | None:
    if value is None or (text and isinstance(value, str) and not value.strip()):
        return None
    try:
        expires_at = parse_timestamp(value)
    except ValueError as problem:
        raise _Invalid(str(problem)) from None
    if expires_at <= now:
        raise _Invalid("must be in the future")
    return expires_at


def _email(value: Any) -> str:
    email = _text(value, max_length=EMAIL_MAX_LENGTH)
    if email:
        local, at, domain = email.partition("@")
        if not at or not local or not domain or "@" in domain or " " in email:
            raise _Invalid("must be an email address")
    return email


def _invoice(value: Any, reusable: bool) -> str:
    invoice = _text(value, max_length=conventions.INVOICE_MAX_LENGTH, required=True)
    if not _INVOICE_RE.match(invoice):
        raise _Invalid("may contain only letters, digits, '_', '-' and '/'")
    if reusable and len(invoice) > conventions.REUSABLE_INVOICE_BASE_MAX_LENGTH:
        raise _Invalid(
            f"of a reusable code must be at most {conventions.REUSABLE_INVOICE_BASE_MAX_LENGTH} characters, "
            "leaving room for the sequence number each inquiry appends"
        )
    return invoice


class _Collector:
    """Runs field parsers and gathers every problem, so a caller learns all of them at once."""

    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def field(self, name: str, default: Any, parse: Callable[..., Any], *args: Any) -> Any:
        """``parse(*args)``, or ``default`` with the problem noted under ``name``."""
        try:
            return parse(*args)
        except _Invalid as problem:
            self.errors[name] = str(problem)
            return default

    def raise_if_any(self) -> None:
        if self.errors:
            raise ValidationFailed(self.errors)


def _unknown_fields(raw: Mapping[str, Any], known: Collection[str], collector: _Collector) -> None:
    for name in raw:
        if name not in known:
            collector.errors[name] = "is not a known field"


def parse_payment_code(value: Any) -> str:
    """A payment code as a string of ASCII digits; leading zeros are kept."""
    if not isinstance(value, str):
        raise _Invalid("must be a string of digits (leading zeros matter, so never a number)")
    code = value.strip()
    if not code:
        raise _Invalid("is required")
    if not code.isascii() or not code.isdigit():
        raise _Invalid("must contain digits only")
    if len(code) > 25:
        raise _Invalid("must be at most 25 digits")
    return code


def _info(value: Any) -> str:
    return _text(value, max_length=conventions.INFO_MAX_LENGTH)


def _customer_name(value: Any) -> str:
    return _text(value, max_length=CUSTOMER_NAME_MAX_LENGTH, required=True)


# Parsers of the fields a registration and a PATCH share (what the bill and receipt show), each called
# as ``parse(value, text, now)``; built once, not per row, as an import checks millions of rows.
_BILL_FIELDS: Mapping[str, Callable[[Any, bool, datetime], Any]] = {
    "amount": lambda value, text, now: _amount(value, text),
    "customer_name": lambda value, text, now: _customer_name(value),
    "customer_email": lambda value, text, now: _email(value),
    "info1": lambda value, text, now: _info(value),
    "info2": lambda value, text, now: _info(value),
    "info3": lambda value, text, now: _info(value),
    "expires_at": lambda value, text, now: _expiry(value, text, now),
}


_BILL_DEFAULTS: Mapping[str, Any] = {
    "amount": 0,
    "customer_name": "",
    "customer_email": "",
    "expires_at": None,
}


def parse_new_code(
    raw: Mapping[str, Any],
    *,
    rules: CodeRules,
    client_ids: Collection[str],
    now: datetime,
    text: bool = False,
) -> NewCode:
    """Validate a code registration (admin API, CLI).

    ``text=True`` accepts the string forms of a CSV row (``"150000"``, ``"true"``, ``""`` for unset).
    Raises :class:`ValidationFailed` naming every offending field.
    """
    return NewCode(*new_code_values(raw, rules=rules, client_ids=client_ids, now=now, text=text))


def new_code_values(
    raw: Mapping[str, Any],
    *,
    rules: CodeRules,
    client_ids: Collection[str],
    now: datetime,
    text: bool = False,
) -> CodeValues:
    """What :func:`parse_new_code` registers, as the values of its columns: one row of an import, which
    COPYs them as they are (a frozen dataclass per row would cost a million-code import seconds).

    Most rows have no problem, and are checked straight through (:func:`_straight`). A row with one is
    checked again field by field (:func:`_field_by_field`), which names every problem.
    """
    try:
        return _straight(raw, rules, client_ids, now, text)
    except _Invalid:
        return _field_by_field(raw, rules, client_ids, now, text)


_NEW_CODE_FIELDS = frozenset(NEW_CODE_COLUMNS)


def _straight(
    raw: Mapping[str, Any], rules: CodeRules, client_ids: Collection[str], now: datetime, text: bool
) -> CodeValues:
    """The values of a registration without a problem; the first problem raises _Invalid.

    The same checks as :func:`_field_by_field` (tests/unit/test_codes.py holds the two to one verdict),
    called directly: the collector's call per field cost an import about a tenth of its time.
    """
    if not raw.keys() <= _NEW_CODE_FIELDS:
        raise _Invalid("is not a known field")  # _field_by_field names it, with every other problem
    get = raw.get
    code = parse_payment_code(get("payment_code"))
    reusable = _boolean(get("reusable"), text)
    return (  # NEW_CODE_COLUMNS's order
        code,
        _client(get("client_id"), client_ids),
        _channel(get("channel"), _bin_channels(rules, code), text),
        _invoice(get("invoice_number"), reusable),
        _amount(get("amount"), text),
        _customer_name(get("customer_name")),
        _email(get("customer_email")),
        _info(get("info1")),
        _info(get("info2")),
        _info(get("info3")),
        reusable,
        _expiry(get("expires_at"), text, now),
    )


def _field_by_field(
    raw: Mapping[str, Any], rules: CodeRules, client_ids: Collection[str], now: datetime, text: bool
) -> CodeValues:
    """The values of a registration; raises ValidationFailed naming every field with a problem."""
    check = _Collector()
    _unknown_fields(raw, NEW_CODE_COLUMNS, check)
    get = raw.get
    code = check.field("payment_code", "", parse_payment_code, get("payment_code"))
    reusable = check.field("reusable", False, _boolean, get("reusable"), text)
    channels: frozenset[str] = frozenset()
    if code:
        channels = check.field("payment_code", frozenset(), _bin_channels, rules, code)
    values = {
        name: check.field(name, _BILL_DEFAULTS.get(name, ""), parse, get(name), text, now)
        for name, parse in _BILL_FIELDS.items()
    } | {
        "payment_code": code,
        "client_id": check.field("client_id", "", _client, get("client_id"), client_ids),
        "channel": check.field("channel", ANY_CHANNEL, _channel, get("channel"), channels, text),
        "invoice_number": check.field("invoice_number", "", _invoice, get("invoice_number"), reusable),
        "reusable": reusable,
    }
    check.raise_if_any()
    return tuple(values[name] for name in NEW_CODE_COLUMNS)


def _bin_channels(rules: CodeRules, code: str) -> frozenset[str]:
    try:
        return rules.check(code)
    except ValueError as problem:
        raise _Invalid(str(problem)) from None


def _channel(value: Any, bin_channels: frozenset[str], text: bool) -> str:
    if value is None or (text and isinstance(value, str) and not value.strip()):
        # A code under a BIN of one channel belongs to that channel; otherwise any channel may ask.
        return next(iter(bin_channels)) if len(bin_channels) == 1 else ANY_CHANNEL
    if not isinstance(value, str) or value.strip().upper() not in CODE_CHANNELS:
        raise _Invalid(f"must be one of {', '.join(CODE_CHANNELS)}")
    channel = value.strip().upper()
    if channel != ANY_CHANNEL and bin_channels and channel not in bin_channels:
        raise _Invalid(f"the code's BIN is configured for {', '.join(sorted(bin_channels))}, not {channel}")
    return channel


def _client(value: Any, client_ids: Collection[str]) -> str:
    if value is None or value == "":
        if len(client_ids) == 1:
            return next(iter(client_ids))
        if not client_ids:
            raise _Invalid("is required (no DOKU Client-Id is configured to default to)")
        raise _Invalid("is required when several DOKU clients are configured")
    client_id = _text(value, max_length=128, required=True)
    if client_ids and client_id not in client_ids:
        raise _Invalid("is not a configured DOKU Client-Id")
    return client_id


MAX_VERSION = 2**31 - 1  # the column is an integer


def parse_changes(raw: Mapping[str, Any], *, now: datetime) -> CodeChanges:
    """Validate a PATCH of an unpaid code: amount, expiry, customer and receipt texts."""
    check = _Collector()
    _unknown_fields(raw, (*PATCHABLE_FIELDS, "version"), check)
    values = {
        name: check.field(name, None, parse, raw[name], False, now)
        for name, parse in _BILL_FIELDS.items()
        if name in raw
    }
    version = raw.get("version")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION
    ):
        check.errors["version"] = f"must be an integer from 0 to {MAX_VERSION}"
    if not values and not check.errors:
        check.errors["body"] = f"names none of {', '.join(PATCHABLE_FIELDS)}"
    check.raise_if_any()
    return CodeChanges(values=values, expected_version=version)
