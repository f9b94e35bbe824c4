"""Records name their outputs relative to ``--out``: a folder moved elsewhere is the same dataset (verify passes,
the records show URIs under the new place), and records an older version wrote with absolute URIs are read by
their path from the layout's top folder."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from util import write_folder

from ipaflow.flows.cli import main
from ipaflow.specs.outputs import output_name, output_names, resolve_output, resolve_outputs


@pytest.mark.parametrize(("uri", "name"), [
    ("images/a.png", "images/a.png"),
    ("/data/run/images/a.png", "images/a.png"),
    ("s3://b/run/images/3fa/a.png", "images/3fa/a.png"),  # sharded
    ("s3://b/images/run/images/a.png", "images/a.png"),  # an --out under a folder named images: the last one
    ("file:///d/webdataset/webdataset-r1-00000.tar#a%2Eb.png", "webdataset/webdataset-r1-00000.tar#a%2Eb.png"),
    ("videos/w.mp4", "videos/w.mp4"),
    ("/o/a.png", None),  # in no layout's folder: nothing ipaflow wrote
    ("https://host/a.png", None),
])
def test_an_output_is_named_by_its_path_from_the_top_folder(uri, name):
    assert output_name(uri) == name
    assert resolve_output("s3://new/place/", uri) == (uri if name is None else f"s3://new/place/{name}")


def test_resolving_a_column_is_resolving_each_output():
    outputs = pa.array([["images/a.png"], None, [], ["/old/images/b-0.png", "/old/images/b-1.png"], ["/o/x.png"]],
                       pa.list_(pa.string()))
    table = pa.table({"id": ["a", "n", "e", "b", "x"], "outputs": outputs}).slice(1)  # offsets past 0
    resolved = resolve_outputs(table, "/new").column("outputs").to_pylist()
    assert resolved == [None, [], ["/new/images/b-0.png", "/new/images/b-1.png"], ["/o/x.png"]]
    values = ["images/a.png", None, "s3://b/o/videos/w.gif", "/o/x.png", "parquet/p.parquet#a.png", "images/"]
    assert output_names(pa.array(values)).to_pylist() == [None if v is None else output_name(v) for v in values]


@pytest.mark.parametrize("layout", ["files", "webdataset"])
def test_a_moved_folder_verifies_and_shows_its_new_place(tmp_path, capsys, layout):
    write_folder(tmp_path / "first", layout)
    names = [name for names in pq.read_table(tmp_path / "first" / "metadata").column("outputs").to_pylist()
             for name in names]
    assert names and all(output_name(name) == name for name in names)  # stored relative to --out
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(tmp_path / "first", moved)
    capsys.readouterr()
    assert main(["verify", str(moved), "--deep"]) == 0
    assert main(["records", str(moved)]) == 0
    shown = [uri for line in capsys.readouterr().out.splitlines() for uri in json.loads(line)["outputs"]]
    assert len(shown) == len(names) and all(uri.startswith(f"{moved}/{layout if layout != 'files' else 'images'}/")
                                            for uri in shown)
