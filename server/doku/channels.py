"""Store channels and the BIN rules of DOKU payment codes (spec §2).

A BIN is the company code the acquirer knows. A server is configured with BINs, each tied to a channel:
``DIPC_BINS=ALFA:88965:direct,INDOMARET:33012``. The model follows from the BIN's length (5 digits =
direct, 6 or more = DOKU exclusive); when written out it must agree.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ALFA = "ALFA"
INDOMARET = "INDOMARET"
ANY = "ANY"
CHANNELS = (ALFA, INDOMARET)

# DOKU's channel.id and acquirer.id values for each of our channels.
_CHANNEL_IDS: Mapping[str, str] = {
    "ONLINE_TO_OFFLINE_ALFA": ALFA,
    "ONLINE_TO_OFFLINE_INDOMARET": INDOMARET,
}
_ACQUIRER_IDS: Mapping[str, str] = {ALFA: ALFA, INDOMARET: INDOMARET}
CHANNEL_IDS: Mapping[str, str] = {channel: channel_id for channel_id, channel in _CHANNEL_IDS.items()}

MAX_CODE_LENGTH = 25  # the longest any partnership model allows


def channel_from_message(channel_id: object, acquirer_id: object) -> str | None:
    """Our channel for a DOKU body's ``channel.id`` (or, failing that, ``acquirer.id``)."""
    if isinstance(channel_id, str) and channel_id in _CHANNEL_IDS:
        return _CHANNEL_IDS[channel_id]
    if isinstance(acquirer_id, str) and acquirer_id in _ACQUIRER_IDS:
        return _ACQUIRER_IDS[acquirer_id]
    return None


@dataclass(frozen=True, slots=True)
class BinModel:
    name: str
    max_free_digits: int
    max_total: int


DIRECT = BinModel("direct", max_free_digits=20, max_total=25)
EXCLUSIVE = BinModel("exclusive", max_free_digits=14, max_total=20)
_MODELS = {"direct": DIRECT, "exclusive": EXCLUSIVE}


class BinConfigError(ValueError):
    """``DIPC_BINS`` (or a client's ``bins``) is malformed."""


@dataclass(frozen=True, slots=True)
class BinRule:
    channel: str
    bin: str
    model: BinModel

    def length_problem(self, length: int) -> str | None:
        """Why a code of ``length`` digits under this BIN breaks its length rule, or None."""
        free = length - len(self.bin)
        if free < 1:
            return f"must have digits after BIN {self.bin}"
        if free > self.model.max_free_digits or length > self.model.max_total:
            return (
                f"BIN {self.bin} ({self.model.name}) allows at most {self.model.max_free_digits} digits "
                f"after the BIN and {self.model.max_total} in all; got {length}"
            )
        return None

    def __str__(self) -> str:
        return f"{self.channel}:{self.bin}:{self.model.name}"


def parse_bin_rule(text: str) -> BinRule:
    parts = [part.strip() for part in text.split(":")]
    if len(parts) not in (2, 3):
        raise BinConfigError(f"BIN rule {text!r} is not CHANNEL:BIN or CHANNEL:BIN:MODEL")
    channel, digits = parts[0].upper(), parts[1]
    if channel not in CHANNELS:
        raise BinConfigError(f"BIN rule {text!r}: channel must be one of {', '.join(CHANNELS)}")
    if not digits.isascii() or not digits.isdigit():
        raise BinConfigError(f"BIN rule {text!r}: BIN must be digits")
    if len(digits) < 5:
        raise BinConfigError(f"BIN rule {text!r}: a BIN has 5 digits (direct) or 6 and more (DOKU exclusive)")
    model = DIRECT if len(digits) == 5 else EXCLUSIVE
    if len(parts) == 3 and parts[2]:
        named = _MODELS.get(parts[2].lower())
        if named is None:
            raise BinConfigError(f"BIN rule {text!r}: model must be 'direct' or 'exclusive'")
        if named is not model:
            raise BinConfigError(
                f"BIN rule {text!r}: a {len(digits)}-digit BIN is a {model.name} BIN, not {named.name}"
            )
    return BinRule(channel=channel, bin=digits, model=model)


class BinTable:
    """The configured BINs. An empty table means "no BIN check" (accepted, with a warning at start)."""

    __slots__ = ("_longest", "_verdict", "rules")

    def __init__(self, rules: Iterable[BinRule] = ()) -> None:
        # Longest BIN first, so a code under a longer, more specific BIN meets that rule first.
        self.rules: tuple[BinRule, ...] = tuple(sorted(rules, key=lambda rule: -len(rule.bin)))
        # A code's verdict follows from its first digits (as many as the longest BIN has) and its
        # length alone, so an import of a million codes under a few BINs works out a few verdicts.
        self._longest = max((len(rule.bin) for rule in self.rules), default=0)
        self._verdict = functools.lru_cache(maxsize=1024)(self._judge)

    @classmethod
    def parse(cls, spec: str | None) -> BinTable:
        if not spec or not spec.strip():
            return cls()
        return cls(parse_bin_rule(item) for item in spec.split(",") if item.strip())

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __str__(self) -> str:
        return ",".join(str(rule) for rule in self.rules) or "(none)"

    def check(self, code: str) -> frozenset[str]:
        """Channels ``code`` may be paid at; raises ValueError saying which rule it breaks.

        With no BINs configured every channel is allowed.
        """
        if not self.rules:
            return frozenset(CHANNELS)
        channels, problem = self._verdict(code[: self._longest], len(code))
        if problem is not None:
            raise ValueError(problem)
        return channels

    def _judge(self, first_digits: str, length: int) -> tuple[frozenset[str], str | None]:
        """The channels of a code that starts with ``first_digits`` and has ``length`` digits, or why none."""
        matching = [rule for rule in self.rules if first_digits.startswith(rule.bin)]
        if not matching:
            known = ", ".join(sorted({rule.bin for rule in self.rules}))
            return frozenset(), f"does not start with a configured BIN ({known})"
        problems = [(rule, rule.length_problem(length)) for rule in matching]
        channels = frozenset(rule.channel for rule, problem in problems if problem is None)
        return channels, None if channels else problems[0][1]

    def channels_for(self, code: str) -> frozenset[str] | None:
        """Like :meth:`check`, but None instead of an error when the code breaks the BIN rules."""
        try:
            return self.check(code)
        except ValueError:
            return None
