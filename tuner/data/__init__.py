"""Benchmarks, label corruption views, Parquet shards and the Ray Data stream."""

from tuner.data.corruption import ViewSpec
from tuner.data.prepared import PreparedData, default_data_dir, ensure_prepared

__all__ = ["PreparedData", "ViewSpec", "default_data_dir", "ensure_prepared"]
