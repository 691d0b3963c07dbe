"""The few statements of the worker's per-job path, in SQL of their own, built once per database.

Django's building of a statement (query compiler, lookups, expressions) cost about 0.4 ms a statement
on the reference machine, against about 0.1 ms for PostgreSQL to run it, on every job: the claim, the
outcome and the "who waits for me" question are written here instead. Table and column names come from
the models and values are prepared by the models' fields, as the ORM does; the text of each statement is
built once per database vendor and shape, then reused (`statement`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from django.db import connection
from django.db.models import Field, Model

_built: dict[tuple[str, Hashable], str] = {}


def statement(key: Hashable, build: Callable[[], str]) -> str:
    """The SQL text `build()` gives for `key` on the default connection's database, built once."""
    cache_key = (connection.vendor, key)
    sql = _built.get(cache_key)
    if sql is None:
        sql = _built[cache_key] = build()
    return sql


def field(model: type[Model], name: str) -> Field[Any, Any]:
    found = model._meta.get_field(name)
    assert isinstance(found, Field)
    return found


def column(model: type[Model], name: str) -> str:
    """`model`'s column for field `name`, quoted for the default connection's database."""
    return str(connection.ops.quote_name(field(model, name).column or name))


def table(model: type[Model]) -> str:
    return str(connection.ops.quote_name(model._meta.db_table))


def values(model: type[Model], names: tuple[str, ...], given: tuple[Any, ...] | list[Any]) -> list[Any]:
    """`given`, prepared for the database by `model`'s fields `names`, as the ORM prepares them."""
    return [
        field(model, name).get_db_prep_value(value, connection)
        for name, value in zip(names, given, strict=True)
    ]
