"""Training images/s and peak GPU memory of one TailCLIP epoch on generated images.

Runs exactly what a trial runs per step: ``TailCLIP.training_step`` (image tower, caption
text tower, class-prompt embeddings once per epoch, contrastive + balanced loss), backward and
an AdamW step built by ``tuner.loop.build_optimizer``, on random images and long-tailed random
labels (COCO-MLT-sized by default: 1,909 images per epoch, 80 classes, batch 32, 224 px, as in
the TailCLIP configs). Two warm-up steps (kernel selection, allocator) are not timed; then one
epoch (or ``--steps`` steps) is. Random weights: speed and memory do not depend on them.

    python benchmarks/clip_throughput.py                       # ViT-B-16, 224 px, on the GPU
    python benchmarks/clip_throughput.py --arch RN50 --amp     # bfloat16 autocast
    python benchmarks/clip_throughput.py --arch tiny --steps 3 # CPU smoke run (48 px)
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch

import methods
from methods.base import TaskInfo
from tuner.clip import ARCHS, clip_config
from tuner.data.stream import normalize
from tuner.loop import TrainConfig, build_optimizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="ViT-B-16", choices=ARCHS)
    p.add_argument("--image-size", type=int, default=0, help="0 = the architecture's (224/48)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=1909, help="images per epoch (COCO-MLT: 1909)")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--steps", type=int, default=0, help="timed steps (0 = one whole epoch)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (as train.amp)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_task(n: int, c: int, seed: int) -> tuple[TaskInfo, torch.Tensor]:
    """A long-tailed (Pareto-like) random label table ``(n, c)`` and its TaskInfo."""
    g = torch.Generator().manual_seed(seed)
    rate = 0.3 * torch.arange(1, c + 1, dtype=torch.float64) ** -1.0  # head 30%, tail ~0.4%
    labels = (torch.rand(n, c, generator=g, dtype=torch.float64) < rate).float()
    empty = labels.sum(1) == 0
    labels[empty, torch.randint(0, c, (int(empty.sum()),), generator=g)] = 1.0
    task = TaskInfo(num_classes=c, num_train=n, class_counts=tuple(int(v) for v in labels.sum(0)),
                    max_epochs=1, class_names=tuple(f"object {i}" for i in range(c)))
    return task, labels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    task, labels = make_task(args.images, args.classes, args.seed)
    method = methods.create_method("tailclip", {"clip_arch": args.arch,
                                                "clip_image_size": args.image_size}, task)
    method.set_train_targets(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random init is the point here
        model = method.configure_model(torch.nn.Identity()).to(device)
    size = args.image_size or clip_config(args.arch)["vision_cfg"]["image_size"]
    optimizer = build_optimizer(model, TrainConfig(lr=1e-6, weight_decay=0.01))
    params = sum(p.numel() for p in model.parameters())
    draws = torch.multinomial(method.sample_weights(0).float(), args.images, replacement=True)
    steps = args.steps or math.ceil(args.images / args.batch_size)

    def step(i: int) -> int:
        index = draws[(i * args.batch_size) % args.images:][: args.batch_size]
        raw = torch.randint(0, 256, (len(index), 3, size, size), dtype=torch.uint8, device=device)
        batch = {"image": normalize(raw), "target": labels[index].to(device), "index": index}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = method.training_step(model, batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(index)

    method.on_epoch_start(0)
    for i in range(2):  # warm-up, not timed
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    method.on_epoch_start(1)  # class-prompt embeddings are recomputed in the timed epoch
    start, seen = time.perf_counter(), 0
    for i in range(steps):
        seen += step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"TailCLIP {args.arch} {size}px batch {args.batch_size} "
          f"{'bf16 autocast' if args.amp else 'fp32'} on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{params / 1e6:.1f}M parameters, {args.classes} classes")
    print(f"timed: {steps} steps, {seen} images in {elapsed:.2f} s -> {seen / elapsed:.1f} images/s")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        reserved = torch.cuda.max_memory_reserved(device) / 2**30
        print(f"peak GPU memory: {peak:.2f} GiB allocated, {reserved:.2f} GiB reserved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
