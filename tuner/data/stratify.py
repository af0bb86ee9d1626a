"""The stratified validation split, by the ``iterative-stratification`` package.

Used to carve a validation split out of a benchmark's test set (or its training set) so that
every class, tail classes included, keeps its share of positives in both parts: iterative
multi-label stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011) as
``iterstrat.ml_stratifiers.MultilabelStratifiedShuffleSplit`` implements it.
"""

from __future__ import annotations

from importlib.metadata import version

import numpy as np

from tuner.errors import ConfigError

METHOD = (f"iterative multi-label stratification (Sechidis et al. 2011), "
          f"iterative-stratification {version('iterative-stratification')} "
          f"MultilabelStratifiedShuffleSplit")


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the held-out rows: about ``fraction`` of the rows and of each class.

    One ``MultilabelStratifiedShuffleSplit(test_size=fraction, random_state=seed)`` split,
    the held-out rows being its test side. The package favours each class's share over the
    exact size, so the held-out count can miss ``round(fraction * N)`` by a few rows. The
    split depends only on ``labels`` (in row order) and ``seed`` (NumPy's legacy
    ``RandomState`` stream, fixed across NumPy versions).

    Args:
        labels: ``(N, C)`` 0/1 matrix, ``C >= 2``; rows without a label are spread evenly.
        fraction: share to hold out, in (0, 1).
        seed: the split's seed.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels, dtype=bool)
    if labels.ndim != 2 or labels.shape[1] < 2:
        raise ConfigError(f"stratification needs an (N, C >= 2) label matrix, got {labels.shape}")
    # imported here: iterstrat imports scikit-learn (0.8 s), and every search driver imports
    # this module through tuner.data.benchmarks without splitting anything
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    try:
        _, held_rows = next(splitter.split(np.zeros((len(labels), 1)), labels))
    except ValueError as exc:  # e.g. too few rows for a held-out share of `fraction`
        raise ConfigError(f"cannot hold out {fraction} of {len(labels)} images ({exc}); "
                          f"choose another fraction or a larger split") from exc
    held = np.zeros(len(labels), dtype=bool)
    held[held_rows] = True
    return held
