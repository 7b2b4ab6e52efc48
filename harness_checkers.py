"""The strict value checkers of the config keys (fastargs ``Checker`` subclasses) and the one-line
``ConfigError`` they end in: what a single value may be, whatever key it belongs to.  Which key
takes which checker, and the checks across keys: ``harness_params.py``."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from fastargs.validation import Checker

from utils.core.user_code import is_import_path
from utils.pruning.nm import parse_nm
from utils.pruning.schedules import parse_layer_rates


class ConfigError(ValueError):
    """A bad config; the message is one line naming the key, the value and what is allowed."""


# ----------------------------------------------------------------------------- checkers
class StrictInt(Checker):
    def __init__(self, low: float = -math.inf, high: float = math.inf):
        self.low, self.high = low, high

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise TypeError(value)
        if not self.low <= value <= self.high:
            raise ValueError(value)
        return value

    def help(self):
        return _range_help("an integer", self.low, self.high, True, True)


class StrictFloat(Checker):
    def __init__(self, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(value)
        value = float(value)
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if too_low or too_high or math.isnan(value):
            raise ValueError(value)
        return value

    def help(self):
        return _range_help("a number", self.low, self.high, not self.low_open, not self.high_open)


def _range_help(kind: str, low, high, low_closed: bool, high_closed: bool) -> str:
    if low == -math.inf and high == math.inf:
        return kind
    left = "[" if low_closed else "("
    right = "]" if high_closed else ")"
    lo = "-inf" if low == -math.inf else f"{low:g}"
    hi = "inf" if high == math.inf else f"{high:g}"
    return f"{kind} in {left}{lo}, {hi}{right}"


class StrictBool(Checker):
    def check(self, value):
        if isinstance(value, bool):
            return value
        raise TypeError(value)

    def help(self):
        return "true or false"


class BoolOrAuto(Checker):
    def check(self, value):
        if isinstance(value, bool) or value == "auto":
            return value
        raise TypeError(value)

    def help(self):
        return "true, false or auto"


class StrictStr(Checker):
    def check(self, value):
        if isinstance(value, str):
            return value
        raise TypeError(value)

    def help(self):
        return "a string"


class Choice(Checker):
    def __init__(self, choices: Sequence[str]):
        self.choices = list(choices)

    def check(self, value):
        if value not in self.choices:
            raise ValueError(value)
        return value

    def help(self):
        return "one of " + ", ".join(self.choices)


class ListOf(Checker):
    def __init__(self, item: Checker, length: Optional[int] = None):
        self.item, self.length = item, length

    def check(self, value):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise TypeError(value)
        if self.length is not None and len(value) != self.length:
            raise ValueError(value)
        return [self.item.check(v) for v in value]

    def help(self):
        n = f"{self.length} " if self.length is not None else ""
        return f"a list of {n}items, each {self.item.help()}"


class Optional_(Checker):
    """``null`` (None) or the inner checker's value."""

    def __init__(self, inner: Checker):
        self.inner = inner

    def check(self, value):
        return None if value is None else self.inner.check(value)

    def help(self):
        return f"{self.inner.help()}, or null"


class NameOrImport(Checker):
    """A registry name, or ``package.module:function`` (syntax here; the import itself is
    checked in ``check_cross_fields``, so the refusal can say why it failed)."""

    def __init__(self, choices: Sequence[str]):
        self.choices = list(choices)

    def check(self, value):
        if value in self.choices or is_import_path(value):
            return value
        raise ValueError(value)

    def help(self):
        return "one of " + ", ".join(self.choices) + ", or package.module:function"


class LayerRates(Checker):
    """A list of ``"pattern=rate"`` strings (a single string with commas on the command line)."""

    def check(self, value):
        if isinstance(value, str):
            value = [part for part in (p.strip() for p in value.split(",")) if part]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise TypeError(value)
        parse_layer_rates(value)  # ValueError for a bad item
        return [item.strip() for item in value]

    def help(self):
        return 'a list of "pattern=rate" strings (fnmatch layer-name pattern, rate in [0, 1)), e.g. ["conv*=0.1", "fc*=0.2"]'


class NMPattern(Checker):
    """``"N:M"``: N weights kept of every M consecutive inputs (utils/pruning/nm.py).

    YAML 1.1 reads an unquoted ``2:4`` (in a file or in ``--prune.nm=2:4``) as the base-60 number
    2 * 60 + 4 = 124; such a number is read back as the N:M it was written as (M < 60 there)."""

    @staticmethod
    def as_written(value):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return f"{value // 60}:{value % 60}"
        return value

    def check(self, value):
        value = self.as_written(value)
        parse_nm(value)  # NMError (a ValueError) for a bad pattern
        return value

    def display(self, value):
        return repr(self.as_written(value))

    def help(self):
        return 'a pattern "N:M" with 1 <= N < M, e.g. "2:4"'
