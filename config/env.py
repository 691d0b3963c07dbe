"""Typed readers for environment variables.

Every setting that comes from the environment goes through one of these, so a
bad value fails at start-up with ``ImproperlyConfigured`` naming the variable
instead of surfacing later as a confusing error deep inside a worker.

URL parsing for databases and SMTP is delegated to django-environ, which knows
every backend's scheme; the wrappers here only add strictness and the variable
name to the error.
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_ENV_LINE = re.compile(r"\A(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)\Z")
_FALSE = {"0", "false", "no", "off", ""}


class Env:
    """Reads variables from a mapping (``os.environ`` unless told otherwise)."""

    def __init__(self, environ_: Mapping[builtins.str, builtins.str] | None = None) -> None:
        self._environ = os.environ if environ_ is None else environ_

    def _raw(self, name: builtins.str) -> builtins.str | None:
        value = self._environ.get(name)
        return None if value is None else value.strip()

    def str(
        self, name: builtins.str, default: builtins.str | None = None, *, required: builtins.bool = False
    ) -> builtins.str:
        value = self._raw(name)
        if value:
            return value
        if required or default is None:
            raise ImproperlyConfigured(f"{name} must be set (it has no default).")
        return default

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ImproperlyConfigured(
            f"{name}={value!r} is not a boolean; use one of true/false, yes/no, on/off, 1/0."
        )

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        min_value: builtins.int | None = None,
        max_value: builtins.int | None = None,
    ) -> builtins.int:
        return builtins.int(self._number(name, default, builtins.int, "an integer", min_value, max_value))

    def float(
        self,
        name: builtins.str,
        default: builtins.float,
        *,
        min_value: builtins.float | None = None,
        max_value: builtins.float | None = None,
    ) -> builtins.float:
        return builtins.float(self._number(name, default, builtins.float, "a number", min_value, max_value))

    def _number(
        self,
        name: builtins.str,
        default: builtins.float,
        kind: type[builtins.int] | type[builtins.float],
        described: builtins.str,
        min_value: builtins.float | None,
        max_value: builtins.float | None,
    ) -> builtins.float:
        value = self._raw(name)
        if not value:
            return default
        try:
            number = kind(value)
        except ValueError:
            raise ImproperlyConfigured(f"{name}={value!r} is not {described}.") from None
        if min_value is not None and number < min_value:
            raise ImproperlyConfigured(f"{name}={number} is too small (minimum {min_value}).")
        if max_value is not None and number > max_value:
            raise ImproperlyConfigured(f"{name}={number} is too large (maximum {max_value}).")
        return number

    def list(self, name: builtins.str, default: builtins.list[builtins.str]) -> builtins.list[builtins.str]:
        value = self._raw(name)
        if value is None:
            return list(default)
        return [item.strip() for item in value.split(",") if item.strip()]

    def rate(self, name: builtins.str, default: builtins.str) -> builtins.str:
        """A rate such as `10/second` or `600/minute` (the `limits` library's notation)."""
        from limits import parse

        value = self._raw(name) or default
        try:
            parse(value)
        except ValueError:
            raise ImproperlyConfigured(
                f"{name}={value!r} is not a rate; write it as N/second, N/minute or N/hour."
            ) from None
        return value

    def retry_policy(
        self, name: builtins.str
    ) -> builtins.tuple[builtins.int, builtins.float, builtins.float] | None:
        """`attempts,base,cap` (e.g. `13,10,1200`: 13 attempts in all, waits from 10 s up to 1,200 s);
        None when unset (the task family's own policy, tasks/retries.py)."""
        value = self._raw(name)
        if not value:
            return None
        usage = "write it as attempts,base,cap, e.g. 13,10,1200"
        parts = [part.strip() for part in value.split(",")]
        try:
            attempts, base, cap = builtins.int(parts[0]), builtins.float(parts[1]), builtins.float(parts[2])
        except (ValueError, IndexError):
            raise ImproperlyConfigured(f"{name}={value!r} is not a retry policy; {usage}.") from None
        if len(parts) != 3:
            raise ImproperlyConfigured(f"{name}={value!r} is not a retry policy; {usage}.")
        if not 1 <= attempts <= 100:
            raise ImproperlyConfigured(f"{name}={value!r}: attempts must be 1-100.")
        if not 0.01 <= base <= cap <= 7 * 24 * 3600:
            raise ImproperlyConfigured(
                f"{name}={value!r}: base and cap are seconds with 0.01 <= base <= cap <= 604800 (7 days)."
            )
        return attempts, base, cap

    def choice(
        self, name: builtins.str, default: builtins.str, choices: builtins.list[builtins.str]
    ) -> builtins.str:
        value = self._raw(name) or default
        if value not in choices:
            raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}.")
        return value

    def subset(
        self, name: builtins.str, default: builtins.list[builtins.str], choices: builtins.list[builtins.str]
    ) -> builtins.tuple[builtins.str, ...]:
        """A comma-separated list of some of `choices` (compared in upper case), at least one."""
        values = [item.upper() for item in self.list(name, default)]
        unknown = [item for item in values if item not in choices]
        if unknown or not values:
            raise ImproperlyConfigured(
                f"{name}={self._raw(name)!r}: {', '.join(unknown) or 'empty'} is not allowed; "
                f"choose from {', '.join(choices)}."
            )
        return tuple(dict.fromkeys(values))

    def database(self, name: builtins.str, default: builtins.str) -> dict[builtins.str, Any]:
        url = self._raw(name) or default
        try:
            config: dict[builtins.str, Any] = environ.Env.db_url_config(url)
        except Exception as exc:  # django-environ raises several types for bad URLs
            raise ImproperlyConfigured(f"{name} is not a valid database URL: {exc}") from None
        engines = set(environ.Env.DB_SCHEMES.values())
        if config.get("ENGINE") not in engines:
            scheme = urlsplit(url).scheme
            raise ImproperlyConfigured(
                f"{name} has an unsupported database scheme {scheme!r}; "
                "use postgres://user@host:port/name or sqlite:////absolute/path."
            )
        return config

    def email(self, name: builtins.str, default: builtins.str) -> dict[builtins.str, Any]:
        url = self._raw(name) or default
        try:
            config: dict[builtins.str, Any] = environ.Env.email_url_config(url)
        except Exception as exc:
            raise ImproperlyConfigured(f"{name} is not a valid email URL: {exc}") from None
        if not config.get("EMAIL_BACKEND"):
            raise ImproperlyConfigured(f"{name} has an unsupported email scheme.")
        # Unset parts stay at Django's defaults instead of becoming None.
        return {key: value for key, value in config.items() if value not in (None, "")}

    def broker_url(self, name: builtins.str, default: builtins.str) -> builtins.str:
        url = self._raw(name) or default
        scheme = urlsplit(url).scheme
        if scheme not in {"redis", "rediss", "valkey", "amqp", "amqps", "pyamqp"}:
            raise ImproperlyConfigured(
                f"{name}={scheme + '://...' if scheme else repr(url)} is not a supported broker URL; "
                "use redis://, rediss:// or amqp://."
            )
        # kombu knows Valkey by the Redis name: it speaks the same protocol.
        if scheme == "valkey":
            url = "redis" + url[len("valkey") :]
        return url


def read_dot_env(path: Path, into: MutableMapping[builtins.str, builtins.str] | None = None) -> builtins.bool:
    """Adds the `NAME=value` lines of a .env file to the environment; variables already set win.

    The format is the common subset every dotenv reader agrees on (what `bin/run` writes): one
    `NAME=value` a line, optionally `export `, the value optionally in single or double quotes
    (taken literally: no escapes, no `$VAR` expansion), `#` comment lines. A line that is none of
    these is an error naming the file and line. Returns whether the file was there.
    """
    target = os.environ if into is None else into
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if match is None:
            raise ImproperlyConfigured(f"{path}, line {number}: not NAME=value: {line[:40]!r}")
        name, value = match[1], match[2].strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        target.setdefault(name, value)
    return True
