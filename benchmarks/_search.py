"""Shared by the benchmark scripts: run one search from an edited shipped space, read its trials."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
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


def nested_config(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"train": {...}, "method": {...}}`` from define-by-run's flat ``section/key`` names
    (the nested trial config Ray Tune hands a trial)."""
    config: dict[str, dict[str, Any]] = {"train": {}, "method": {}}
    for name, value in flat.items():
        section, key = name.split("/", 1)
        config[section][key] = value
    return config


def random_configs(space: Any, count: int, seed: int) -> list[dict[str, dict[str, Any]]]:
    """``count`` configurations drawn by Optuna's random sampler (seed ``seed``) over the
    space's domains through the platform's own ``define_by_run``, as nested trial configs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(count):
        trial = study.ask()
        out.append(nested_config({**space.define_by_run(trial), **trial.params}))
        study.tell(trial, 0.0)
    return out


def train_in_process(config: dict[str, Any], setup: Any,
                     report: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    """One trial of ``setup``'s search trained in this process, without Ray: the
    trainable's own method, model and label view (``tuner.trainable``), the training split
    decoded here and batched as a Ray trial on the in-memory path does
    (:class:`tuner.data.memory.MemoryEpochs`: the same batches), and ``tuner.loop.fit``
    calling ``report(metrics, state)`` after every epoch. A configuration therefore trains
    to the same curve as in a Ray search, at the same cost per epoch."""
    import torch

    from tuner.data.memory import MemoryEpochs, decode_split
    from tuner.data.prepared import PreparedData
    from tuner.loop import fit
    from tuner.trainable import _method_and_model, build_train_data, train_config

    cfg = train_config(config, setup)
    data = PreparedData(setup.data_dir)
    method, model, observed = _method_and_model(config, setup, cfg, data)
    split = decode_split(data.shard_files("train"), cfg.image_size)
    stream = MemoryEpochs(split, cfg.image_size, data.manifest["image"].get("augment", "flip"),
                          cfg.seed)
    train_data = build_train_data(setup, cfg, data, observed, stream, cfg.batch_size)
    fit(method, model, cfg, train_data, report, device=torch.device("cpu"))
