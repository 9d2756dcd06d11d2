"""How long XLA:CPU takes to compile the tests' kind of program under different ``XLA_FLAGS``.

    python benchmarks/compile_flags.py            # the flag sets below, one process each
    python benchmarks/compile_flags.py --flags "--xla_cpu_use_fusion_emitters=false"

Each flag set runs in a fresh process (XLA reads ``XLA_FLAGS`` once) with the tests' settings
(2 simulated CPU devices, ``JAX_DISABLE_MOST_OPTIMIZATIONS=1``, no persistent cache) and times
``at_jax.bench.run`` of a tiny AT step (wrn-tiny, 16×16) and a tiny ViT distillation step
(vit-tiny/4, 4 blocks): their ``compile_s`` and the process's whole time for both. One JSON line
per flag set. The tests' own flags are in ``tests/conftest.py`` (``FAST_COMPILE_FLAGS``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FLAG_SETS = (
    "",
    "--xla_cpu_parallel_codegen_split_count=1",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1",
)
_CHILD = """
import json, time
t0 = time.perf_counter()
from at_jax import bench
at = bench.run("at", "wrn-tiny", "wrn-tiny", 16, 2, image_size=16, dataset_size=64)
vit = bench.run(
    "vit_distill", "vit-tiny/4", "vit-tiny/4", 16, 2, image_size=16, dataset_size=64,
    overrides={"depth": 4},
)
print(json.dumps({"at_compile_s": at["compile_s"], "vit_compile_s": vit["compile_s"],
                  "total_s": time.perf_counter() - t0}))
"""


def measure(flags: str) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
        "JAX_ENABLE_COMPILATION_CACHE": "false",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {flags}",
    }
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        return {"flags": flags, "error": out.stderr.strip().splitlines()[-1]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"flags": flags, **result, "process_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flags", action="append", help="a flag set (repeatable)")
    args = parser.parse_args(argv)
    for flags in args.flags or FLAG_SETS:
        print(json.dumps(measure(flags)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
