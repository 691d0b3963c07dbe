"""The few statements on the hot paths (a worker's per-job claim and outcome, enqueue's INSERT and
published mark), in SQL of their own, built once per database.

Django's building of a statement (query compiler, lookups, expressions) cost about 0.4 ms a statement
on the reference machine, against about 0.1 ms for PostgreSQL to run it, on every job: these are
written here instead. Table and column names come from the models and values are prepared by the
models' fields, as the ORM does; the text of each statement is built once per database vendor and
shape, then reused (`statement`). `on` is the connection (default: the default database's).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

from django.db import connection as default_connection
from django.db.models import Field, Model

_built: dict[tuple[str, Hashable], str] = {}


def statement(key: Hashable, build: Callable[[], str], on: Any = None) -> str:
    """The SQL text `build()` gives for `key` on the connection's database, built once."""
    cache_key = ((on or default_connection).vendor, key)
    sql = _built.get(cache_key)
    if sql is None:
        sql = _built[cache_key] = build()
    return sql


def field(model: type[Model], name: str) -> Field[Any, Any]:
    found = model._meta.get_field(name)
    assert isinstance(found, Field)
    return found


def column(model: type[Model], name: str, on: Any = None) -> str:
    """`model`'s column for field `name`, quoted for the connection's database."""
    return str((on or default_connection).ops.quote_name(field(model, name).column or name))


def table(model: type[Model], on: Any = None) -> str:
    return str((on or default_connection).ops.quote_name(model._meta.db_table))


def values(
    model: type[Model], names: tuple[str, ...], given: tuple[Any, ...] | list[Any], on: Any = None
) -> list[Any]:
    """`given`, prepared for the database by `model`'s fields `names`, as the ORM prepares them."""
    conn = on or default_connection
    pairs = zip(names, given, strict=True)
    return [field(model, name).get_db_prep_value(value, conn) for name, value in pairs]


def insert(objs: Sequence[Model], *, prefix: str = "", on: Any = None) -> None:
    """INSERT new instances `objs` of one model in one statement (`prefix`: statements sent before it
    in the same query), their defaults filled in as the ORM's bulk_create fills them. Their primary
    keys must be set already (a default in Python, as a UUID's): none is read back."""
    conn = on or default_connection
    model = type(objs[0])
    fields = model._meta.concrete_fields

    def build() -> str:
        columns = ", ".join(column(model, f.name, conn) for f in fields)
        row = "(" + ", ".join(["%s"] * len(fields)) + ")"
        rows = ", ".join([row] * len(objs))
        return f"{prefix}INSERT INTO {table(model, conn)} ({columns}) VALUES {rows}"  # noqa: S608 (model names)

    sql = statement(("insert", model._meta.label, prefix), build, conn) if len(objs) == 1 else build()
    params = [f.get_db_prep_save(f.pre_save(obj, add=True), conn) for obj in objs for f in fields]
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
    for obj in objs:
        obj._state.adding = False
        obj._state.db = conn.alias


def insert_all(objs: Sequence[Model], *, on: Any = None, batch_size: int = 1000) -> None:
    """`insert` in batches of at most `batch_size`, or fewer where the database takes fewer values in
    one statement (as bulk_create batches them)."""
    if not objs:
        return
    conn = on or default_connection
    fields = type(objs[0])._meta.concrete_fields
    size = max(1, min(batch_size, conn.ops.bulk_batch_size(fields, objs)))
    for start in range(0, len(objs), size):
        insert(objs[start : start + size], on=conn)
