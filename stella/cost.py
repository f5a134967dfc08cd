"""What a call costs: a route's price (USD per million tokens) applied to its usage.

Money is counted in whole nano-dollars (1e-9 USD): a cheap model's call costs a
fraction of a micro-dollar, and whole numbers add up exactly (in the daily budgets'
buckets, in Redis's usage counters, which take integers only). The log event, the
usage report and the metrics show USD.
"""

from __future__ import annotations

from decimal import Decimal

from stella.settings import Price

NANOS_PER_USD = 1_000_000_000
# A price is per million tokens: USD per million tokens is this many nano-dollars a token.
_NANOS_PER_TOKEN = NANOS_PER_USD / 1_000_000


class Rates:
    """A route's price as nano-dollars per token."""

    __slots__ = ("cached", "input", "output")

    def __init__(self, price: Price) -> None:
        self.input = price.input * _NANOS_PER_TOKEN
        self.output = price.output * _NANOS_PER_TOKEN
        cached = price.input if price.cached_input is None else price.cached_input
        self.cached = cached * _NANOS_PER_TOKEN

    def cost(self, prompt: int, completion: int, cached: int | None = None) -> int:
        """Nano-dollars for `prompt` tokens (of which `cached` read from the upstream's
        cache, billed at its rate) and `completion` tokens, rounded to a whole one."""
        read = min(max(cached or 0, 0), max(prompt, 0))
        return round((prompt - read) * self.input + read * self.cached + completion * self.output)


def rates(price: Price | None) -> Rates | None:
    """The Rates of a route's price; None for an unpriced route."""
    return None if price is None else Rates(price)


def usd(nanos: int) -> float:
    """Nano-dollars as USD."""
    return nanos / NANOS_PER_USD


def nanos(amount_usd: float) -> int:
    """USD (a budget, a logged cost) as whole nano-dollars."""
    return round(amount_usd * NANOS_PER_USD)


def budget_nanos(amount_usd: float) -> int:
    """A daily budget in whole nano-dollars: any budget above 0 is at least one (rounded
    to none, a budget under half a nano-dollar would let a key spend without end)."""
    whole = nanos(amount_usd)
    return 1 if whole < 1 and amount_usd > 0 else whole


def usd_text(amount_usd: float) -> str:
    """A cost in USD to the nano-dollar, as `stella usage` shows it: nine decimals, the
    trailing zeros left out (`0.0000123`, `0`), so rows add up to their total exactly."""
    text = f"{amount_usd:.9f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def usd_decimal(amount_usd: float) -> str:
    """A budget in USD in decimals, every digit it has and never an exponent (`0.00001`,
    not `1e-05`; `2.5`, `0`), as the CLI writes and lists one."""
    return format(Decimal(repr(amount_usd)), "f").removesuffix(".0")
