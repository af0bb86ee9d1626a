"""``python -m tuner.compare``: compare methods under the same tuning budget.

Example (embedded DigitsMLT, missing labels)::

    python -m tuner.compare --methods bce,asl,hill,splc --label-regime missing:0.6 \\
        --trials 8 --epochs 6 --seeds 3 --name missing-q0.6

For every method this runs one search (:func:`tuner.search.main`, the same code path as
``python -m tuner.search``) from ``search_spaces/<method>.yaml`` with the *same* benchmark,
label view, trial count, epoch budget, ASHA settings, sampler seed and resources; the search
itself then retrains its best configuration with ``--seeds`` new training seeds and scores
each on the test split (``search.repeats: K`` with ``repeats_top: 1``, :mod:`tuner.repeats`:
the same machinery as ``python -m tuner.search --repeats K``). Methods whose ``regimes`` exclude the label regime, or without a space file, are skipped
with the reason. Writes into ``OUT/NAME/``::

    compare.json                 the settings (a resumed run must use the same ones)
    spaces/<method>.yaml         the space each search ran
    searches/<method>/           each search's experiment directory (+ its report.html), with
                                 the seed retrainings in repeats/ and repeats.csv
    seeds.csv                    test metrics of every retraining run
    comparison.csv / .md / .html mean and sample standard deviation over seeds
    figures/comparison.png       test mAP (total/head/medium/tail) per method, seeds as dots

Resumable: re-running the same command skips every finished piece (a directory with
``search.json`` and ``test_metrics.json``); an unfinished piece is moved aside to
``<dir>.incomplete-<time>`` and run again.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from tuner.cli import run_cli
from tuner.errors import ConfigError

__all__ = ["Settings", "aggregate", "main", "method_space", "plan", "seed_rows"]

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("mAP", "mAP_head", "mAP_medium", "mAP_tail")


@dataclass(frozen=True)
class Settings:
    """What every method's search shares (stored in ``compare.json``)."""

    benchmark: str
    label_regime: str
    view_seed: int
    trials: int
    epochs: int
    grace_period: int
    reduction_factor: int
    concurrency: int
    search_seed: int
    seeds: int
    cpus_per_trial: float
    gpus_per_trial: float
    data_cpus: float
    data_dir: str | None


def settings_from_args(args: argparse.Namespace) -> Settings:
    grace = args.grace_period or max(1, args.epochs // 3)
    for name, value, low in (("--trials", args.trials, 1), ("--epochs", args.epochs, 1),
                             ("--seeds", args.seeds, 0), ("--concurrency", args.concurrency, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    if not 1 <= grace <= args.epochs:
        raise ConfigError(f"--grace-period must be in [1, --epochs={args.epochs}], got {grace}")
    return Settings(
        benchmark=args.benchmark, label_regime=args.label_regime, view_seed=args.view_seed,
        trials=args.trials, epochs=args.epochs, grace_period=grace,
        reduction_factor=args.reduction_factor, concurrency=args.concurrency,
        search_seed=args.seed, seeds=args.seeds, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, data_cpus=args.data_cpus,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
    )


# ---------------------------------------------------------------------------- planning
def plan(names: Sequence[str], settings: Settings, spaces_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The methods to run and, for the others, why they are skipped.

    Unknown names are an error (listing the registered ones); a method whose ``regimes``
    exclude the label regime, or without ``<spaces_dir>/<name>.yaml``, is skipped.
    """
    import methods
    from tuner.prepare import parse_view

    kind = parse_view(settings.label_regime, settings.view_seed).kind
    run, skipped = [], {}
    for name in names:
        cls = methods.get_method_class(name)
        if kind not in cls.regimes:
            skipped[name] = f"designed for {'/'.join(cls.regimes)} labels, not {kind}"
        elif not (spaces_dir / f"{name}.yaml").is_file():
            skipped[name] = f"no search space {spaces_dir / f'{name}.yaml'}"
        else:
            run.append(name)
    return run, skipped


def method_space(name: str, settings: Settings, spaces_dir: Path) -> dict[str, Any]:
    """``search_spaces/<name>.yaml`` with the shared data, ASHA, search and resource settings.

    The method's own ``train`` and ``params`` domains are kept; everything that defines the
    budget is overwritten, so every method gets the same one, and every method reports the
    benchmark's groups (``data.groups: benchmark``; COMIC's own space reports the PLT
    protocol's observed groups). Validated before it is returned.
    """
    from tuner.prepare import parse_view
    from tuner.space import parse_space

    path = spaces_dir / f"{name}.yaml"
    raw = yaml.load(path.read_text(), Loader=yaml.SafeLoader) or {}
    view = parse_view(settings.label_regime, settings.view_seed)
    raw["data"] = {**(raw.get("data") or {}), "benchmark": settings.benchmark,
                   "data_dir": settings.data_dir, "head_share": None,  # the same build for all
                   "label_regime": view.kind, "rate": view.rate,
                   "seed": view.seed,
                   "groups": "benchmark"}  # one set of reported groups for every method
    raw["asha"] = {"max_epochs": settings.epochs, "grace_period": settings.grace_period,
                   "reduction_factor": settings.reduction_factor}
    raw["search"] = {**(raw.get("search") or {}), "num_trials": settings.trials,
                     "max_concurrent": settings.concurrency, "seed": settings.search_seed,
                     "repeats": settings.seeds, "repeats_top": 1}
    raw["resources"] = {"cpus_per_trial": settings.cpus_per_trial,
                        "gpus_per_trial": settings.gpus_per_trial, "data_cpus": settings.data_cpus}
    parse_space(raw, str(path), name)
    return raw


# ---------------------------------------------------------------------------- running
def finished(exp: Path) -> bool:
    """A search directory that ran to the end (test scored, or no trial to score)."""
    return (exp / "search.json").is_file() and (
        (exp / "test_metrics.json").is_file() or not (exp / "best_config.yaml").is_file())


def run_piece(method: str, space: dict[str, Any], space_file: Path, exp: Path,
              num_cpus: int | None) -> int:
    """Run one search into ``exp`` unless it is finished; returns its exit status."""
    from tuner import search
    from tuner.space import to_yaml

    if finished(exp):
        print(f"[compare] {exp} is finished; skipped")
        return 0
    if exp.exists():
        aside = exp.with_name(f"{exp.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        exp.rename(aside)
        print(f"[compare] {exp} was unfinished; moved to {aside} and started again")
    space_file.parent.mkdir(parents=True, exist_ok=True)
    space_file.write_text(to_yaml(space))
    argv = ["--method", method, "--space", str(space_file), "--out", str(exp.parent),
            "--name", exp.name]
    if num_cpus:
        argv += ["--num-cpus", str(num_cpus)]
    print(f"[compare] python -m tuner.search {' '.join(argv)}")
    return search.main(argv)


def run_method(name: str, settings: Settings, root: Path, spaces_dir: Path,
               num_cpus: int | None) -> str:
    """The search (with its seed retrainings) of one method; returns a status line."""
    space = method_space(name, settings, spaces_dir)
    exp = root / "searches" / name
    code = run_piece(name, space, root / "spaces" / f"{name}.yaml", exp, num_cpus)
    if code != 0 or not (exp / "best_config.yaml").is_file():
        return f"failed: search exited with {code}" if code else "failed: no trial finished"
    return "done"


# ---------------------------------------------------------------------------- results
def seed_rows(root: Path, name: str) -> list[dict[str, Any]]:
    """Test metrics of every finished retraining run of ``name``'s chosen configuration
    (its search's ``repeats.csv``, rows of the winner in ``search.json``)."""
    from tuner.repeats import CSV

    exp = root / "searches" / name
    if not (exp / CSV).is_file() or not (exp / "search.json").is_file():
        return []
    winner = (json.loads((exp / "search.json").read_text()).get("repeats") or {}).get("winner_rank")
    table = pd.read_csv(exp / CSV)
    if winner is None or "test_mAP" not in table:
        return []
    table = table[(table["rank"] == winner) & table["test_mAP"].notna()]
    return [{"method": name, "seed": int(row["seed"]),
             **{k: float(row.get(f"test_{k}", math.nan)) for k in METRICS}}
            for _, row in table.iterrows()]


def aggregate(seeds: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean and sample standard deviation (ddof=1; NaN for one seed) of each metric."""
    out = []
    for name, rows in seeds.groupby("method", sort=False):
        row: dict[str, Any] = {"method": name, "seeds": len(rows)}
        for key in METRICS:
            values = rows[key].to_numpy(dtype=float)
            row[f"{key}_mean"] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        out.append(row)
    return pd.DataFrame(out)


def search_summary(exp: Path) -> dict[str, Any]:
    """Best validation mAP, its test mAP and the cost of one search directory."""
    from tuner.report import cost_ledger, load_experiment

    if not (exp / "best_config.yaml").is_file():
        return {}
    loaded = load_experiment(exp)
    _, totals = cost_ledger(loaded)
    board = loaded.board.dropna(subset=["val_mAP"])
    return {"search_val_mAP": float(board["val_mAP"].max()) if len(board) else math.nan,
            "search_test_mAP": float(loaded.test.get("mAP", math.nan)),
            "search_cpu_hours": totals["cpu_hours"], "search_gpu_hours": totals["gpu_hours"],
            "search_stopped_share": totals["stopped_share_cpu"]}


def comparison_table(root: Path, names: Sequence[str], status: dict[str, str]) -> pd.DataFrame:
    """One row per requested method (skipped ones with their reason)."""
    seeds = pd.DataFrame([r for n in names for r in seed_rows(root, n)])
    if len(seeds):
        seeds.to_csv(root / "seeds.csv", index=False)
    agg = aggregate(seeds).set_index("method") if len(seeds) else pd.DataFrame()
    rows = []
    for name in names:
        row: dict[str, Any] = {"method": name, "status": status.get(name, "")}
        if name in agg.index:
            row.update(agg.loc[name].to_dict())
        row.update(search_summary(root / "searches" / name))
        rows.append(row)
    return pd.DataFrame(rows)


def _pm(row: pd.Series, key: str) -> str:
    mean, std = row.get(f"{key}_mean", math.nan), row.get(f"{key}_std", math.nan)
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.2f}" + ("" if math.isnan(std) else f" ± {std:.2f}")


def _num(value: Any, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(table: pd.DataFrame, settings: Settings, link: str = ".md") -> str:
    """The comparison as a Markdown table, each method linking to its search report."""
    lines = [f"Test mAP (%) of each method's best configuration retrained with {settings.seeds} "
             f"seeds (mean ± sample std); DigitsMLT view `{settings.label_regime}`, "
             f"{settings.trials} trials x {settings.epochs} epochs, ASHA grace "
             f"{settings.grace_period}, reduction {settings.reduction_factor}.", "",
             "| method | mAP | head | medium | tail | search val mAP | seeds | CPU-h | GPU-h | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        name = row["method"]
        report = Path("searches") / name / "report.html"
        shown = f"[{name}]({report})" if row.get("status") == "done" else name
        cpu = row.get("search_cpu_hours", math.nan)
        gpu = row.get("search_gpu_hours", math.nan)
        lines.append(
            f"| {shown} | {_pm(row, 'mAP')} | {_pm(row, 'mAP_head')} | {_pm(row, 'mAP_medium')} "
            f"| {_pm(row, 'mAP_tail')} | {_num(row.get('search_val_mAP', math.nan), '.2f')} "
            f"| {_num(row.get('seeds', math.nan), '.0f')} | {_num(cpu, '.3f')} | {_num(gpu, '.3f')} "
            f"| {row.get('status', '')} |")
    return "\n".join(lines) + "\n"


def html_page(md_table: pd.DataFrame, settings: Settings, figure: Path | None) -> str:
    """The comparison report: table, figure, and links to each method's search report."""
    e = html.escape
    rows = []
    for _, row in md_table.iterrows():
        name = str(row["method"])
        cell = (f'<a href="searches/{e(name)}/report.html">{e(name)}</a>'
                if row.get("status") == "done" else e(name))
        vals = "".join(f"<td>{e(_pm(row, k))}</td>" for k in METRICS)
        rows.append(f"<tr><td>{cell}</td>{vals}<td>{e(_num(row.get('search_val_mAP', math.nan), '.2f'))}"
                    f"</td><td>{e(str(row.get('status', '')))}</td></tr>")
    img = f'<img src="figures/{e(figure.name)}" alt="comparison">' if figure else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>comparison</title>"
            f"<style>td,th{{border:1px solid #ccc;padding:3px 6px}}table{{border-collapse:collapse}}"
            f"</style></head><body><h1>Method comparison</h1><pre>{e(json.dumps(asdict(settings), indent=1))}"
            f"</pre><table><tr><th>method</th><th>mAP</th><th>head</th><th>medium</th><th>tail</th>"
            f"<th>search val mAP</th><th>status</th></tr>{''.join(rows)}</table>{img}</body></html>\n")


def plot_comparison(table: pd.DataFrame, seeds: pd.DataFrame, settings: Settings,
                    out: Path) -> Path | None:
    """Grouped bars (mean over seeds, std as error bars) with each seed as a dot."""
    from tuner.report import pyplot, save_figure

    done = table.dropna(subset=["mAP_mean"]) if "mAP_mean" in table else table.iloc[0:0]
    if done.empty:
        return None
    plt = pyplot()
    width = 0.8 / len(METRICS)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(done) + 2), 4.2))
    colors = ("#4c72b0", "#1f77b4", "#ff7f0e", "#d62728")
    for j, (key, color) in enumerate(zip(METRICS, colors)):
        xs = np.arange(len(done)) + (j - 1.5) * width
        stds = np.nan_to_num(done[f"{key}_std"].to_numpy(dtype=float))
        ax.bar(xs, done[f"{key}_mean"], width, yerr=stds, capsize=2, color=color, alpha=0.85,
               label=key.replace("mAP_", "") if key != "mAP" else "total")
        for x, name in zip(xs, done["method"]):
            values = seeds.loc[seeds["method"] == name, key]
            ax.plot([x] * len(values), values, "o", ms=3.5, mfc="white", mec="k", mew=0.8)
    ax.plot([], [], "o", ms=3.5, mfc="white", mec="k", label="seeds")
    ax.set_xticks(range(len(done)), done["method"])
    top = np.nanmax(seeds[list(METRICS)].to_numpy(dtype=float))
    ax.set_ylim(0, 1.2 * top)
    ax.set(ylabel="test mAP (%)", title=f"{settings.label_regime}: {settings.trials} trials x "
           f"{settings.epochs} epochs per method, {settings.seeds} seeds")
    ax.legend(fontsize=8, ncol=5, loc="upper center")
    out.mkdir(exist_ok=True)
    return save_figure(fig, out / "comparison.png")


def write_results(root: Path, names: Sequence[str], status: dict[str, str],
                  settings: Settings) -> pd.DataFrame:
    table = comparison_table(root, names, status)
    table.to_csv(root / "comparison.csv", index=False)
    (root / "comparison.md").write_text(markdown(table, settings))
    seeds = pd.read_csv(root / "seeds.csv") if (root / "seeds.csv").is_file() else pd.DataFrame()
    figure = plot_comparison(table, seeds, settings, root / "figures") if len(seeds) else None
    (root / "comparison.html").write_text(html_page(table, settings, figure))
    return table


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tuner.compare", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="all", help="comma-separated names, or all (default)")
    p.add_argument("--benchmark", default="digits-mlt", help="benchmark (default digits-mlt)")
    p.add_argument("--label-regime", required=True,
                   help="label view: clean, missing:Q or candidate:RHO (e.g. missing:0.6)")
    p.add_argument("--view-seed", type=int, default=0, help="seed of the label view (default 0)")
    p.add_argument("--trials", type=int, default=8, help="trials per method (default 8)")
    p.add_argument("--epochs", type=int, default=6, help="epoch budget per trial (default 6)")
    p.add_argument("--grace-period", type=int, help="ASHA grace period (default epochs // 3)")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA reduction factor")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once (default 2)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed of every search")
    p.add_argument("--seeds", type=int, default=3, help="retraining seeds per method (default 3)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--data-cpus", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, help="logical CPUs of the local Ray cluster")
    p.add_argument("--data-dir", help="prepared benchmark directory (default: the cache)")
    p.add_argument("--spaces", default=str(ROOT / "search_spaces"), help="search-space folder")
    p.add_argument("--out", default="comparisons", help="root folder (default ./comparisons)")
    p.add_argument("--name", help="comparison name (default REGIME-TIMESTAMP); reuse to resume")
    p.add_argument("--no-reports", action="store_true", help="skip each search's report.html")
    return p


def check_settings(root: Path, settings: Settings) -> None:
    """Store the settings, or refuse to resume a comparison made with other ones."""
    path = root / "compare.json"
    if path.is_file():
        before = json.loads(path.read_text())
        diff = {k: (before.get(k), v) for k, v in asdict(settings).items() if before.get(k) != v}
        if diff:
            raise ConfigError(f"{root} was made with other settings {diff} (old, new); use the "
                              "same options to resume or another --name")
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(settings), indent=1))


def _main(argv: Sequence[str] | None) -> int:
    import methods

    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    names = methods.list_methods() if args.methods == "all" else [
        n.strip() for n in args.methods.split(",") if n.strip()]
    run, skipped = plan(names, settings, Path(args.spaces))
    for name in run:  # every space is checked before anything runs
        method_space(name, settings, Path(args.spaces))
    label = settings.label_regime.replace(":", "")
    root = Path(args.out).resolve() / (args.name or f"{label}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_settings(root, settings)
    status = {name: f"skipped: {why}" for name, why in skipped.items()}
    for name, why in skipped.items():
        print(f"[compare] {name} skipped: {why}")
    t0 = time.perf_counter()
    ray_was_up = _ray_up()
    try:
        for name in run:
            status[name] = run_method(name, settings, root, Path(args.spaces), args.num_cpus)
            if not args.no_reports and finished(root / "searches" / name):
                _report(root / "searches" / name)
    finally:
        if not ray_was_up and _ray_up():  # leave a cluster the caller started alone
            from tuner.cluster import stop_local

            stop_local()
    table = write_results(root, names, status, settings)
    print(markdown(table, settings))
    print(f"comparison: {root / 'comparison.html'} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _report(exp: Path) -> None:
    from tuner.report import build_report

    if (exp / "best_config.yaml").is_file() and not (exp / "report.html").is_file():
        print(f"[compare] report: {build_report(exp)}")


def _ray_up() -> bool:
    import ray

    return ray.is_initialized()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
