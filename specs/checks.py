"""Vectorised row checks: a conservative pre-filter over a batch's Arrow columns.

``vouch`` marks the rows that the checks of ``specs.rows`` would certainly accept, judged a whole column at a
time (types, bounds, required cells, URI shapes). It may refuse to vouch for a good row (an odd type, a text
cell holding a number, a regional mask): such rows, and every bad one, go through ``specs.rows.resolve_row``,
which produces the column-named messages. It must never vouch for a row that ``resolve_row`` rejects; the
property test in tests/unit/test_stream_properties.py compares the two on random rows.

The rules are not restated: bounds come from the ``Params`` model's own constraints, the id pattern and limits
from ``specs.rows``, and ``build_job`` resolves vouched rows with the same conversion functions ``resolve_row``
uses, skipping only the validation the columns already passed.
"""

from __future__ import annotations

import posixpath
from typing import Any

import annotated_types
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ipaflow.specs.manifest import FLOAT_COLUMNS, INPUT_COLUMNS, INT_COLUMNS, KNOWN_COLUMNS, RowBatch, Undecodable
from ipaflow.specs.registry import SpecRegistry
from ipaflow.specs.rows import (
    MAX_INPUTS_PER_CELL,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    RESERVED_IDS,
    ROW_ID_PATTERN,
    URI_SCHEME,
    Job,
    default_seed,
    storable,
)
from ipaflow.specs.spec import Params, Spec
from ipaflow.specs.templates import is_template

TEXT_PARAMS = ("prompt", "negative_prompt")
PARAM_COLUMNS = TEXT_PARAMS + tuple(c for c in INT_COLUMNS if c != "seed") + FLOAT_COLUMNS
# A URI or path cell the exact check leaves as it is: printable ASCII at both ends (so strip() changes nothing),
# no NUL, not a JSON list where a list is allowed.
_URI = r"^[!-~](.*[!-~])?$"
_MAX_SAFE_FLOAT_INT = 2**53


def _bounds(name: str) -> dict[str, float]:
    """The numeric constraints of a ``Params`` field (ge, gt, le, lt, multiple_of), read from the model."""
    found: dict[str, float] = {}
    for item in Params.model_fields[name].metadata:
        for key, kind in (("ge", annotated_types.Ge), ("gt", annotated_types.Gt), ("le", annotated_types.Le),
                          ("lt", annotated_types.Lt), ("multiple_of", annotated_types.MultipleOf)):
            if isinstance(item, kind):
                found[key] = getattr(item, key)
    return found


BOUNDS = {name: _bounds(name) for name in PARAM_COLUMNS if name not in TEXT_PARAMS}


def _present(column: pa.Array | list | None, n: int) -> np.ndarray:
    if column is None:
        return np.zeros(n, dtype=bool)
    if isinstance(column, list):
        return np.array([value is not None for value in column], dtype=bool)
    return column.is_valid().to_numpy(zero_copy_only=False)


def _numbers(column: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.cast(column, pa.float64(), safe=False), 0.0).to_numpy(zero_copy_only=False)


def _is_int(column) -> bool:
    return isinstance(column, pa.Array) and pa.types.is_integer(column.type)


def _is_float(column) -> bool:
    return isinstance(column, pa.Array) and pa.types.is_floating(column.type)


def _is_text(column) -> bool:
    return isinstance(column, pa.Array) and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type))


def _in_bounds(values: np.ndarray, bounds: dict[str, float]) -> np.ndarray:
    ok = np.isfinite(values)
    if "ge" in bounds:
        ok &= values >= bounds["ge"]
    if "gt" in bounds:
        ok &= values > bounds["gt"]
    if "le" in bounds:
        ok &= values <= bounds["le"]
    if "lt" in bounds:
        ok &= values < bounds["lt"]
    if "multiple_of" in bounds:
        ok &= np.fmod(values, bounds["multiple_of"]) == 0
    return ok


def _integral_ok(column, bounds: dict[str, float]) -> np.ndarray:
    """Cells ``_integral`` takes (integers; integral floats) within ``bounds``."""
    n = len(column)
    if _is_int(column) and not pa.types.is_uint64(column.type):
        return _in_bounds(_numbers(column), bounds)
    if _is_float(column):
        values = _numbers(column)
        return _in_bounds(values, bounds) & (np.abs(values) < _MAX_SAFE_FLOAT_INT) & (np.floor(values) == values)
    return np.zeros(n, dtype=bool)


def _number_ok(column, bounds: dict[str, float]) -> np.ndarray:
    """Cells ``_number`` takes (integers, floats; finite) within ``bounds``."""
    if _is_int(column) or _is_float(column):
        values = _numbers(column)
        if _is_int(column):
            values = np.where(np.abs(values) < _MAX_SAFE_FLOAT_INT, values, np.nan)
        return _in_bounds(values, bounds)
    return np.zeros(len(column), dtype=bool)


def _text_ok(column) -> np.ndarray:
    if not _is_text(column):
        return np.zeros(len(column), dtype=bool)
    lengths = pc.fill_null(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)
    braces = pc.fill_null(pc.match_substring_regex(column, r"[{}]"), False).to_numpy(zero_copy_only=False)
    return (lengths <= MAX_PROMPT_CHARS) & ~braces  # a template is filled by the exact checks (specs.templates)


def _uris_ok(column, allow_list: bool) -> np.ndarray:
    """URI cells ``resolve_uri`` takes unchanged; for list columns, also Arrow lists of such cells."""
    n = len(column)
    if _is_text(column):
        ok = pc.and_(pc.match_substring_regex(column, _URI), pc.invert(pc.match_substring(column, "\x00")))
        ok = pc.and_(ok, pc.less_equal(pc.utf8_length(column), 4096))
        if allow_list:
            ok = pc.and_(ok, pc.invert(pc.starts_with(column, "[")))
        return pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
    if allow_list and isinstance(column, pa.Array) and pa.types.is_list(column.type) and _is_text(column.values):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        ok = (lengths >= 1) & (lengths <= MAX_INPUTS_PER_CELL)
        flat = pc.list_flatten(column)
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        items = _uris_ok(flat, allow_list=False) & flat.is_valid().to_numpy(zero_copy_only=False)
        bad = np.zeros(n, dtype=bool)
        np.logical_or.at(bad, parents, ~items)
        return ok & ~bad
    return np.zeros(n, dtype=bool)


def _scales_ok(column, adapters: int) -> np.ndarray:
    bounds = {"ge": 0.0, "le": 10.0}
    if _is_int(column) or _is_float(column):
        return _number_ok(column, bounds)
    if isinstance(column, pa.Array) and pa.types.is_list(column.type) and (
            pa.types.is_integer(column.type.value_type) or pa.types.is_floating(column.type.value_type)):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(column)
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        items = _number_ok(flat, bounds) & flat.is_valid().to_numpy(zero_copy_only=False)
        bad = np.zeros(len(column), dtype=bool)
        np.logical_or.at(bad, parents, ~items)
        return (lengths == adapters) & ~bad
    return np.zeros(len(column), dtype=bool)


def ids_ok(column: pa.Array | list | None, n: int) -> np.ndarray:
    """Cells ``check_id`` certainly takes, judged by column; the others need the exact check."""
    if _is_int(column):
        return column.is_valid().to_numpy(zero_copy_only=False)
    if not _is_text(column):
        return np.zeros(n, dtype=bool)
    ok = pc.fill_null(pc.match_substring_regex(column, f"^{ROW_ID_PATTERN}$"), False)
    stems = pc.utf8_lower(pc.list_element(pc.split_pattern(pc.fill_null(column, ""), ".", max_splits=1), 0))
    reserved = pc.is_in(stems, value_set=pa.array(sorted(RESERVED_IDS)))
    return pc.and_(ok, pc.invert(reserved)).to_numpy(zero_copy_only=False)


def spec_numbers(column: pa.Array | list | None, registry: SpecRegistry, n: int) -> tuple[list[str], np.ndarray]:
    """(known spec names, per row the position of its spec in that list or -1)."""
    names = registry.names()
    if not _is_text(column):
        values = [None] * n if column is None else (column if isinstance(column, list) else column.to_pylist())
        position = {name: k for k, name in enumerate(names)}
        return names, np.array([position.get(v, -1) if isinstance(v, str) else -1 for v in values], dtype=np.int64)
    found = pc.fill_null(pc.index_in(column, value_set=pa.array(names, type=column.type)), -1)
    return names, found.to_numpy(zero_copy_only=False).astype(np.int64)


def _spec_ok(batch: RowBatch, spec: Spec) -> np.ndarray:
    n = batch.num_rows
    profile = spec.profile
    if any(is_template(spec.default_params().get(column)) for column in TEXT_PARAMS):
        return np.zeros(n, dtype=bool)  # templated defaults: every row is filled by the exact checks
    ok = np.ones(n, dtype=bool)
    for column in PARAM_COLUMNS:
        values = batch.columns.get(column)
        present = _present(values, n)
        if not present.any():
            continue
        if column in profile.all_params:
            if column in TEXT_PARAMS:
                good = _text_ok(values)
            elif column in INT_COLUMNS:
                good = _integral_ok(values, BOUNDS[column])
            else:
                good = _number_ok(values, BOUNDS[column])
            ok &= ~present | good
        elif column in profile.refused:
            ok &= ~present
    if profile.steps_scale_with_strength:
        ok &= _denoises(batch, spec, n)
    seed = batch.columns.get("seed")
    present = _present(seed, n)
    if present.any():
        ok &= ~present | _integral_ok(seed, {"ge": 0, "le": MAX_SEED})
    scale = batch.columns.get("ip_scale")
    present = _present(scale, n)
    if present.any():
        ok &= ~present | _scales_ok(scale, len(spec.ip_adapters))
    required = spec.required_columns
    for column in INPUT_COLUMNS:
        values = batch.columns.get(column)
        present = _present(values, n)
        if column in required:
            ok &= present
            if present.any():
                ok &= _uris_ok(values, allow_list=column == "ip_image")
        elif column == "ip_mask":
            ok &= ~present  # regional masks: the exact check pairs them with the images
    return ok


def _denoises(batch: RowBatch, spec: Spec, n: int) -> np.ndarray:
    """Rows whose steps x strength (the row's, else the spec's) run at least one denoising step, or where one of
    them is left to the pipeline's default (judged later, with that default: ``tasks.call_defaults``)."""
    defaults = spec.default_params()
    known = {}
    for name in ("num_inference_steps", "strength"):
        values = np.full(n, np.nan if defaults.get(name) is None else float(defaults[name]))
        column = batch.columns.get(name)
        if _is_int(column) or _is_float(column):
            present = _present(column, n)
            values = np.where(present, _numbers(column), values)
        known[name] = values
    product = np.floor(known["num_inference_steps"] * known["strength"])
    return np.isnan(product) | (product >= 1)


def vouch(batch: RowBatch, registry: SpecRegistry) -> np.ndarray:
    """Per row of the batch: True where the exact checks of ``specs.rows`` certainly accept it."""
    n = batch.num_rows
    good = ids_ok(batch.columns.get("id"), n)
    for column in batch.columns.values():
        if isinstance(column, list):  # a column of mixed cells may hold bytes that are not text, in any column
            good &= np.array([not isinstance(value, Undecodable) for value in column], dtype=bool)
    names, numbers = spec_numbers(batch.columns.get("spec"), registry, n)
    good &= numbers >= 0
    vouched = np.zeros(n, dtype=bool)
    for position in np.unique(numbers[good]):
        rows = good & (numbers == position)
        vouched |= rows & _spec_ok(batch, registry.get(names[int(position)]))
    return vouched


class _SpecPlan:
    """What building a vouched row of one spec needs, worked out once per batch and spec."""

    def __init__(self, spec: Spec, columns: dict):
        profile = spec.profile
        self.spec = spec
        self.defaults = {k: v for k, v in spec.default_params().items() if k in profile.all_params}
        self.params = [(c, int if c in INT_COLUMNS else float if c not in TEXT_PARAMS else None)
                       for c in PARAM_COLUMNS if c in profile.all_params and c in columns]
        required = spec.required_columns
        self.inputs = [c for c in INPUT_COLUMNS if c in required]
        self.scales = [adapter.scale for adapter in spec.ip_adapters]


class VouchedRow:
    """A vouched row resolved but for its passthrough columns: enough to key it (``id``, ``spec``, ``seed``,
    ``params``, ``inputs``); ``job()`` makes the ``Job``, only for rows that will render (a re-run of a million
    done rows builds none)."""

    __slots__ = ("id", "spec", "index", "seed", "params", "inputs", "_builder", "_offset")

    def __init__(self, row_id, spec, index, seed, params, inputs, builder, offset):
        self.id, self.spec, self.index, self.seed, self.params, self.inputs = row_id, spec, index, seed, params, inputs
        self._builder, self._offset = builder, offset

    @property
    def extra(self) -> dict:
        """The row's passthrough cells, as ``Job.extra`` holds them."""
        return {name: storable(self._builder.values(name)[self._offset]) for name in self._builder.extra_columns}

    def job(self) -> Job:
        return Job.model_construct(id=self.id, spec=self.spec, index=self.index, seed=self.seed, params=self.params,
                                     inputs=self.inputs, extra=self.extra)


def as_job(item: Job | VouchedRow) -> Job:
    return item.job() if isinstance(item, VouchedRow) else item


class JobBuilder:
    """Resolves vouched rows of a batch into jobs with the conversions ``resolve_row`` applies (int, float, the
    same URI resolution), without the validation the columns already passed (``Job.model_construct``)."""

    def __init__(self, batch: RowBatch, registry: SpecRegistry, base: str):
        self.batch, self.registry, self.base = batch, registry, base
        self._values: dict[str, list] = {}
        self._plans: dict[str, _SpecPlan] = {}
        self.extra_columns = [name for name in batch.columns if name not in KNOWN_COLUMNS]

    def values(self, column: str) -> list:
        if column not in self._values:
            self._values[column] = self.batch.values(column)
        return self._values[column]

    def _plan(self, name: str) -> _SpecPlan:
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = _SpecPlan(self.registry.get(name), self.batch.columns)
        return plan

    def draft(self, offset: int) -> VouchedRow:
        row_id = str(self.values("id")[offset])
        plan = self._plan(self.values("spec")[offset])
        params = dict(plan.defaults)
        for column, convert in plan.params:
            value = self.values(column)[offset]
            if value is not None:
                params[column] = value if convert is None else convert(value)
        params.setdefault("prompt", "")
        scale = self.values("ip_scale")[offset] if "ip_scale" in self.batch.columns else None
        if scale is None:
            scales = list(plan.scales)
        elif isinstance(scale, list):
            scales = [float(item) for item in scale]
        else:
            scales = [float(scale)] * len(plan.scales)
        params["ip_adapter_scale"] = scales
        seed = self.values("seed")[offset] if "seed" in self.batch.columns else None
        seed = default_seed(row_id) if seed is None else int(seed)
        inputs: dict[str, Any] = {}
        for column in plan.inputs:
            value = self.values(column)[offset]
            if column == "ip_image":
                inputs[column] = [self._uri(item) for item in (value if isinstance(value, list) else [value])]
            else:
                inputs[column] = self._uri(value)
        return VouchedRow(row_id, plan.spec.name, self.batch.start + offset, seed, params, inputs, self, offset)

    def _uri(self, value: str) -> str:
        if value.startswith("/") or not self.base or URI_SCHEME.match(value):
            return value
        return posixpath.join(self.base, value)
