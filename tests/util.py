"""Small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas


def write_manifest(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def read_records(out) -> pandas.DataFrame:
    import pandas as pd

    return pd.read_parquet(Path(out) / "metadata")
