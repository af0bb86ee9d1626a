"""Shared by the benchmark scripts: run one search from an edited shipped space, read its trials."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_space(method: str, name: str, edit: Callable[[dict[str, Any]], None], out: Path,
              data_dir: str | None = None) -> pd.DataFrame:
    """``search_spaces/<method>.yaml`` edited in place by ``edit``, run as experiment ``name``
    under ``out`` on a fresh local Ray (shut down afterwards); its ``trials.parquet``."""
    import ray

    from tuner import search

    space = yaml.safe_load((ROOT / f"search_spaces/{method}.yaml").read_text())
    edit(space)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))  # named bounds need file order
    code = search.main(["--method", method, "--space", str(path), "--out", str(out),
                        "--name", name, "--no-test"] + (["--data-dir", data_dir] if data_dir else []))
    ray.shutdown()
    if code != 0:
        sys.exit(f"the search {name} failed (exit {code})")
    return pd.read_parquet(out / name / "trials.parquet")
