"""Specs are bounded: a YAML alias bomb, a recursive alias or a deeply nested value is refused while parsing,
in milliseconds and without expanding it; a repeated key is an error; adapter scales have an exact shape."""

from __future__ import annotations

import re
import time
import tracemalloc

import pytest
from util import SPEC_HEAD as HEAD
from util import alias_bomb

from ipaflow.specs.registry import SpecError, SpecRegistry, parse_spec


def _refusal(text: str) -> str:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "odd.yaml")
    return str(caught.value)


def test_an_alias_bomb_is_refused_without_expanding_it():
    text = alias_bomb()
    assert len(text) < 800
    tracemalloc.start()
    started = time.perf_counter()
    reason = _refusal(text)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.perf_counter() - started < 1 and peak < 5_000_000  # bytes: nothing was expanded
    assert re.search(r"not valid YAML \(too large: \d{9} values nested 14 deep once its aliases are expanded; a "
                     r"spec may hold 10000 values, 16 deep\)", reason), reason


@pytest.mark.parametrize("text, reason", [
    (HEAD + "r: &r [1, *r]\n", "found a recursive alias (a value that contains itself) at line 4"),
    (HEAD + "x: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 16 levels deep at line 4"),
    (HEAD + "task: img2img\n", "found duplicate key 'task' at line 4, column 1"),
    (HEAD + "ip_adapters: [{model: h94/IP-Adapter, weight_name: a.bin, scale: 1, scale: 2}]\n",
     "found duplicate key 'scale' at line 4"),
])
def test_recursive_deep_and_repeated_values_are_refused(text, reason):
    assert reason in _refusal(text)


def test_merge_keys_may_still_be_overridden():
    text = ("adapter: &adapter {model: h94/IP-Adapter, weight_name: a.bin, scale: 0.5}\n"
            + HEAD + "ip_adapters: [{<<: *adapter, scale: 0.8}]\n")
    assert "adapter: Extra inputs are not permitted" in _refusal(text)  # parsed; only the model refuses the key
    spec = parse_spec(HEAD + "ip_adapters: [{<<: {model: h94/IP-Adapter, weight_name: a.bin, scale: 0.5}, scale: 0.8}]\n",
                      "odd.yaml")
    assert spec.ip_adapters[0].scale == 0.8


@pytest.mark.parametrize("scale, problem", [
    ("0.7", None),
    ("{up: {block_0: [0.0, 1.0, 0.0]}}", None),
    ("{down: {block_2: [0.0, 1.0]}, mid: 0.5, up: {block_0: [0.0, 1.0, 0.0]}}", None),
    ("{side: 1}", "per-block scale keys must be down/mid/up, not 'side'"),
    ("{up: {blk: 1}}", "up: blocks are named block_0, block_1, ..., not 'blk'"),
    ("{up: [[1]]}", "up: a scale is a number in [0, 10], got '[1]'"),
    ("{up: {block_0: [" + ", ".join(["1"] * 17) + "]}}", "up.block_0: give 1 to 16 scales (one per transformer layer)"),
    ("11", "scale: a scale is a number in [0, 10], got '11'"),
    ("{}", "a per-block scale needs at least one of down, mid, up"),
])
def test_adapter_scales_have_an_exact_shape(scale, problem):
    text = HEAD + f"ip_adapters: [{{model: h94/IP-Adapter, weight_name: a.bin, scale: {scale}}}]\n"
    if problem is None:
        parse_spec(text, "odd.yaml")
    else:
        assert problem in _refusal(text)


def test_spec_files_are_read_bounded(tmp_path):
    import os

    folder = tmp_path / "specs"
    folder.mkdir()
    os.mkfifo(folder / "waiting.yaml")  # a FIFO named like a spec would block a plain read forever
    started = time.monotonic()
    with pytest.raises(SpecError, match=r"waiting.yaml: not a regular file \(a FIFO\)"):
        SpecRegistry([str(folder)])
    assert time.monotonic() - started < 2
    (folder / "waiting.yaml").unlink()
    with open(folder / "big.yaml", "wb") as handle:
        handle.truncate(2 << 20)
    with pytest.raises(SpecError, match=r"big.yaml: too large: 2 MiB, more than the 1 MiB allowed"):
        SpecRegistry([str(folder)])
