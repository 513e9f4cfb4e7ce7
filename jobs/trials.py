"""A search's `trials.parquet`: one row per trial (values, best metric, epochs, status).

Kept apart from `jobs.tune` so that reading it (runs show, report) loads neither Ray nor
torch.
"""

from __future__ import annotations

import io
from typing import Any

from jobs.storage import Location, exists, read_bytes, write_bytes

TRIALS_TABLE = "trials.parquet"


def write_trials_table(run: Location, rows: list[dict[str, Any]]) -> None:
    """trials.parquet: one row per trial, readable with pandas/pyarrow anywhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    for name in ("error", "checkpoint_uri"):  # all-null columns would be typed null
        if name in table.column_names:
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, table[name].cast(pa.string()))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(run.join(TRIALS_TABLE), buf.getvalue())


def read_trials_table(run: Location) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    loc = run.join(TRIALS_TABLE)
    if not exists(loc):
        return []
    return pq.read_table(io.BytesIO(read_bytes(loc))).to_pylist()
