"""How right are SPLC's label corrections on DigitsMLT? (issue 18, item 3)

SPLC (``methods/splc.py``) turns an unobserved label positive for the current batch when the
model's probability is above ``tau``, from epoch ``change_epoch`` on. The paper starts this
after one epoch of an ImageNet-pretrained ResNet, whose confident predictions on missing
labels are mostly right. This script trains SPLC at its defaults (``--params`` overrides them)
in ``--space``'s regime, in-process and deterministic as ``digits_signal.py`` does, and prints
for every epoch, over the training batches of that epoch (the corrections are made per batch
and never stored):

* ``corrected``: unobserved labels turned positive, summed over the epoch's batches;
* ``precision``: the share of those that are true positives of the clean labels;
* ``recall``: the share of the missing positives (true, unobserved) that were corrected;
* the validation mAP after the epoch.

    python benchmarks/splc_correction.py --seeds 0,1
    python benchmarks/splc_correction.py --seeds 0 --params '{"change_epoch": 8}'
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
from digits_signal import Run, default_train, prepared_run

from tuner.data.prepared import PreparedData, ensure_prepared
from tuner.loop import fit
from tuner.space import load_space


class CorrectionTally:
    """Per-epoch counts of SPLC's corrections against the clean training labels."""

    def __init__(self, method: Any, truth: torch.Tensor) -> None:
        self.method, self.truth = method, truth
        self.counts: dict[int, np.ndarray] = {}

    def add(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        observed = batch["target"].to(logits)
        corrected = self.method.corrected_target(logits, observed) > observed
        true = self.truth[batch["index"].cpu()].to(torch.bool)
        missing = (observed == 0).cpu() & true
        corrected = corrected.cpu()
        row = np.array([int(corrected.sum()), int((corrected & true).sum()), int(missing.sum())])
        self.counts[self.method.current_epoch] = self.counts.get(
            self.method.current_epoch, np.zeros(3, dtype=np.int64)) + row

    def epoch(self, epoch: int) -> dict[str, float]:
        corrected, right, missing = self.counts.get(epoch, np.zeros(3, dtype=np.int64))
        return {"corrected": int(corrected),
                "precision": right / corrected if corrected else float("nan"),
                "recall": right / missing if missing else float("nan")}


def correction_run(data_dir: str, run: Run) -> list[dict[str, Any]]:
    """One SPLC run; per epoch its corrections' counts and the validation mAP."""
    method, model, cfg, train = prepared_run(data_dir, run)
    _, truth = PreparedData(data_dir).true_labels("train")
    tally = CorrectionTally(method, torch.from_numpy(truth))
    loss = method.loss

    def counted_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tally.add(logits.detach(), batch)
        return loss(logits, batch)

    method.loss = counted_loss
    rows: list[dict[str, Any]] = []
    fit(method, model, cfg, train, lambda m, s: rows.append(m), device=torch.device("cpu"))
    return [{"epoch": m["epoch"], "val_mAP": m["val_mAP"], **tally.epoch(m["epoch"] - 1)}
            for m in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default="search_spaces/splc.yaml", help="regime and constants")
    p.add_argument("--data-dir", help="prepared DigitsMLT (default: the cache)")
    p.add_argument("--seeds", default="0", help="train seeds, e.g. 0,1,2")
    p.add_argument("--params", default="{}", help="SPLC parameters as JSON (default: the paper's)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the space's max_epochs)")
    args = p.parse_args()
    space = load_space(args.space)
    if space.method != "splc":
        raise SystemExit(f"--space {args.space}: method is {space.method!r}, expected splc")
    try:
        params = json.loads(args.params)
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as exc:
        raise SystemExit(f"--params {args.params!r} / --seeds {args.seeds!r}: {exc}") from None
    data_dir = str(ensure_prepared("digits-mlt", args.data_dir,
                                   head_share=space.data["head_share"]))
    for seed in seeds:
        run = Run("splc", "splc", {"train": {**default_train(space), "seed": seed},
                                   "method": params}, space.view(), args.epochs or space.max_epochs)
        print(f"SPLC {params or 'paper defaults'}, seed {seed}, {space.view().name}:")
        for r in correction_run(data_dir, run):
            print(f"  epoch {r['epoch']}: corrected {r['corrected']:6d}  precision "
                  f"{r['precision']:.3f}  recall of missing {r['recall']:.3f}  val mAP "
                  f"{r['val_mAP']:.2f}", flush=True)


if __name__ == "__main__":
    main()
