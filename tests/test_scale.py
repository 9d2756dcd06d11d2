"""The streamed run from the command line (configs/imagenet.py on a generated image folder, 2
Grain workers): preemption (SIGTERM), SIGKILL and exact resume, no process left behind, two
processes making one run (and stopping together), and the CLI's one-line errors."""

import os
import re
import shutil
import signal
import socket
import sys

import numpy as np
import pytest
from procs import group_members, wait_group_gone, wait_until

from at_jax import runs, train
from at_jax.files import read_jsonl
from configs import imagenet
from conftest import apply_flags, assert_same_run, make_image_folder, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--config.model=resnet-tiny",
    "--config.data.image_size=32",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.optimizer.lr=0.05",
    "--config.log_every_steps=1",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet-like"), n_train=12)


def cli(procs, workdir, data_dir, *extra, devices=2):
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
        "XLA_FLAGS": xla_flags(devices),
    }
    return procs.start(cmd, cwd=REPO, env=env)


def finish(proc, timeout=400, code=0):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == code, out
    return out


def rows_at_least(workdir, n):
    return lambda: len(read_jsonl(str(workdir / "metrics.jsonl"))) >= n


@pytest.mark.heavy
def test_sigterm_and_sigkill_mid_epoch_with_2_workers_resume_exactly_and_leave_nothing(
    folder, tmp_path, procs
):
    # 36 images / batch 8: 4 steps per epoch; checkpoints every 3 steps fall inside epochs
    # one evaluation, at the end (each one starts the 2 workers again)
    extra = [
        "--config.num_epochs=2",
        "--config.checkpoint_every_steps=3",
        "--config.data.num_workers=2",
        "--config.optimizer.lr_decay_epochs=(1,)",
        "--config.eval_every_epochs=2",
    ]
    # the uninterrupted reference, in this process (the batches do not depend on the workers)
    reference = apply_flags(
        imagenet.get_config("student"), [*SMALL, *extra, f"--config.data.data_dir={folder}"]
    )
    reference.data.num_workers = 0
    train.train_and_evaluate(reference, str(tmp_path / "ref"), progress=False)
    run_dir = tmp_path / "run"
    first = cli(procs, run_dir, folder, *extra)
    wait_until(rows_at_least(run_dir, 2), first, 300, "step 2")
    first.send_signal(signal.SIGTERM)
    out = finish(first, 60, code=128 + signal.SIGTERM)
    stopped = re.search(
        r"stopped by SIGTERM at step (\d+) \(epoch (\d), step (\d) of 4\); "
        r"checkpoint saved; run the same command to resume\n?$",
        out,
    )
    assert stopped and "Traceback" not in out, out
    step = int(stopped.group(1))
    saved = run_dir / "checkpoints" / str(step)
    # the Grain iterator's position is in the same Orbax checkpoint as the train state
    assert "process_0-of-1.json" in os.listdir(saved / "data")

    second = cli(procs, run_dir, folder, *extra)
    wait_until(lambda: (run_dir / "checkpoints" / "6").is_dir(), second, 300, "checkpoint 6")
    family = group_members(second.pid)
    assert len(family) >= 3, family  # the run, its 2 Grain workers (and the resource tracker)
    second.send_signal(signal.SIGKILL)
    second.wait()
    left = wait_group_gone(second.pid, 10)
    assert not left, f"still alive 10 s after SIGKILL of the run: {left}"

    out = finish(cli(procs, run_dir, folder, *extra))
    assert "resuming" in out and "final test error" in out
    assert "leaked shared_memory" not in out
    assert_same_run(tmp_path / "ref", run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.heavy
def test_two_processes_train_like_one_and_stop_together_on_sigterm(folder, tmp_path, procs):
    """2 processes with the global batch of 1: the same parameters. SIGTERM to one of them
    stops both at the same step (JAX's preemption sync point), and the rerun finishes."""
    # 3 steps per epoch; the data read in-process (Grain's workers are tested above)
    # (a small lr: the two summation orders of batch norm's statistics stay within round-off)
    extra = [
        "--config.num_epochs=2",
        "--config.data.train_size=24",
        "--config.data.num_workers=0",
        "--config.optimizer.lr=0.01",
    ]
    # the same run in one process (this one: 2 devices, as the 2 processes have together)
    single = apply_flags(
        imagenet.get_config("student"), [*SMALL, *extra, f"--config.data.data_dir={folder}"]
    )
    train.train_and_evaluate(single, str(tmp_path / "one"), progress=False)

    def pair():
        port = free_port()
        return [
            cli(
                procs,
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

    first = pair()
    wait_until(rows_at_least(tmp_path / "two", 2), first[0], 300, "step 2")
    first[1].send_signal(signal.SIGTERM)
    outs = [finish(p, 120, code=128 + signal.SIGTERM) for p in first]
    steps = {re.search(r"stopped by SIGTERM at step (\d+)", out).group(1) for out in outs}
    assert len(steps) == 1, outs  # the same step on both processes
    assert (tmp_path / "two" / "checkpoints" / steps.pop()).is_dir()
    outs = [finish(p) for p in pair()]
    assert "final test error" in outs[0] and "final test error" not in outs[1]
    shape = (32, 32, 3)
    _, two, _ = runs.load_run_variables(str(tmp_path / "two"), 3, shape)
    _, one, _ = runs.load_run_variables(str(tmp_path / "one"), 3, shape)
    flat_two = np.concatenate([np.ravel(a) for a in _leaves(two)])
    flat_one = np.concatenate([np.ravel(a) for a in _leaves(one)])
    assert flat_one.shape == flat_two.shape
    np.testing.assert_allclose(flat_two, flat_one, rtol=2e-4, atol=2e-5)
    assert_same_run(tmp_path / "one", tmp_path / "two", rel=1e-4)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@pytest.mark.heavy
def test_cli_errors_are_one_clear_line(folder, tmp_path, procs):
    def error_of(*args, config="configs/imagenet.py", data_dir=folder):
        cmd = [
            sys.executable,
            "-m",
            "at_jax.main",
            "--config",
            config,
            "--workdir",
            str(tmp_path / "w"),
            f"--config.data.data_dir={data_dir}",
            *SMALL,
            *args,
        ]
        out = finish(procs.start(cmd, cwd=REPO), 120, code=1)
        assert "Traceback" not in out, out
        return out.strip().splitlines()[-1]

    assert "unknown config key 'data.imag_size'" in error_of("--config.data.imag_size=64")
    line = error_of(config="configs/nope.py")
    assert "cannot load the config file" in line and "configs/nope.py" in line
    line = error_of(data_dir=tmp_path / "nowhere")
    assert "no such directory" in line and "Expected layout" in line
    # every value is checked before anything is built
    line = error_of("--config.batch_size=0", "--config.data.num_workers=-1")
    assert "config.batch_size must be an integer >= 1, got 0" in line
    assert "config.data.num_workers must be an integer >= 0, got -1" in line
    assert not (tmp_path / "w" / "config.json").exists()
    # a broken image in the middle of training: the error is the last line, after the bar
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    victim = sorted((broken / "train" / "dog").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:100])
    cache = tmp_path / "xla-cache"
    line = error_of(
        "--config.num_epochs=1",
        "--config.data.num_workers=0",
        f"--config.compilation_cache_dir={cache}",
        data_dir=broken,
    )
    assert line.startswith(f"error: cannot decode {victim}") and "on_bad_image=skip" in line
    assert os.listdir(cache)  # the CLI compiled into the cache it was given
