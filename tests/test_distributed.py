"""Data-parallel training with real gloo processes: gradients, method state collectives."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from methods.base import Dist
from tuner.distributed import TorchDist, run_workers


def _grad_worker(rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # different initial weights per rank: broadcast must fix that
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    dist = TorchDist()
    dist.broadcast_module(model)
    x = torch.arange(16 * 4, dtype=torch.float32).reshape(16, 4) / 10
    mine = x[rank::world]
    model(mine).pow(2).mean().backward()
    dist.average_gradients(model)
    dist.broadcast_buffers(model)
    return {"weight": model[0].weight.detach().clone(), "grad": model[0].weight.grad.clone(),
            "mean": model[1].running_mean.clone()}


def _state_worker(rank: int, world: int) -> dict:
    dist = TorchDist()
    table = torch.zeros(6, 2)
    touched = torch.zeros(6, dtype=torch.bool)
    rows = torch.tensor([0, 2, 4]) if rank == 0 else torch.tensor([1, 3, 4])
    table[rows] = float(rank + 1)
    touched[rows] = True
    table[5] = 7.0  # untouched row: both ranks agree on it
    return {"merged": dist.merge_rows(table, touched),
            "sum": dist.all_reduce_sum(torch.tensor([rank + 1.0])),
            "mean": dist.all_reduce_mean(torch.tensor([rank + 1.0]))}


def test_gradients_are_averaged_over_workers_like_one_big_batch() -> None:
    out = run_workers(_grad_worker, 2)
    assert_close(out[0]["weight"], out[1]["weight"])
    assert_close(out[0]["grad"], out[1]["grad"])
    # reference: rank 0's initial weights, each shard's gradient averaged by hand
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    x = torch.arange(16 * 4, dtype=torch.float32).reshape(16, 4) / 10
    grads = []
    for r in range(2):
        model.zero_grad()
        model(x[r::2]).pow(2).mean().backward()
        grads.append(model[0].weight.grad.clone())
    assert_close(out[0]["grad"], (grads[0] + grads[1]) / 2)
    assert_close(out[0]["mean"], out[1]["mean"])


def test_method_state_collectives() -> None:
    out = run_workers(_state_worker, 2)
    expected = torch.tensor([[1.0] * 2, [2.0] * 2, [1.0] * 2, [2.0] * 2, [1.5] * 2, [7.0] * 2])
    for rank in range(2):
        assert_close(out[rank]["merged"], expected)
        assert_close(out[rank]["sum"], torch.tensor([3.0]))
        assert_close(out[rank]["mean"], torch.tensor([1.5]))


def test_single_process_dist_is_the_identity() -> None:
    dist = Dist()
    table = torch.randn(4, 3)
    assert dist.merge_rows(table, torch.tensor([True, False, True, False])) is table
    assert_close(dist.all_reduce_mean(torch.tensor([2.0])), torch.tensor([2.0]))
