"""The streamed run from the command line: configs/imagenet.py on a generated image folder,
SIGKILL in the middle of an epoch, and two processes making one run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from at_jax import runs
from at_jax.metrics import read_jsonl
from conftest import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.model=resnet-tiny",
    "--config.data.image_size=32",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.optimizer.lr=0.05",
    "--config.log_every_steps=2",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet-like"), n_train=12)


def cli(workdir, data_dir, *extra, devices=2, process=None):
    cmd = [
        sys.executable,
        "-m",
        "at_jax.main",
        "--config",
        "configs/imagenet.py",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        *SMALL,
        *extra,
    ]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def finish(proc, timeout=400):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def test_sigkill_mid_epoch_then_the_same_command_ends_with_identical_metrics(folder, tmp_path):
    # 36 images / batch 8: 4 steps per epoch; checkpoints every 3 steps fall inside epochs
    extra = [
        "--config.num_epochs=3",
        "--config.checkpoint_every_steps=3",
        "--config.data.num_workers=2",
        "--config.optimizer.lr_decay_epochs=(2,)",
    ]
    reference = cli(tmp_path / "ref", folder, *extra)
    killed = cli(tmp_path / "killed", folder, *extra)
    mid_epoch = tmp_path / "killed" / "checkpoints" / "6"
    deadline = time.time() + 300
    while not mid_epoch.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "run ended before it could be interrupted"
    time.sleep(0.3)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    out = finish(cli(tmp_path / "killed", folder, *extra))
    assert "resuming" in out and "final test error" in out
    finish(reference)
    ref_rows = read_jsonl(str(tmp_path / "ref" / "metrics.jsonl"))
    res_rows = read_jsonl(str(tmp_path / "killed" / "metrics.jsonl"))
    assert [r["step"] for r in res_rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, res_rows, strict=True):
        for key in a:
            if key.startswith(("train/", "test/")) or key == "lr":
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)
    ref = json.load(open(tmp_path / "ref" / "results.json"))
    res = json.load(open(tmp_path / "killed" / "results.json"))
    for key in ("final_test_error", "final_test_top5_error", "best_test_error"):
        assert ref[key] == pytest.approx(res[key], abs=1e-6)
    # the Grain iterator's position is in the same Orbax checkpoint as the train state
    last = max(int(s) for s in os.listdir(tmp_path / "killed" / "checkpoints"))
    assert "process_0-of-1.json" in os.listdir(
        tmp_path / "killed" / "checkpoints" / str(last) / "data"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_with_the_same_global_batch(folder, tmp_path):
    extra = [
        "--config.num_epochs=1",
        "--config.log_every_steps=0",
        "--config.data.train_size=24",
    ]  # 3 steps
    port = free_port()
    procs = [
        cli(
            tmp_path / "two",
            folder,
            *extra,
            "--distributed",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            devices=1,
        )
        for i in range(2)
    ]
    single = cli(tmp_path / "one", folder, *extra, devices=1)
    outs = [finish(p) for p in procs]
    assert "final test error" in outs[0] and "final test error" not in outs[1]
    finish(single)
    shape = (32, 32, 3)
    _, two, _ = runs.load_run_variables(str(tmp_path / "two"), 3, shape)
    _, one, _ = runs.load_run_variables(str(tmp_path / "one"), 3, shape)
    flat_two = np.concatenate([np.ravel(a) for a in _leaves(two)])
    flat_one = np.concatenate([np.ravel(a) for a in _leaves(one)])
    assert flat_one.shape == flat_two.shape
    np.testing.assert_allclose(flat_two, flat_one, rtol=2e-4, atol=2e-5)
    two_rows = read_jsonl(str(tmp_path / "two" / "metrics.jsonl"))
    one_rows = read_jsonl(str(tmp_path / "one" / "metrics.jsonl"))
    assert two_rows[-1]["train/loss"] == pytest.approx(one_rows[-1]["train/loss"], rel=1e-4)
    assert two_rows[-1]["test/error"] == pytest.approx(one_rows[-1]["test/error"], abs=1e-6)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_cli_errors_are_one_clear_line(folder, tmp_path):
    proc = cli(tmp_path, folder, "--config.data.imag_size=64")
    out = finish_fail(proc)
    assert "unknown config key 'data.imag_size'" in out and "Traceback" not in out
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "at_jax.main",
            "--config",
            "configs/nope.py",
            "--workdir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot load the config file" in proc.stderr and "configs/nope.py" in proc.stderr
    proc = cli(tmp_path / "x", tmp_path / "nowhere")
    out = finish_fail(proc)
    assert "no such directory" in out and "Expected layout" in out and "Traceback" not in out


def finish_fail(proc):
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    return out
