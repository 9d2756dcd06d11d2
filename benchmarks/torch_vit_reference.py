"""The PyTorch reference of the ViT attention-transfer train step, for speed comparisons with
``python -m at_jax.bench --method vit_copy|vit_distill|vit_scratch`` (written for at_jax from the
attention-transfer port's ``models_dual_vit.py`` conventions): a pre-norm ViT (qkv bias, exact
GELU, LayerNorm eps 1e-6, class token), the teacher under ``no_grad`` run first, the student with
the teacher's attention in blocks 0..depth−4 (copy) or with the distillation loss over them
(weight 3; distill), AdamW.

    python benchmarks/torch_vit_reference.py --model vit-tiny/4 --method copy [--device cuda]

prints one JSON line (images_per_s, step_ms, first_step_s, ...).
"""

from __future__ import annotations

import argparse
import json
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch_reference import timed

SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, given=None):
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        attn = given.softmax(dim=-1) if given is not None else logits.softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))), logits


class ViT(nn.Module):
    def __init__(self, name: str, image_size: int, classes: int = 10):
        super().__init__()
        match = re.match(r"^vit-(\w+)/(\d+)$", name)
        if not match:
            raise SystemExit(f"--model must be vit-SIZE/P, got {name!r}")
        dim, depth, heads = SIZES[match.group(1)]
        patch = int(match.group(2))
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)

    def forward(self, x, given=()):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        logits = []
        for i, block in enumerate(self.blocks):
            x, attention = block(x, given[i] if i < len(given) else None)
            logits.append(attention)
        return self.head(self.norm(x)[:, 0]), logits


def time_step(
    model="vit-tiny/4",
    method="copy",
    batch=128,
    image_size=32,
    steps=20,
    device="cpu",
    dtype="float32",
) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    student = ViT(model, image_size).to(dev)
    teacher = ViT(model, image_size).to(dev).eval()
    last = len(teacher.blocks) - 3
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05)
    x = torch.randn(batch, 3, image_size, image_size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            t_logits = []
            if method != "scratch":
                with torch.no_grad():
                    _, t_logits = teacher(x)
            given = t_logits[:last] if method == "copy" else ()
            logits, s_logits = student(x, given)
            loss = F.cross_entropy(logits.float(), y)
            if method == "distill":
                loss = loss + 3.0 * sum(
                    -(t.float().softmax(-1) * F.log_softmax(s.float(), -1)).sum(-1).mean()
                    for s, t in zip(s_logits[:last], t_logits[:last], strict=True)
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    first_s, elapsed, loss = timed(step, steps, dev, warmup=1)
    return {
        "images_per_s": steps * batch / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "first_step_s": first_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "model": model,
        "method": method,
        "batch": batch,
        "image_size": image_size,
        "dtype": dtype,
        "steps": steps,
        "loss": float(loss.detach()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-tiny/4")
    parser.add_argument("--method", choices=["copy", "distill", "scratch"], default="copy")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    print(
        json.dumps(
            time_step(
                args.model,
                args.method,
                args.batch,
                args.image_size,
                args.steps,
                args.device,
                args.dtype,
            )
        )
    )


if __name__ == "__main__":
    main()
