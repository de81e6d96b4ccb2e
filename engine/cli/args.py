"""Argument types for the `offramp` command: every numeric option is checked by argparse, so a
value like `--epochs -1` or `--max-loss nan` is refused in one line before any work starts.

Each factory returns a callable for `add_argument(type=...)`; it raises ArgumentTypeError with a
message saying what is allowed, which argparse prints after the option's name.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Iterator, Sequence


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr ("offramp run: error: ...; see
    `offramp run --help`"), exit status 2, instead of a usage block and the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A whole number in [low, high] (either end may be open: None)."""
    def parse(text: str) -> int:
        value = _number(text, int)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a whole number {_range(low, high)}")
        return value
    parse.__name__ = "whole number"
    return parse


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False,
         high_open: bool = False) -> Callable[[str], float]:
    """A finite number in the range [low, high]; `low_open` / `high_open` exclude that end."""
    def parse(text: str) -> float:
        value = _number(text, float)
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number "
                                             f"{_range(low, high, low_open, high_open)}")
        return value
    parse.__name__ = "number"
    return parse


def number_list(item: Callable[[str], float | int], *, what: str = "numbers") -> Callable[[str], list]:
    """A comma-separated list of values each accepted by `item`, e.g. "0,0,1"."""
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what}, e.g. 0,1,2")
        try:
            return [item(p) for p in parts]
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"in {text!r}: {err}") from None
    parse.__name__ = "list"
    return parse


class LazyChoices:
    """An option's choices read (by `load()`, e.g. from a registry) only when argparse needs them —
    to check a value, or to print help or an error — so that building the parser imports nothing
    heavy. Give the option a metavar: argparse would list the choices in the usage line otherwise."""

    def __init__(self, load: Callable[[], Sequence[str]]):
        self._load = load

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __contains__(self, value: object) -> bool:
        return value in self._load()


class Deferred:
    """Text made when it is printed: set it as an attribute of an argparse action and name it in
    the help string (`%(name)s`), for help read from a registry (see `LazyChoices`)."""

    def __init__(self, make: Callable[[], str]):
        self._make = make

    def __str__(self) -> str:
        return self._make()


def sha256_hex(text: str) -> str:
    """A SHA-256 digest: 64 hexadecimal digits (as `sha256sum` prints them), lower-cased."""
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 digest: give the 64 hex digits sha256sum prints")
    return digest


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    lo = None if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = None if high is None else f"{'<' if high_open else '<='} {high:g}"
    if lo and hi:
        return f"{lo} and {hi}"
    return lo or hi or "(any)"


# The shapes every command's options take.
positive_int = integer(1)  # epochs, batch sizes, image counts
nonnegative_int = integer(0)  # seeds, thread counts (0 = the library's choice)
seed = integer(0, 2**63 - 1)
fraction = real(0.0, 1.0, low_open=True)  # (0, 1]: a part of something that must not be empty
held_out = real(0.0, 1.0, low_open=True, high_open=True)  # (0, 1): a held-out part, with training data left
unit = real(0.0, 1.0)  # [0, 1]: a weight, a budget position, a probability threshold
points = real(0.0, 100.0)  # accuracy points
positive = real(0.0, low_open=True)  # a learning rate
nonnegative = real(0.0)  # a price of compute
smoothing = real(0.0, 1.0, high_open=True)  # [0, 1): label smoothing

