"""Search-space YAML files: parsing, validation (all problems at once) and Optuna define-by-run.

A space file has these sections (see ``search_spaces/*.yaml``)::

    method: hill
    data:      {benchmark, data_dir, head_share, label_regime, rate, seed}
    train:     training hyperparameters (TrainConfig fields)     constants or domains
    params:    the method's hyperparameters (its Params fields)  constants or domains
    asha:      {max_epochs, grace_period, reduction_factor}
    search:    {num_trials, max_concurrent (an integer or auto), seed, n_startup_trials,
                max_failures, sampler (tpe | random), scheduler (asha | fifo),
                stopped_trials (pruned | complete), repeats, repeats_top,
                order (trial | arrival: tuner.ordering)}
    resources: {cpus_per_trial, gpus_per_trial, data_cpus, workers_per_trial, cpus_per_worker,
                gpus_per_worker}

A domain is a one-key mapping in Ray Tune's vocabulary: ``uniform: [lo, hi]``,
``loguniform: [lo, hi]``, ``randint: [lo, hi]`` (hi exclusive), ``choice: [a, b, ...]``.
Anything else is a constant. Ordered / conditional constraints: a bound may name a parameter
defined earlier in ``train`` or ``params`` (or ``max_epochs``), e.g. ``alpha_end: {uniform:
[alpha_start, 1.0]}``; a ``choice`` may carry ``below: NAME_OR_NUMBER`` to keep only smaller
options, e.g. SPLC's ``change_epoch: {choice: [0, 1, 2, 3, 5], below: max_epochs}``.
Sampling is define-by-run in file order, so such constraints always hold. An empty file, or
a space without any domain and more than one trial (identical trials), is refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from methods.base import MethodParams, check_value
from methods.registry import get_method_class
from tuner.data.corruption import ViewSpec
from tuner.errors import ConfigError, TunerError
from tuner.loop import TrainConfig

DOMAINS = ("uniform", "loguniform", "randint", "choice")
SECTIONS = {
    "method": None,
    "data": {"benchmark": "digits-mlt", "data_dir": None, "head_share": None,
             "label_regime": "clean", "rate": 0.0, "seed": 0, "class_stats": "observed",
             "groups": "benchmark"},
    "train": None,
    "params": None,
    "asha": {"max_epochs": 6, "grace_period": 2, "reduction_factor": 2},
    "search": {"num_trials": 8, "max_concurrent": 2, "seed": 0, "n_startup_trials": None,
               "max_failures": 2, "sampler": "tpe", "scheduler": "asha",
               "stopped_trials": "pruned", "repeats": 0, "repeats_top": 3, "order": "trial"},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0, "data_cpus": 1,
                  "workers_per_trial": 1, "cpus_per_worker": 1, "gpus_per_worker": 0,
                  "data_path": "auto"},
}
BUDGET_NAMES = ("max_epochs",)
#: the closed choices of the search section
SEARCH_CHOICES = {
    "sampler": ("tpe", "random"),
    "scheduler": ("asha", "fifo"),
    "stopped_trials": ("pruned", "complete"),
    "order": ("trial", "arrival"),
}
_INVALID = object()  # placeholder of a domain that failed to parse (already reported)


@dataclass(frozen=True)
class Domain:
    """A tunable value: ``kind`` in :data:`DOMAINS` with ``args`` (bounds or options)."""

    kind: str
    args: tuple[Any, ...]
    below: Any = None

    def refs(self) -> list[str]:
        """Names this domain's bounds refer to."""
        values = list(self.args[:2]) if self.kind != "choice" else []
        return [v for v in [*values, self.below] if isinstance(v, str)]


@dataclass
class SearchSpace:
    """A parsed, validated space file."""

    path: str
    method: str
    data: dict[str, Any]
    train: dict[str, Any]
    params: dict[str, Any]
    asha: dict[str, Any]
    search: dict[str, Any]
    resources: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def max_epochs(self) -> int:
        return int(self.asha["max_epochs"])

    def view(self) -> ViewSpec:
        d = self.data
        return ViewSpec(d["label_regime"], float(d["rate"] or 0.0), int(d["seed"]))

    def tunables(self) -> dict[str, Domain]:
        out = {f"train/{k}": v for k, v in self.train.items() if isinstance(v, Domain)}
        out.update({f"method/{k}": v for k, v in self.params.items() if isinstance(v, Domain)})
        return out

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: suggest every domain in file order; return the constants."""
        known: dict[str, Any] = {"max_epochs": self.max_epochs}
        constants: dict[str, Any] = {}
        for section, values in (("train", self.train), ("method", self.params)):
            for key, value in values.items():
                name = f"{section}/{key}"
                if isinstance(value, Domain):
                    known[key] = suggest(trial, name, value, known)
                else:
                    known[key] = constants[name] = value
        return constants

    def fixed_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """This space with every domain replaced by the trial ``config``'s value (a YAML doc)."""
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.raw.items()}
        out["train"] = dict(config.get("train", {}))
        out["params"] = dict(config.get("method", {}))
        out["search"] = {**self.search, "num_trials": 1, "max_concurrent": 1, "repeats": 0}
        return out


def _resolve(bound: Any, known: Mapping[str, Any]) -> Any:
    return known[bound] if isinstance(bound, str) else bound


def suggest(trial: Any, name: str, domain: Domain, known: Mapping[str, Any]) -> Any:
    """Sample one domain with an Optuna trial, resolving bounds that name earlier values."""
    if domain.kind == "choice":
        options = list(domain.args)
        if domain.below is not None:
            limit = _resolve(domain.below, known)
            options = [o for o in options if o < limit]
        return trial.suggest_categorical(name, options)
    low, high = (_resolve(b, known) for b in domain.args[:2])
    if domain.kind == "randint":
        return trial.suggest_int(name, int(low), int(high) - 1)
    return trial.suggest_float(name, float(low), float(high), log=domain.kind == "loguniform")


# ---------------------------------------------------------------------------- parsing
def _parse_domain(value: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        return value
    keys = set(value) - {"below"}
    if len(keys) != 1 or next(iter(keys)) not in DOMAINS:
        problems.append(f"{where}: a domain is one of {list(DOMAINS)} (+ optional `below`), "
                        f"got keys {sorted(value)}")
        return _INVALID
    kind = keys.pop()
    args = value[kind]
    if not isinstance(args, list) or not args:
        problems.append(f"{where}: `{kind}` takes a non-empty list, got {args!r}")
        return _INVALID
    if kind != "choice":
        problem = _bounds_problem(kind, args)
        if problem:
            problems.append(f"{where}: {problem}")
            return _INVALID
    if "below" in value and kind != "choice":
        problems.append(f"{where}: `below` applies to `choice` only; use a named bound instead")
        return _INVALID
    return Domain(kind, tuple(args), value.get("below"))


def _bounds_problem(kind: str, args: list[Any]) -> str | None:
    if len(args) != 2:
        return f"`{kind}` takes [low, high], got {args!r}"
    nums = [a for a in args if not isinstance(a, str)]
    if any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in nums):
        return f"`{kind}` bounds must be numbers or names of earlier parameters, got {args!r}"
    if len(nums) == 2 and not args[0] < args[1]:
        return f"`{kind}` needs low < high, got {args!r}"
    if kind == "loguniform" and any(a <= 0 for a in nums):
        return f"`loguniform` needs positive bounds, got {args!r}"
    if kind == "randint" and any(isinstance(a, float) and not a.is_integer() for a in nums):
        return f"`randint` needs integer bounds, got {args!r}"
    return None


def _check_against(
    cls: type[MethodParams], section: str, values: dict[str, Any], known: set[str],
    problems: list[str],
) -> None:
    """Unknown keys, and constants / domain ends outside the dataclass's valid ranges."""
    specs = cls.field_specs()
    for key, value in values.items():
        where = f"{section}.{key}"
        if value is _INVALID:
            known.add(key)
            continue
        if key not in specs:
            problems.append(f"{where}: unknown key; valid keys are {sorted(specs)}")
            continue
        for ref in value.refs() if isinstance(value, Domain) else []:
            if ref not in known:
                problems.append(f"{where}: bound {ref!r} is not a parameter defined earlier")
        for probe in _probe_values(value):
            problem = check_value(key, probe, specs[key])
            if problem:
                problems.append(f"{where}: {problem}")
                break
        known.add(key)


def _probe_values(value: Any) -> list[Any]:
    if not isinstance(value, Domain):
        return [value]
    if value.kind == "choice":
        return list(value.args)
    low, high = value.args
    if value.kind == "randint" and not isinstance(high, str):
        high = high - 1
    return [v for v in (low, high) if not isinstance(v, str)]


def _merge_section(raw: dict[str, Any], name: str, problems: list[str]) -> dict[str, Any]:
    defaults = SECTIONS[name]
    given = raw.get(name) or {}
    if not isinstance(given, dict):
        problems.append(f"{name}: must be a mapping, got {type(given).__name__}")
        return dict(defaults or {})
    if defaults is None:
        return dict(given)
    for key in sorted(set(given) - set(defaults)):
        problems.append(f"{name}.{key}: unknown key; valid keys are {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}}


def _check_settings(space: dict[str, dict[str, Any]], problems: list[str]) -> None:
    asha, search, res = space["asha"], space["search"], space["resources"]
    ints = [("asha.max_epochs", asha["max_epochs"], 1), ("asha.grace_period", asha["grace_period"], 1),
            ("asha.reduction_factor", asha["reduction_factor"], 2),
            ("search.num_trials", search["num_trials"], 1),
            ("search.seed", search["seed"], 0), ("search.max_failures", search["max_failures"], 0),
            ("search.repeats", search["repeats"], 0), ("search.repeats_top", search["repeats_top"], 1),
            ("resources.workers_per_trial", res["workers_per_trial"], 1)]
    if search["max_concurrent"] != "auto":
        ints.append(("search.max_concurrent", search["max_concurrent"], 1))
    for where, value, low in ints:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{where}: must be an integer >= {low}, got {value!r}")
    budget = (asha["grace_period"], asha["max_epochs"])
    if all(isinstance(v, int) for v in budget) and budget[0] > budget[1]:
        problems.append(f"asha.grace_period: must be <= max_epochs={asha['max_epochs']}, "
                        f"got {asha['grace_period']}")
    for key in ("cpus_per_trial", "gpus_per_trial", "data_cpus", "cpus_per_worker",
                "gpus_per_worker"):
        value = res[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(f"resources.{key}: must be a number >= 0, got {value!r}")
    if isinstance(res["cpus_per_trial"], (int, float)) and res["cpus_per_trial"] <= 0:
        problems.append("resources.cpus_per_trial: must be > 0 (a trial needs a CPU slot)")
    if isinstance(res["cpus_per_worker"], (int, float)) and res["cpus_per_worker"] <= 0:
        problems.append("resources.cpus_per_worker: must be > 0 (a Train worker needs a CPU slot)")
    if res["data_path"] not in ("auto", "memory", "stream"):
        problems.append(f"resources.data_path: must be one of auto/memory/stream, "
                        f"got {res['data_path']!r}")
    for key, options in SEARCH_CHOICES.items():
        if search[key] not in options:
            problems.append(f"search.{key}: must be one of {'/'.join(options)}, "
                            f"got {search[key]!r}")
    _check_benchmark(space["data"], problems)
    if space["data"]["groups"] not in ("benchmark", "observed"):
        problems.append(f"data.groups: must be benchmark (the benchmark's true groups, DBL "
                        f"protocol) or observed (PLT protocol), got {space['data']['groups']!r}")
    if space["data"]["class_stats"] not in ("observed", "clean"):
        problems.append(f"data.class_stats: must be observed or clean, "
                        f"got {space['data']['class_stats']!r}")
    try:
        ViewSpec(space["data"]["label_regime"], float(space["data"]["rate"] or 0.0),
                 int(space["data"]["seed"]))
    except (TunerError, TypeError, ValueError) as exc:
        problems.append(f"data: {exc}")


def _check_something_to_tune(space: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """Without a domain every trial trains the same configuration: only one is worth running."""
    trials = space["search"]["num_trials"]
    domains = [v for sec in ("train", "params") for v in space[sec].values() if isinstance(v, Domain)]
    if not domains and isinstance(trials, int) and trials > 1:
        problems.append(f"search.num_trials: {trials} trials of a space without any domain "
                        f"(uniform/loguniform/randint/choice in train or params) would all be "
                        f"the same; add a domain, or set num_trials: 1 to train this configuration")


def _check_below_budget(space: dict[str, dict[str, Any]], problems: list[str]) -> None:
    """A ``choice`` with ``below: max_epochs`` (or a number) must keep an option at this budget:
    otherwise Optuna fails mid-search on an empty ``suggest_categorical``."""
    max_epochs = space["asha"]["max_epochs"]
    for section in ("train", "params"):
        for key, value in space[section].items():
            if not isinstance(value, Domain) or value.below is None:
                continue
            limit = max_epochs if value.below == "max_epochs" else value.below
            if isinstance(limit, str) or not isinstance(limit, (int, float)):
                continue  # a bound named after another parameter is only known per trial
            if not any(o < limit for o in value.args):
                problems.append(f"{section}.{key}: no option of {list(value.args)} is below "
                                f"{value.below}={limit}; add a smaller option or raise the budget")


def _check_benchmark(data: dict[str, Any], problems: list[str]) -> None:
    from tuner.data.prepared import known_benchmarks

    if data["benchmark"] not in known_benchmarks():
        problems.append(f"data.benchmark: unknown benchmark {data['benchmark']!r}; choose one of "
                        f"{list(known_benchmarks())} (docs/benchmarks.md)")
    share = data["head_share"]
    if share is None:
        return
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        problems.append(f"data.head_share: must be null (the default build) or a number in "
                        f"(0, 1], got {share!r}")
    elif data["benchmark"] != "digits-mlt":
        problems.append(f"data.head_share: builds a DigitsMLT variant, so it is for digits-mlt "
                        f"only, not {data['benchmark']!r}; set it to null")


def load_space(path: str | Path, overrides: Mapping[str, Mapping[str, Any]] | None = None,
               method: str | None = None) -> SearchSpace:
    """Read, override and validate a space file; one ConfigError lists every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist; see search_spaces/*.yaml")
    try:
        raw = yaml.load(path.read_text(), Loader=yaml.SafeLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if not raw:
        raise ConfigError(f"{path}: the space file is empty, so there is nothing to tune; start "
                          f"from search_spaces/{method or 'METHOD'}.yaml")
    for section, values in (overrides or {}).items():
        raw[section] = {**(raw.get(section) or {}), **values}
    return parse_space(raw, str(path), method)


def parse_space(raw: dict[str, Any], path: str = "<space>", method: str | None = None) -> SearchSpace:
    """Validate a loaded space mapping (see :func:`load_space`)."""
    problems: list[str] = []
    for key in sorted(set(raw) - set(SECTIONS)):
        problems.append(f"{key}: unknown section; valid sections are {sorted(SECTIONS)}")
    name = method or raw.get("method")
    if raw.get("method") and method and raw["method"] != method:
        problems.append(f"method: the file is for {raw['method']!r} but --method is {method!r}")
    sections = {s: _merge_section(raw, s, problems) for s in SECTIONS if s != "method"}
    for section in ("train", "params"):
        sections[section] = {k: _parse_domain(v, f"{section}.{k}", problems)
                             for k, v in sections[section].items()}
    if "max_epochs" in sections["train"]:
        problems.append("train.max_epochs: set the epoch budget as asha.max_epochs")
        sections["train"].pop("max_epochs")
    known = set(BUDGET_NAMES)
    _check_against(TrainConfig, "train", sections["train"], known, problems)
    if not name:
        problems.append("method: missing; name the method in the file or with --method")
    else:
        try:
            _check_against(get_method_class(name).Params, "params", sections["params"], known,
                           problems)
        except ConfigError as exc:
            problems.append(f"method: {exc}")
    _check_settings(sections, problems)
    _check_below_budget(sections, problems)
    _check_something_to_tune(sections, problems)
    if problems:
        lines = "\n".join(f"  {path}: {p}" for p in problems)
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the search space:\n{lines}")
    return SearchSpace(path=path, method=name, raw=raw, **sections)


def to_yaml(doc: Mapping[str, Any]) -> str:
    """Dump a fixed config as YAML (plain types only)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, float) and math.isfinite(value):
            return float(value)
        if hasattr(value, "item"):
            return value.item()
        if dataclasses.is_dataclass(value):
            return plain(dataclasses.asdict(value))
        return value
    return yaml.safe_dump(plain(doc), sort_keys=False)
