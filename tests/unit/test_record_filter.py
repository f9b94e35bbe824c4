"""`ipaflow records OUT --where FILTER`: a small filter language parsed by its own tokenizer and applied with
pyarrow.compute part by part; anything else (code, an unknown column, a bad literal) is one line, exit 2."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from ipaflow.flows.cli import main
from ipaflow.flows.record_filter import FilterError, RecordFilter, parse_filter

SCHEMA = pa.schema([("id", pa.string()), ("seed", pa.int64()), ("ip_similarity", pa.float64()),
                    ("ip_similarities", pa.list_(pa.list_(pa.float64()))), ("status", pa.string()),
                    ("finished_at", pa.timestamp("us", tz="UTC"))])
DAY = datetime(2026, 12, 1, tzinfo=timezone.utc)
TABLE = pa.Table.from_pylist([
    {"id": "a", "seed": 1, "ip_similarity": 0.9, "status": "ok", "finished_at": DAY},
    {"id": "b", "seed": 2, "ip_similarity": 0.1, "status": "ok", "finished_at": DAY},
    {"id": "c", "seed": 3, "ip_similarity": None, "status": "failed", "finished_at": DAY},
    {"id": "it's", "seed": 4, "ip_similarity": 0.15, "status": "ok", "finished_at": DAY.replace(day=3)},
], schema=SCHEMA)


def _ids(text: str) -> list[str]:
    return RecordFilter(text, SCHEMA).apply(TABLE).column("id").to_pylist()


@pytest.mark.parametrize("text, ids", [
    ("ip_similarity < 0.2", ["b", "it's"]),
    ("ip_similarity>=0.9", ["a"]),
    ("ip_similarity == null", ["c"]),
    ("ip_similarity != null and seed > 1", ["b", "it's"]),
    ("seed == 1 or seed == 3 and status == 'failed'", ["a", "c"]),  # and binds first
    ("(seed == 1 or seed == 3) and status == \"ok\"", ["a"]),
    ("id == 'it\\'s'", ["it's"]),
    ("`status` != 'ok'", ["c"]),
    ("ip_similarity < 1e-1 or ip_similarity > .5", ["a"]),
    ("finished_at > '2026-12-02'", ["it's"]),
    ("seed <= 2.5", ["a", "b"]),
])
def test_filters_keep_the_matching_records(text, ids):
    assert _ids(text) == ids


@pytest.mark.parametrize("text, said", [
    ("__import__('os')", "expected one of < <= > >= == != after __import__ at character 11"),
    ("__import__('os').system('true')", "unexpected '.' at character 17"),
    ("ip_similarity < 0.2; drop", "unexpected ';' at character 20"),
    ("ip_similarity < 0.2 seed > 1", "unexpected 'seed' at character 21; join comparisons with and / or"),
    ("ip_similarity <", "expected a number, a quoted string or null at character 16, got 'the end'"),
    ("ip_similarity < null", "compare with null by == or != only"),
    ("(seed == 1", "expected ')' at character 11"),
    ("0.2 > ip_similarity", "expected a column name at character 1"),
    ("", "the filter is empty"),
    ("score < 0.2", "no column 'score' in these records (columns: id, seed, ip_similarity"),
    ("ip_similarities < 0.2", "ip_similarities holds lists"),
    ("seed == 'one'", "seed holds a number; 'one' cannot be compared with it"),
    ("status > 2", "status holds text; 2 cannot be compared with it"),
    ("finished_at > 'yesterday'", "finished_at holds times; 'yesterday' is not an ISO time"),
    ("(" * 1500 + "seed == 1" + ")" * 1500, "more than 32 nested parentheses at character 33"),
])
def test_a_bad_filter_is_one_clear_error(text, said):
    with pytest.raises(FilterError) as caught:
        RecordFilter(text, SCHEMA)
    assert said in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_the_tree_is_data_not_code():
    tree = parse_filter("a < 1 and (b == 'x' or c != null)")
    assert repr(tree) == ("Either(kind='and', parts=(Comparison(column='a', op='<', value=1), Either(kind='or', "
                          "parts=(Comparison(column='b', op='==', value='x'), Comparison(column='c', op='!=', "
                          "value=None)))))")


def test_records_where_on_the_command_line(tmp_path, capsys):
    from util import write_folder

    out = tmp_path / "out"
    write_folder(out, "files", scores={"a": [[0.9]], "b": [[0.5], [0.1]], "c.d": [[0.3]]})
    assert main(["records", str(out), "--where", "ip_similarity < 0.2 or id == 'c.d'"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [(r["id"], r["ip_similarity"], r["ip_similarities"]) for r in rows] == \
        [("b", 0.1, [[0.5], [0.1]]), ("c.d", 0.3, [[0.3]])]
    assert captured.err.strip() == "2 records"

    assert main(["records", str(out), "--where", "__import__('os')"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("ipaflow: --where: expected one of < <= > >= == != after __import__")
