"""The value checks shared by the config, the objectives, the evaluation and the data readers, so a field fails with
the same message wherever it is checked: the name, the value, and what to change."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["Choice", "Range"]


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: ``low``/``high`` bounds (open or closed), integer or real.

    NaN and inf are refused everywhere: a NaN ``beta`` or ``safeguard_mu`` would make every step non-finite and
    training skip them all while still "finishing".
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False
    #: the word ``"auto"`` is accepted too (a value the run chooses itself)
    or_auto: bool = False
    hint: str = ""

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"lie in {left}{self.low:g}, {self.high:g}{right}"
        if self.low == 0 and self.low_open:
            return "be positive"
        if self.low is not None:
            return f"be {'>' if self.low_open else '>='} {self.low:g}"
        return "be finite"

    def check(self, name: str, value: Any) -> Any:
        """``value`` (``float`` for a real field, unchanged for an integer or a ``None`` allowed by ``optional``),
        or a ``ValueError`` naming ``name``, the value and, with ``hint``, what to use instead."""
        if value is None and self.optional:
            return None
        if self.or_auto and value == "auto":
            return value
        hint = f" {self.hint}" if self.hint else ""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            kind = "an integer" if self.integer else "a real number"
            yaml = " (In YAML 5e3 is read as a string: write 5.0e+3.)" if isinstance(value, str) else ""
            optional = " or None" if self.optional else ""
            optional += " or 'auto'" if self.or_auto else ""
            raise ValueError(f"{name} must be {kind}{optional}, got {value!r} ({type(value).__name__}).{yaml}{hint}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}.{hint}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ValueError(f"{name} must {self.describe()}, got {value!r}.{hint}")
        return value if self.integer else float(value)


@dataclass(frozen=True)
class Choice:
    """The allowed values of a field that names one of a few options, listed in the order given (a table's keys:
    ``Choice(tuple(table))``), so the message reads as the documentation does, the default usually first."""

    options: tuple[str, ...]
    optional: bool = False  # None allowed too (the field's default is chosen elsewhere)

    def check(self, name: str, value: Any) -> str | None:
        """``value`` if it is one of ``options`` (or ``None`` with ``optional``), else a ``ValueError`` naming
        ``name``, the value and the options."""
        if value is None and self.optional:
            return None
        if value not in self.options:
            optional = " or None" if self.optional else ""
            raise ValueError(f"{name} must be one of {list(self.options)}{optional}, got {value!r}.")
        return value
