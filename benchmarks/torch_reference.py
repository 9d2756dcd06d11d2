"""The PyTorch reference of the AT train step, for speed comparisons (written for at_jax from the
paper and the authors' CIFAR code's conventions): WRN-D-K with pre-activation blocks, the
teacher in eval mode under ``no_grad``, the student in train mode, CE + β·Σ_groups at_loss
(the code's form: the mean squared difference of l2-normalised maps ``x.pow(2).mean(1)``), SGD
with momentum 0.9 and weight decay 5e-4.

    python benchmarks/torch_reference.py [--device cuda] [--compile] [--dtype bfloat16]

prints one JSON line (images_per_s, step_ms, compile_s, ...). :func:`time_step` is what
``benchmarks/gpu_check.py`` calls.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 shortcut on the pre-activated input when the
    width changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn0, self.bn1 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if c_in != c_out else None

    def forward(self, x):
        o = F.relu(self.bn0(x))
        y = self.conv1(F.relu(self.bn1(self.conv0(o))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WRN(nn.Module):
    """WRN-depth-width for CIFAR-sized inputs; ``forward`` returns (logits, group outputs)."""

    def __init__(self, depth: int, width: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        groups, c_in = [], 16
        for c_out, stride in zip(widths, (1, 2, 2), strict=True):
            blocks = [
                Block(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
            c_in = c_out
        self.groups = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for group in self.groups:
            x = group(x)
            feats.append(x)
        pooled = F.relu(self.bn(x)).mean((2, 3))
        return self.fc(pooled), feats


def attention(x):
    return F.normalize(x.float().pow(2).mean(1).flatten(1))


def at_loss(s, t):
    return (attention(s) - attention(t)).pow(2).mean()


def parse_wrn(name: str) -> tuple[int, int]:
    """``"wrn-16-2"`` -> (16, 2)."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "wrn":
        raise ValueError(f"the torch reference has WRNs only (wrn-D-K), got {name!r}")
    return int(parts[1]), int(parts[2])


def timed(run, steps: int, dev: torch.device, warmup: int = 2) -> tuple[float, float, Any]:
    """``(first step s, seconds of `steps` steady steps, last loss)`` of ``run() -> loss``:
    the first (compiling) step, ``warmup`` more (a compiled step may recompile once for the
    optimizer state), then the timed ones; CUDA is synchronised around each phase."""

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    float(run().detach())
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        run()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = run()
    float(loss.detach())
    sync()
    return first_s, time.perf_counter() - t0, loss


def time_step(
    student: str = "wrn-16-1",
    teacher: str = "wrn-16-2",
    batch: int = 128,
    image_size: int = 32,
    steps: int = 50,
    device: str = "cpu",
    dtype: str = "float32",
    compile: bool = False,
    compile_backend: str = "inductor",
    beta: float = 1e3,
) -> dict:
    """Time the AT step: the first (compiling) step and ``steps`` steady ones."""
    dev = torch.device(device)
    torch.manual_seed(0)
    s_net = WRN(*parse_wrn(student)).to(dev)
    t_net = WRN(*parse_wrn(teacher)).to(dev).eval()
    opt = torch.optim.SGD(s_net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, image_size, image_size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    autocast = dtype == "bfloat16"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                _, t_feats = t_net(x)
            logits, s_feats = s_net(x)
            loss = F.cross_entropy(logits.float(), y) + beta * sum(
                at_loss(a, b) for a, b in zip(s_feats, t_feats, strict=True)
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    run = torch.compile(step, backend=compile_backend) if compile else step

    first_s, elapsed, loss = timed(run, steps, dev)
    return {
        "images_per_s": steps * batch / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "first_step_s": first_s,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype,
        "compile": compile_backend if compile else "eager",
        "batch": batch,
        "steps": steps,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="wrn-16-1")
    parser.add_argument("--teacher", default="wrn-16-2")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--compile", action="store_true")
    a = parser.parse_args()
    print(
        json.dumps(
            time_step(a.student, a.teacher, a.batch, 32, a.steps, a.device, a.dtype, a.compile)
        )
    )


if __name__ == "__main__":
    main()
