"""The rules of the run monitor, without Prefect or models: markdown escaping (checked by rendering it), failed
rows grouped by reason, counting shards' live reports (retries, late reports, lost shards),
labelled preview sheets within their byte budget."""

from __future__ import annotations

import base64
import html
import io
import re

import PIL.Image
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipaflow.core.problems import FailedRow, Problem
from ipaflow.flows.monitoring import MAX_REASONS, RunMonitor, failure_markdown, failure_table, markdown_text
from ipaflow.flows.previews import PREVIEW_BUDGET, Thumb, labelled_grid, preview_jpeg, preview_uris
from ipaflow.flows.run_counter import FailureGroups
from ipaflow.tasks.counts import RowCounts
from ipaflow.tasks.worker import ShardProgress, ShardStats


def _render(markdown: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


def _shown(rendered: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", rendered)).strip()


HOSTILE = ["-", "+", "*", "1.", "2)", "# title", "> quote", "=", "---", "<b>bold</b><script>alert(4)</script>",
           '"><img src=x onerror=alert(1)>', "*em* _u_ **b** `code` ~~s~~", "[link](http://x) ![i](y)", "a | b",
           "back\\slash\\", "&amp; &lt; &#60;", "<!-- c -->", "<http://autolink>", "x\ny\r\n  z", "| --- |", "$x$"]


@pytest.mark.parametrize("text", HOSTILE)
def test_markdown_text_shows_the_text_as_written(text):
    expected = " ".join(text.split())
    paragraph = _render(markdown_text(text))
    assert re.findall(r"<(\w+)", paragraph) == ["p"] and _shown(paragraph) == expected
    cell = _render(f"| head |\n| --- |\n| {markdown_text(text)} |\n")
    assert set(re.findall(r"<(\w+)", cell)) == {"table", "thead", "tbody", "tr", "th", "td"}
    assert _shown(cell.split("<tbody>")[1]) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)
       | st.text(alphabet="-+*_`~[]()<>!&#|\\.=:1 ab\n", max_size=20))
def test_any_text_survives_markdown(text):
    expected = " ".join(text.split())
    rendered = _render(markdown_text(text))
    assert _shown(rendered) == expected.strip()
    assert set(re.findall(r"<(\w+)", rendered)) <= {"p"}


def _failed(row: str, column: str, reason: str, spec: str | None = "s") -> FailedRow:
    return FailedRow(row=row, problems=(Problem(column, reason),), index=0, spec=spec)


def test_failures_are_grouped_by_reason_with_counts_and_samples():
    groups = FailureGroups()
    for i in range(7):
        groups.add(_failed(f"m-{i}", "ip_image", f"not found: /data/in/{i}.png"), str)
    for i in range(3):
        groups.add(_failed(f"w-{i}", "width", f"input should be a multiple of 8, got {100 + i}", spec=None), str)
    groups.add(_failed("u", "spec", "unknown spec '<b>x</b>'; `ipaflow specs list` shows the known ones", None), str)
    table = failure_table(groups)
    assert [(row["rows"], row["column"]) for row in table] == [(7, "ip\\_image"), (3, "width"), (1, "spec")]
    assert table[0]["sample rows"] == "m-0, m-1, m-2, m-3, m-4"  # five samples
    assert table[0]["reason (first row's)"] == "not found: /data/in/0.png"
    assert table[1]["specs"] == "(unknown spec)"
    assert "&lt;b&gt;" in table[2]["reason (first row's)"]


def test_the_failed_rows_artifact_is_a_markdown_table_that_shows_the_text_as_written():
    """A markdown artifact, not a table artifact: Prefect's classic UI renders table cells as markdown and its new
    UI as plain text, while both render a markdown artifact as markdown (scripts/ui_check.py checks both)."""
    groups = FailureGroups()
    for number, text in enumerate(HOSTILE):
        groups.add(FailedRow(row=f"r{number}", problems=(Problem(f"col{number:02d}", text),), index=number,
                             spec=text), str, label=text)
    rendered = _render(failure_markdown(groups))
    assert set(re.findall(r"<(\w+)", rendered)) == {"table", "thead", "tbody", "tr", "th", "td"}
    rows = re.findall(r"<tr>(.*?)</tr>", rendered, re.S)[1:]
    cells = [[_shown(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)] for row in rows]
    assert sorted(cells) == sorted(["1", f"col{n:02d}", " ".join(t.split()), " ".join(t.split()), " ".join(t.split())]
                                   for n, t in enumerate(HOSTILE))


def test_the_reasons_table_is_capped():
    groups = FailureGroups()
    for i in range(MAX_REASONS + 5):
        groups.add(_failed(f"r{i}", f"col{chr(97 + i % 26)}{i // 26}", "bad"), str)
    table = failure_table(groups)
    assert len(table) == MAX_REASONS + 1 and table[-1]["rows"] == 5 and table[-1]["reason (first row's)"] == (
        "5 other reasons")


def _report(shard: str, ok: int, failed: int = 0, new: tuple = (), skipped: int = 0) -> ShardProgress:
    return ShardProgress(shard=shard, spec="s", rows=4, phase="rendering", ok=ok, failed=failed, skipped=skipped,
                         images=ok, new_failures=list(new))


def _monitor() -> RunMonitor:
    """A monitor outside any flow run: no API writes (interval 0), its lines to a plain logger."""
    import logging

    monitor = RunMonitor(name="m", interval=0)
    monitor.log = logging.getLogger("tests.monitor")
    return monitor


def test_live_reports_count_until_the_shard_finishes():
    monitor = _monitor()
    monitor.planned(total=10)
    monitor.counts.skipped = 2  # as the planner counts done rows
    monitor.report(_report("a", ok=1, failed=1, new=[_failed("x", "ip_image", "bad")]))
    monitor.report(_report("b", ok=2).model_dump(mode="json"))  # as a Dask event carries it
    monitor.tick()
    snapshot = monitor.snapshot()
    assert (snapshot.done, snapshot.ok, snapshot.failed) == (6, 3, 1) and monitor.failed_so_far == 1
    assert [(f.id, f.row) for f in monitor.failures] == [("x", "x (manifest row 0)")]

    # a retried shard starts its counts again and reports its failed row again: counted once
    monitor.report(_report("a", ok=0, skipped=1, failed=1, new=[_failed("x", "ip_image", "bad")]))
    monitor.tick()
    assert (monitor.snapshot().done, len(monitor.failures)) == (6, 1)

    monitor.shard_finished(ShardStats(name="a", spec="s", rows=4, ok=2, skipped=1, failed=1, images=2,
                                      failures=[_failed("x", "ip_image", "bad")]))
    monitor.report(_report("a", ok=1))  # late: the shard's stats count
    monitor.shard_lost("b", ok={"b1", "b2"}, failed={"b1", "b2"})  # failed after retries: its journaled rows count
    monitor.tick()
    snapshot = monitor.snapshot()
    assert (snapshot.done, snapshot.ok, snapshot.failed) == (8, 5, 1) and len(monitor.failures) == 1
    assert monitor.reports == 4
    # one count: the run's is the sum of its specs' (a lost shard's last report counts for the run only)
    assert monitor.per_spec["s"].counts() == RowCounts(rows=4, ok=3, failed=1, images=2)
    assert (monitor.counts.ok, monitor.counts.failed, monitor.counts.skipped, monitor.counts.rows) == (5, 1, 2, 10)


def test_a_lost_shard_counts_what_it_journaled_once():
    """Seen as "48/40 rows": a shard's reports counted rows whose records were never journaled (a full disk),
    then the flow failed those same rows again. A lost shard counts its journal; the flow fails the rest."""
    monitor = _monitor()
    monitor.planned(total=10)
    monitor.report(ShardProgress(shard="a", spec="s", rows=10, phase="rendering", ok=6, failed=2,
                                 new_failures=[_failed(f"f{i}", "write", "disk full") for i in range(2)]))
    monitor.tick()
    assert monitor.snapshot().done == 8
    monitor.shard_lost("a", ok={"r0", "r1"}, failed={"r0", "r1", "f0"})  # two ok and one failed row journaled
    for row in [f"r{i}" for i in range(2, 8)] + ["f1"]:  # the flow fails the rows without a record
        monitor.row_failed(FailedRow(row=row, problems=(Problem("worker", "lost"),), index=0, spec="s"))
    monitor.tick()
    snapshot = monitor.snapshot()
    assert (snapshot.done, snapshot.ok, snapshot.failed) == (10, 2, 8)
    assert monitor.recorded == 8 == len(monitor.failures) and sum(g.rows for g in monitor.groups.groups.values()) == 8


def test_a_row_a_retry_rendered_is_not_failed():
    monitor = _monitor()
    monitor.planned(total=4)
    monitor.report(_report("a", ok=1, failed=1, new=[_failed("y", "ip_image", "timed out")]))
    monitor.tick()
    assert monitor.recorded == 1
    monitor.report(_report("a", ok=1, skipped=1))  # the retry: y rendered this time
    monitor.shard_finished(ShardStats(name="a", spec="s", rows=4, ok=3, skipped=1, images=3))
    assert (monitor.counts.ok, monitor.counts.failed, monitor.recorded, monitor.failures) == (4, 0, 0, [])
    assert not monitor.groups.groups


def test_rows_without_a_usable_id_or_with_a_duplicate_are_counted_and_named_by_manifest_row():
    monitor = _monitor()
    monitor.planned(total=5)
    monitor.place = lambda index: f"part-1.parquet row {index - 2}" if index >= 2 else None
    duplicate = Problem("id", "duplicate id (manifest rows 0, 3)")
    monitor.row_failed(FailedRow(row="d", problems=(duplicate,), index=0, spec="s"))
    monitor.row_failed(FailedRow(row="#1", problems=(Problem("id", "'bad/slash' is not a valid id"),), index=1))
    monitor.row_failed(FailedRow(row="d", problems=(duplicate,), index=3, spec="s"))
    summary = monitor.summary(run_id="r", manifest="m", out="o", gallery=None, contact_sheet=None,
                              metadata_bytes_written=0, first_shard_s=None)
    assert (summary.failed, summary.without_record) == (3, 2)
    assert [(f.row, f.recorded) for f in summary.failures] == [
        ("d (manifest row 0)", True), ("manifest row 1", False), ("d (part-1.parquet row 1)", False)]
    samples = [row["sample rows"] for row in failure_table(monitor.groups)]
    assert samples == ["d (manifest row 0), d (part-1.parquet row 1)", "manifest row 1"]


def test_row_counts_add_up():
    a = RowCounts(rows=2, ok=1, failed=1, images=1, seconds=0.5)
    b = ShardStats(name="x", spec="s", rows=3, ok=2, skipped=1, images=4, seconds=1.0)
    assert a + b == RowCounts(rows=5, ok=3, failed=1, skipped=1, images=5, seconds=1.5)
    assert b.run_counts() == RowCounts(rows=3, ok=3, images=4, seconds=1.0)  # an earlier attempt's rows rendered
    assert a.add(b) is a and a.rows == 5


def test_failed_rows_are_logged_up_to_a_limit_per_shard(caplog):
    import logging

    from ipaflow.flows.run_counter import FAILURE_LOG_LIMIT

    monitor = _monitor()
    monitor.planned(total=40)
    with caplog.at_level(logging.WARNING, logger="tests.monitor"):
        monitor.report(_report("a", ok=0, failed=15, new=[_failed(f"r{i}", "ip_image", "bad") for i in range(15)]))
        monitor.tick()
        monitor.close_log("a")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:FAILURE_LOG_LIMIT] == [f"row r{i} failed: ip_image: bad [spec s]" for i in range(FAILURE_LOG_LIMIT)]
    assert messages[FAILURE_LOG_LIMIT:] == ["a: 5 more failed rows (the m-failed-rows artifact groups them by reason)"]


def _thumbs(n: int, noisy: bool = True) -> list[Thumb]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [Thumb(label=f"row-{i}-" + "x" * 40, spec="s",
                  image=PIL.Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) if noisy
                                            else np.full((128, 128, 3), 90, dtype=np.uint8))) for i in range(n)]


def test_thumbnails_carry_their_labels_cut_to_fit():
    sheet = labelled_grid(_thumbs(3, noisy=False), cell=96, columns=8)
    assert sheet.size == (3 * 96, 96 + 13)
    band = sheet.crop((0, 96, 96, 96 + 13)).convert("L")
    assert min(band.getdata()) < 100  # text under the first thumbnail
    assert min(sheet.crop((94, 96, 96, 96 + 13)).convert("L").getdata()) > 200  # cut before the next cell


def test_previews_fit_their_budget():
    data = preview_jpeg(_thumbs(8), budget=20_000)
    assert len(data) <= 20_000 and PIL.Image.open(io.BytesIO(data)).format == "JPEG"
    uris = preview_uris({f"spec-{i}": _thumbs(8) for i in range(9)})  # 8 thumbnails of noise for each of 9 specs
    sizes = [len(base64.b64decode(uri.split(",", 1)[1])) for uri in uris.values()]
    assert sum(sizes) <= PREVIEW_BUDGET and min(sizes) > 2_000


def test_the_progress_percentage_is_rounded():
    from ipaflow.flows.progress import Snapshot

    assert Snapshot(total=71, done=32).percent == 45.1  # the UI showed 45.070422535211264%
    assert Snapshot(total=None, done=3).percent == 0.0
