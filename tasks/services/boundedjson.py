"""JSON from outside (API bodies, remote data sources, admin forms), parsed only when it is shallow.

`json.loads` is recursive: text nested a thousand arrays deep raises RecursionError (a 500 in a
web process, a crash in a worker), and anything recursive run on what it returns (json.dumps,
pydantic, a tree walk) can do the same at smaller depths. `loads` first measures how deep the
text nests, without recursion and without parsing it, and refuses it (TooDeep, a ValueError)
before json.loads sees it.

The measure: strings are cut out (one regular expression, linear: an unterminated string runs to
the end, so no match is ever retried), what is left is reduced to its brackets, and the deepest
running count of them is the depth. For the part of the text json.loads can parse, that is the
depth it would reach; past the first syntax error json.loads stops anyway, so a wrong count
there can only refuse text that is invalid already.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

# A JSON string, or an unterminated one running to the end of the text. Possessive quantifiers:
# nothing is retried, so the scan is linear whatever the input.
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]++")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}

# How deep a job's arguments may nest where people and clients hand them in: the REST API's job
# bodies and the admin's schedule arguments (documented in docs/security.md, Request limits).
MAX_DEPTH = 32


class TooDeep(ValueError):
    """The text nests arrays and objects deeper than the limit."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"it nests arrays and objects {depth} levels deep; at most {limit} are accepted")
        self.depth, self.limit = depth, limit


def decode(raw: bytes | bytearray | str) -> str:
    """The text of a JSON document, decoded as json.loads decodes bytes (UTF-8, -16 or -32)."""
    if isinstance(raw, str):
        return raw
    return bytes(raw).decode(json.detect_encoding(raw), "surrogatepass")


def depth_of(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (0 for a scalar), without parsing it."""
    brackets = _NOT_A_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:20]} is too large a number")
    return number


def loads(raw: bytes | bytearray | str, *, max_depth: int, allow_nan: bool = False) -> Any:
    """json.loads, after refusing text nested deeper than `max_depth` (TooDeep).

    NaN, Infinity and numbers too large for a float (1e999) are refused too unless `allow_nan`:
    they are not JSON, and PostgreSQL's jsonb refuses them. Every error is a ValueError: TooDeep,
    UnicodeDecodeError, json.JSONDecodeError, or the ValueError of an integer too long to convert.
    """
    text = decode(raw)
    depth = depth_of(text)
    if depth > max_depth:
        raise TooDeep(depth, max_depth)
    if allow_nan:
        return json.loads(text)
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
