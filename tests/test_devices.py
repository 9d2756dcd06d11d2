import os
import subprocess
import sys

import jax

from at_jax import devices
from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_device_count_divides_the_batch():
    assert devices.cpu_device_count(2, 128) == 2
    assert devices.cpu_device_count(16, 128) == 16
    assert devices.cpu_device_count(6, 128) == 4  # 6 and 5 do not divide 128
    assert devices.cpu_device_count(4, 6) == 3
    assert devices.cpu_device_count(3, None) == 3
    assert devices.cpu_device_count(0, 7) == 1


def test_a_device_count_chosen_by_the_user_is_kept():
    # conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=N for this process
    n = len(jax.devices())
    assert devices.use_cpu_cores(128, cores=n + 1) is None
    assert len(jax.devices()) == n


def _fresh_python(code):
    # other XLA flags (the tests' compilation flags), but no device count: the program picks
    env = {**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_one_cpu_device_per_core_in_a_fresh_process():
    code = (
        "from at_jax import devices; n = devices.use_cpu_cores(6, cores=4); import jax; "
        "print(n, len(jax.devices()))"
    )
    assert _fresh_python(code)[-2:] == ["3", "3"]


def test_too_late_to_change_the_device_count_is_a_no_op():
    code = (
        "import jax; jax.numpy.ones(3).sum(); from at_jax import devices; "
        "print(devices.use_cpu_cores(6, cores=4), len(jax.devices()))"
    )
    assert _fresh_python(code)[-2:] == ["None", "1"]


def test_the_tests_use_only_the_xla_flags_this_jaxlib_knows():
    from conftest import FAST_COMPILE_FLAGS, _known_xla_flags

    # an unknown flag in XLA_FLAGS would abort every test process: it is left out
    assert _known_xla_flags(("--xla_cpu_no_such_flag=1",)) == ""
    assert set(os.environ["AT_JAX_TESTS_XLA_FLAGS"].split()) <= set(FAST_COMPILE_FLAGS)
    assert xla_flags(3).endswith("--xla_force_host_platform_device_count=3")
    assert "device_count" not in xla_flags()
