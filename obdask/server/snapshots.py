"""Parquet snapshots of the metrics tables, so history survives a scheduler restart.

With ``obdask.metrics.snapshot-url`` set, :class:`~obdask.server.metrics.MetricsExtension`
writes its job and token tables every ``obdask.metrics.snapshot-interval`` to
``<url>/jobs.parquet`` and ``<url>/tokens.parquet`` through fsspec (any protocol
``obdask.storage-options`` reaches), off the event loop, and reads them back when
it starts.  pyarrow only (no pandas on the scheduler): a column whose values are
all integers, all numbers, all booleans or all strings keeps that type; any other column
(lists, mixed types) is stored as JSON text and named in the file's metadata, so
:func:`from_table` gives the records back as they were (None values left out).
"""

from __future__ import annotations

import json
import logging
import posixpath
from typing import Any

logger = logging.getLogger(__name__)

TABLES = ("jobs", "tokens")
_JSON_KEY = b"obdask-json-columns"


def _column_type(values: list[Any]) -> str:
    present = [v for v in values if v is not None]
    if all(isinstance(v, bool) for v in present):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63 for v in present):
        return "int"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    if all(isinstance(v, str) for v in present):
        return "string"
    return "json"


def to_table(rows: list[dict[str, Any]]) -> Any:
    """A pyarrow Table of ``rows`` (see the module docstring for the column types)."""
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))
    arrays, json_cols = [], []
    for key in keys:
        values = [r.get(key) for r in rows]
        kind = _column_type(values)
        if kind == "json":
            json_cols.append(key)
            values = [None if v is None else json.dumps(v, default=str) for v in values]
            kind = "string"
        elif kind == "float":
            values = [None if v is None else float(v) for v in values]
        arrays.append(pa.array(values, type={"bool": pa.bool_(), "int": pa.int64(),
                                             "float": pa.float64(), "string": pa.string()}[kind]))
    table = pa.Table.from_arrays(arrays, names=keys)
    return table.replace_schema_metadata({_JSON_KEY: json.dumps(json_cols).encode()})


def from_table(table: Any) -> list[dict[str, Any]]:
    """The records of a table :func:`to_table` made (None values left out)."""
    meta = table.schema.metadata or {}
    json_cols = set(json.loads(meta.get(_JSON_KEY, b"[]")))
    rows = []
    for row in table.to_pylist():
        rows.append({k: json.loads(v) if k in json_cols else v
                     for k, v in row.items() if v is not None})
    return rows


def _fs(url: str) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    from obdask.config import storage_options

    return url_to_fs(url, **storage_options(url))


def write_tables(url: str, tables: dict[str, list[dict[str, Any]]]) -> None:
    """Write each table to ``<url>/<name>.parquet`` (a temporary file, then moved)."""
    import pyarrow.parquet as pq

    fs, root = _fs(url)
    fs.makedirs(root, exist_ok=True)
    for name, rows in tables.items():
        path = posixpath.join(root, f"{name}.parquet")
        tmp = path + ".tmp"
        with fs.open(tmp, "wb") as f:
            pq.write_table(to_table(rows), f)
        fs.mv(tmp, path)


def read_tables(url: str) -> dict[str, list[dict[str, Any]]]:
    """The tables under ``url`` (an empty list for a table never written)."""
    import pyarrow.parquet as pq

    fs, root = _fs(url)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in TABLES:
        path = posixpath.join(root, f"{name}.parquet")
        if not fs.exists(path):
            out[name] = []
            continue
        with fs.open(path, "rb") as f:
            out[name] = from_table(pq.read_table(f))
    return out
