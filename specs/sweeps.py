"""Declarative sweeps: a spec's ``sweep:`` (parameter -> values) makes every manifest row of that spec render each
combination, as rows of their own, as the manifest streams (a batch at a time: the product is never held for
the whole manifest).

A combination's position ``k`` counts the product in the order the spec lists the parameters, the last varying
fastest (``sweep: {seed: [1, 2], ip_scale: [0.3, 0.6]}``: k=0 seed 1 / 0.3, k=1 seed 1 / 0.6, k=2 seed 2 / 0.3,
...). Its row's id is ``<id>.s<k>`` (``cat.s3``): inside the id pattern, so the id rules hold for it, and the
census finds it colliding with a real id like any other duplicate. The swept values replace the row's own cells.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from ipaflow.specs.manifest import RowBatch, column_of
from ipaflow.specs.registry import SpecRegistry


def combinations(sweep: dict[str, list]) -> list[dict]:
    """The sweep's combinations in product order (the position in this list is ``k``)."""
    names = list(sweep)
    return [dict(zip(names, values)) for values in itertools.product(*(sweep[name] for name in names))]


def derived_id(row_id: str, k: int) -> str:
    return f"{row_id}.s{k}"


def expander(registry: SpecRegistry) -> Callable[[RowBatch, tuple | None, int], Iterator[RowBatch]] | None:
    """The expansion of the registry's swept specs, for ``Manifest.expand``; None when no spec sweeps."""
    sweeps = {name: combinations(registry.get(name).sweep) for name in registry.names() if registry.get(name).sweep}
    if not sweeps:
        return None

    def expand(batch: RowBatch, columns: tuple | None, batch_rows: int) -> Iterator[RowBatch]:
        specs = batch.values("spec")
        found = [sweeps.get(name) if isinstance(name, str) else None for name in specs]
        counts = np.array([len(combos) if combos else 1 for combos in found], dtype=np.int64)
        if not any(found):
            yield batch
            return
        take = np.repeat(np.arange(batch.num_rows), counts)
        starts = np.cumsum(counts) - counts
        position = np.arange(len(take)) - np.repeat(starts, counts)
        indices = pa.array(take)
        expanded: dict[str, pa.Array | list] = {
            name: [column[i] for i in take] if isinstance(column, list) else column.take(indices)
            for name, column in batch.columns.items()}
        ids = batch.values("id")
        new_ids = []
        for j, row in enumerate(take.tolist()):
            row_id = ids[row]
            if found[row] and isinstance(row_id, (str, int)) and not isinstance(row_id, bool):
                row_id = derived_id(str(row_id), int(position[j]))
            new_ids.append(row_id)
        expanded["id"] = column_of(new_ids)
        swept = {key for combos in found if combos for key in combos[0]}
        for key in sorted(swept):
            if columns is not None and key not in columns:
                continue
            values = [None] * len(take) if key not in expanded else \
                (expanded[key] if isinstance(expanded[key], list) else expanded[key].to_pylist())
            values = list(values)
            for j, row in enumerate(take.tolist()):
                if found[row] and key in found[row][0]:
                    values[j] = found[row][int(position[j])][key]
            expanded[key] = column_of(values)
        whole = RowBatch(start=batch.start, num_rows=len(take), columns=expanded, base=batch.base)
        for offset in range(0, whole.num_rows, batch_rows):
            yield whole.slice(offset, batch_rows)

    return expand
