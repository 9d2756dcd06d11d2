"""JAX's persistent compilation cache: the directory fills and a second process reads it."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import sys

import jax
import jax.numpy as jnp

from at_jax.compilation_cache import use_compilation_cache

events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
print("cache", use_compilation_cache(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0)(jnp.ones(7)).block_until_ready()
print("hits", sum(e.endswith("/cache_hits") for e in events))
print("misses", sum(e.endswith("/cache_misses") for e in events))
"""


def run(directory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, directory],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())


def test_the_cache_fills_and_a_second_process_reads_it(tmp_path):
    directory = tmp_path / "xla"
    first = run(str(directory))
    assert first["cache"] == str(directory) and first["hits"] == "0" and first["misses"] != "0"
    assert os.listdir(directory)  # the compiled programs are written
    second = run(str(directory))
    assert second["hits"] != "0" and second["misses"] == "0"
    off = run("")
    assert off["cache"] == "None" and off["hits"] == "0"
