"""The few statements on the hot paths (a worker's per-job claim and outcome, enqueue's INSERT and
published mark), in SQL of their own, built once per database.

Django's building of a statement (query compiler, lookups, expressions) cost about 0.4 ms a statement
on the reference machine, against about 0.1 ms for PostgreSQL to run it, on every job: these are
written here instead. Table and column names come from the models and values are prepared by the
models' fields, as the ORM does; the text of each statement is built once per database vendor and
shape, then reused (`statement`). `on` is the connection (default: the default database's).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection as default_connection
from django.db import connections
from django.db.models import Field, JSONField, Model

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
    one statement (as bulk_create batches them).

    PostgreSQL: each batch is one statement with one parameter, the rows as a JSON array read by
    `jsonb_to_recordset` (`_insert_from_json`). A VALUES list of a parameter per value made psycopg
    split the statement text and quote every value in Python: a quarter of a 1,000-job
    `POST /api/jobs/batch` (issue 18), and the reason Django's UNNEST arrays were avoided for
    children carrying a sync's records.
    """
    if not objs:
        return
    conn = on or default_connection
    if conn.vendor == "postgresql" and len(objs) > 1:
        conn = connections[conn.alias]  # the connection itself, not the proxy: ~20 lookups a row
        for start in range(0, len(objs), batch_size):
            _insert_from_json(objs[start : start + batch_size], conn)
        return
    fields = type(objs[0])._meta.concrete_fields
    size = max(1, min(batch_size, conn.ops.bulk_batch_size(fields, objs)))
    for start in range(0, len(objs), size):
        insert(objs[start : start + size], on=conn)


def _insert_from_json(objs: Sequence[Model], conn: Any) -> None:
    """PostgreSQL: INSERT new instances `objs` of one model from one JSON document (see insert_all).

    Each value is prepared by its field as the ORM prepares it, then written as JSON: a JSON field's
    value as itself (a JSON null read back as SQL NULL, which the ORM reads as None either way),
    UUIDs, dates and decimals as text that PostgreSQL casts to the column's type.
    """
    model = type(objs[0])
    fields = model._meta.concrete_fields

    def build() -> str:
        names = [str(f.column) for f in fields]
        columns = ", ".join(conn.ops.quote_name(name) for name in names)
        selected = ", ".join(
            f"NULLIF(r.{conn.ops.quote_name(name)}, 'null'::jsonb)"
            if isinstance(f, JSONField)
            else f"r.{conn.ops.quote_name(name)}"
            for name, f in zip(names, fields, strict=True)
        )
        record = ", ".join(
            f"{conn.ops.quote_name(name)} {f.db_type(conn)}" for name, f in zip(names, fields, strict=True)
        )
        return (
            f"INSERT INTO {table(model, conn)} ({columns}) SELECT {selected} "  # noqa: S608 (model names)
            f"FROM jsonb_to_recordset(%s::jsonb) AS r({record})"
        )

    keys = [str(f.column) for f in fields]
    rows = [
        {
            key: _as_json(f.get_db_prep_save(f.pre_save(obj, add=True), conn))
            for key, f in zip(keys, fields, strict=True)
        }
        for obj in objs
    ]
    with conn.cursor() as cursor:
        cursor.execute(
            statement(("insert from json", model._meta.label), build, conn),
            [json.dumps(rows, cls=_Encoder, separators=(",", ":"))],
        )
    for obj in objs:
        obj._state.adding = False
        obj._state.db = conn.alias


def _as_json(value: Any) -> Any:
    """A value a field prepared for PostgreSQL, as JSON can carry it: psycopg's Json/Jsonb wrapper (a
    JSON field's) unwrapped; the rest as `_Encoder` writes it."""
    return cast(Any, value).obj if isinstance(value, _json_wrappers()) else value


@functools.cache
def _json_wrappers() -> tuple[type, ...]:
    from psycopg.types.json import Json, Jsonb

    return (Json, Jsonb)


class _Encoder(DjangoJSONEncoder):
    """Dates and times in full (DjangoJSONEncoder keeps milliseconds only), for PostgreSQL to cast."""

    def default(self, o: Any) -> Any:
        if isinstance(o, datetime.datetime | datetime.date | datetime.time):
            return o.isoformat()
        return super().default(o)
