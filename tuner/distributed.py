"""Data-parallel training across the workers of one trial (torch.distributed, any backend).

The loop does not wrap the model in ``DistributedDataParallel``: methods run their own forward
passes (extra heads, features, CAMs, text encoders), which bypass ``DDP.forward`` and would
leave gradients unsynchronised. Instead :class:`TorchDist` averages every gradient with one
all-reduce per bucket after ``backward`` (the same arithmetic as DDP, without the overlap),
broadcasts rank 0's initial weights, and re-broadcasts buffers (BatchNorm statistics) from
rank 0 before each validation, as DDP does at every forward.

Method state follows :class:`methods.base.Dist`: per-sample tables are merged with
``merge_rows`` (each worker owns the rows of the images in its shard), batch statistics
with ``all_reduce_sum``. :func:`run_workers` runs a function in N local gloo processes, for
tests and benchmarks.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from methods.base import Dist

_BUCKET_ELEMENTS = 2**22  # 16 MiB of float32 per all-reduce


class TorchDist(Dist):
    """:class:`~methods.base.Dist` over an initialised ``torch.distributed`` process group."""

    def __init__(self) -> None:
        if not tdist.is_available() or not tdist.is_initialized():
            raise RuntimeError("TorchDist needs an initialised torch.distributed process group")
        self.world_size = tdist.get_world_size()
        self.rank = tdist.get_rank()
        # NCCL reduces CUDA tensors only; gloo takes CPU tensors
        nccl = tdist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        out = tensor.detach().to(self.device or tensor.device, copy=True)
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out.to(tensor.device)

    def all_have(self, flag: bool) -> bool:
        """True when ``flag`` is true on every worker (a collective: all must call it)."""
        count = torch.tensor([1.0 if flag else 0.0], device=self.device)
        tdist.all_reduce(count, op=tdist.ReduceOp.SUM)
        return int(count.item()) == self.world_size

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every worker."""
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                tdist.broadcast(tensor.data, src=0)

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every worker."""
        with torch.no_grad():
            for tensor in module.buffers():
                tdist.broadcast(tensor.data, src=0)

    def average_gradients(self, module: nn.Module) -> None:
        """Replace every gradient by its mean over workers (bucketed all-reduce)."""
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:  # a parameter unused on one worker still takes part
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for p in params:
            by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in by_dtype.values():
            bucket: list[Tensor] = []
            size = 0
            for grad in grads:
                bucket.append(grad)
                size += grad.numel()
                if size >= _BUCKET_ELEMENTS:
                    self._reduce_bucket(bucket)
                    bucket, size = [], 0
            if bucket:
                self._reduce_bucket(bucket)

    def _reduce_bucket(self, grads: list[Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple,
            out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; their results.

    ``fn`` must be importable (a module-level function) and return something ``torch.save``
    can write (tensors, dicts, numbers). A failing worker raises here.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
                 join=True)
        return [
            torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)
            for r in range(world_size)
        ]
