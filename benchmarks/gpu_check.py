"""The GPU check in one command: at_jax's train steps on the device at hand, beside PyTorch's.

    python benchmarks/gpu_check.py --out DIR          # one H100/H200: within 8 minutes
    python benchmarks/gpu_check.py --out DIR --smoke  # the same code on CPU, tiny shapes (tests)

Records to ``DIR/gpu_check.json`` (rewritten after every section, so an interrupted check keeps
what it measured) and prints one line per section:

* ``environment``: device name and count, jax/jaxlib/flax/optax/torch versions;
* ``at_step``: the AT step WRN-16-2 -> WRN-16-1, CIFAR shapes (32x32), batch 128, float32 and
  bfloat16 (``at_jax.bench.run``: on-device augmentation, teacher forward, student
  forward/backward, SGD), each with its breakdown: compile, first step, steady-state step, and
  the device's peak memory so far;
* ``torch_step``: the same step in PyTorch (``benchmarks/torch_reference.py``), eager and with
  ``torch.compile``, float32 and bfloat16 (autocast), on the GPU when torch sees one;
* ``seeds``: 1, 4 and 8 students in one program (``config.num_seeds``; vmap on GPU) against
  one, images/s counting every student;
* ``imagenet_step``: the ImageNet AT step ResNet-34 -> ResNet-18, 224x224, batch 256, bfloat16.

Synthetic data: it needs neither tensorflow-datasets nor ml-collections' configs beyond what
at_jax imports, nor any dataset. A section that fails is recorded with its error and the check
goes on; sections that would start after ``--budget_s`` are recorded as skipped. ``--smoke``
runs every section with tiny models (WRN-10-1, a one-block ResNet), 16x16 and 32x32 inputs,
batch 16 and 8, 2 steps, seeds 1 and 2, and ``torch.compile``'s ``eager`` backend (no C++
compiler needed): the numbers mean nothing, the code is the same.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # torch_reference beside it

import jax

from at_jax import bench
from at_jax.errors import one_line_errors
from at_jax.files import write_json_atomic

FULL = {
    "student": "wrn-16-1",
    "teacher": "wrn-16-2",
    "image_size": 32,
    "batch": 128,
    "steps": 50,
    "dataset_size": 4096,
    "seeds": (1, 4, 8),
    "imagenet": {
        "student": "resnet-18",
        "teacher": "resnet-34",
        "image_size": 224,
        "batch": 256,
        "steps": 20,
        "dataset_size": 512,
    },
    "torch_compile_backend": "inductor",
}
SMOKE = {
    "student": "wrn-tiny",
    "teacher": "wrn-tiny",
    "image_size": 16,
    "batch": 16,
    "steps": 2,
    "dataset_size": 64,
    "seeds": (1, 2),
    "imagenet": {
        "student": "resnet-tiny",
        "teacher": "resnet-tiny",
        "image_size": 32,
        "batch": 8,
        "steps": 2,
        "dataset_size": 16,
    },
    "torch_compile_backend": "eager",
}
TORCH_NAMES = {"wrn-tiny": "wrn-10-1"}  # at_jax's test model in the reference's naming


def versions() -> dict:
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict:
    devices = jax.devices()
    return {
        "device": devices[0].device_kind,
        "platform": devices[0].platform,
        "num_devices": len(devices),
        **versions(),
    }


def at_step(p: dict, dtype: str = "float32", seeds: int = 1) -> dict:
    """at_jax's AT step on the pair, shapes and batch of ``p`` (``at_jax.bench.run``)."""
    return bench.run(
        "at", p["student"], p["teacher"], p["batch"], p["steps"], dtype=dtype, seeds=seeds,
        image_size=p["image_size"], dataset_size=p["dataset_size"],
    )  # fmt: skip


def at_steps(p: dict, done: dict) -> dict:
    return {dtype: at_step(p, dtype) for dtype in ("float32", "bfloat16")}


def torch_steps(p: dict, done: dict) -> dict:
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed (pip install torch)"}
    from torch_reference import time_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for compiled in (False, True):
        for dtype in ("float32", "bfloat16"):
            key = f"{'compiled' if compiled else 'eager'}_{dtype}"
            out[key] = time_step(
                TORCH_NAMES.get(p["student"], p["student"]),
                TORCH_NAMES.get(p["teacher"], p["teacher"]),
                p["batch"],
                p["image_size"],
                p["steps"],
                device,
                dtype,
                compiled,
                p["torch_compile_backend"],
            )
    return out


def seeds(p: dict, done: dict) -> dict:
    out = {}
    for k in p["seeds"]:
        if k == 1 and "at_step" in done:  # one seed: the float32 AT step, already measured
            out["1"] = done["at_step"]["float32"]
            continue
        out[str(k)] = at_step(p, seeds=k)
    one = out[str(p["seeds"][0])]["images_per_s"]
    out["speedup_vs_one_seed"] = {k: v["images_per_s"] / one for k, v in out.items()}
    return out


def imagenet_step(p: dict, done: dict) -> dict:
    return at_step(p["imagenet"], dtype="bfloat16")


SECTIONS: dict[str, Callable[[dict, dict], dict]] = {  # (params, the sections done)
    "at_step": at_steps,
    "torch_step": torch_steps,
    "seeds": seeds,
    "imagenet_step": imagenet_step,
}


def summary(name: str, result: dict) -> str:
    """One printed line for a section."""

    def rate(r: dict) -> str:
        return f"{r['images_per_s']:.0f} img/s"

    if "error" in result or "skipped" in result:
        return result.get("error") or result["skipped"]
    if name == "environment":
        return ", ".join(f"{k} {v}" for k, v in result.items())
    if name == "imagenet_step":
        r = result
        return f"{rate(r)} (compile {r['compile_s']:.1f} s, first step {r['first_step_s']:.2f} s)"
    if name == "seeds":
        return ", ".join(
            f"{k} seeds {rate(v)} (x{result['speedup_vs_one_seed'][k]:.2f})"
            for k, v in result.items()
            if k != "speedup_vs_one_seed"
        )
    return ", ".join(f"{k} {rate(v)}" for k, v in result.items() if "images_per_s" in v)


def run_check(out_dir: str, smoke: bool = False, budget_s: float = 450.0) -> dict:
    """Every section in turn; returns what ``gpu_check.json`` holds."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "gpu_check.json")
    params = SMOKE if smoke else FULL
    record: dict = {"smoke": smoke, "params": params, "environment": environment()}
    print(f"environment: {summary('environment', record['environment'])}", flush=True)
    start = time.perf_counter()
    for name, section in SECTIONS.items():
        if time.perf_counter() - start > budget_s:
            result: dict = {"skipped": f"past the time budget of {budget_s:.0f} s"}
        else:
            t0 = time.perf_counter()
            try:
                result = section(params, record)
            except Exception as e:
                result = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=5),
                }
            result["section_s"] = time.perf_counter() - t0
        record[name] = result
        record["total_s"] = time.perf_counter() - start
        write_json_atomic(path, record)
        shown = {k: v for k, v in result.items() if k != "section_s"}
        print(f"{name}: {summary(name, shown)}", flush=True)
    print(f"written: {path} ({record['total_s']:.0f} s)")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="at_jax's GPU check (see the module docstring)")
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, on any device")
    parser.add_argument(
        "--budget_s",
        type=float,
        default=450.0,
        help="no section starts after this many seconds (default 450)",
    )
    args = parser.parse_args(argv)
    with one_line_errors():
        record = run_check(args.out, args.smoke, args.budget_s)
    failed = [k for k, v in record.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
