import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from procs import wait_until

from at_jax import runs, step as step_lib, train
from at_jax.data import load_dataset
from at_jax.data.batching import array_batches
from at_jax.files import read_jsonl
from at_jax.sharding import data_mesh, sharded
from at_jax.train import position
from configs import fashion_mnist
from conftest import apply_flags, assert_same_run, tiny_config, xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_teacher_then_at_kd_student_end_to_end(idx_dir, teacher_dir, tmp_path):
    teacher_results = json.load(open(teacher_dir / "results.json"))
    assert teacher_results["epochs"] == 5 and teacher_results["loss_terms"] == ["ce"]
    # learnable data: the teacher is far better than chance (90% error) after 5 epochs
    assert teacher_results["final_test_error"] < 50

    config = tiny_config(idx_dir, "at_kd", num_epochs=1)
    config.teacher.workdir = str(teacher_dir)
    results = train.train_and_evaluate(config, str(tmp_path), progress=False)
    assert results["teacher_test_error"] == pytest.approx(
        teacher_results["final_test_error"], abs=1e-4
    )
    assert results["loss_terms"] == ["at", "kd"]
    row = read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]
    for key in (
        "train/at",
        "train/kd",
        "train/loss",
        "train/error",
        "test/error",
        "lr",
        "images_per_s",
    ):
        assert np.isfinite(row[key]), key
    assert row["train/loss"] == pytest.approx(row["train/kd"] + 1e3 * row["train/at"], rel=1e-4)
    assert os.listdir(tmp_path / "tensorboard")
    assert json.load(open(tmp_path / "results.json")) == results
    # the attention distance to the teacher is measured at every evaluation, per group, and
    # equals the independent analysis of the saved student
    from at_jax.analysis import attention_distance

    data = load_dataset("fashion_mnist", "local", str(idx_dir))
    s_model, s_vars, _ = runs.load_run_variables(str(tmp_path), 10, data.image_shape)
    t_model, t_vars, _ = runs.load_run_variables(str(teacher_dir), 10, data.image_shape)
    expected = attention_distance(
        (s_model, s_vars), (t_model, t_vars), data.test_images, data.mean, data.std
    )
    final = results["final_attention_distance"]
    assert set(final) == {"group0<-group0", "group1<-group1", "group2<-group2", "mean"}
    for key, value in expected.items():
        assert final[key] == pytest.approx(value, rel=1e-4), key
    assert row["test/attention_distance"] == pytest.approx(expected["mean"], rel=1e-4)
    assert row["test/attention/group1<-group1"] == pytest.approx(
        expected["group1<-group1"], rel=1e-4
    )


def test_rerun_reuses_a_finished_run_refuses_another_config_and_extends(
    idx_dir, teacher_dir, tmp_path
):
    import shutil

    workdir = tmp_path / "teacher"
    shutil.copytree(teacher_dir, workdir)
    saved = json.load(open(workdir / "results.json"))
    metrics = (workdir / "metrics.jsonl").read_text()
    config = tiny_config(idx_dir, "teacher", model="wrn-tiny", num_epochs=5)
    assert train.train_and_evaluate(config, str(workdir), progress=False) == saved
    assert (workdir / "metrics.jsonl").read_text() == metrics
    # the options of a term that is off, and where compiled programs are cached, do not make
    # another run
    config.compilation_cache_dir = str(tmp_path / "another-cache")
    config.loss.kd.temperature = 2.0
    config.loss.kd.legacy = not config.loss.kd.legacy
    assert train.train_and_evaluate(config, str(workdir), progress=False) == saved
    with pytest.raises(ValueError, match=r"different config \(optimizer.lr: 0.05 -> 0.2\)"):
        train.train_and_evaluate(
            tiny_config(
                idx_dir, "teacher", model="wrn-tiny", num_epochs=5, **{"optimizer.lr": 0.2}
            ),
            str(workdir),
            progress=False,
        )
    with pytest.raises(
        ValueError, match=r"checkpoint at step 40 \(epoch 5\), beyond config.num_epochs=3"
    ):
        train.train_and_evaluate(
            tiny_config(idx_dir, "teacher", model="wrn-tiny", num_epochs=3),
            str(workdir),
            progress=False,
        )
    assert json.load(open(workdir / "results.json")) == saved
    assert (workdir / "metrics.jsonl").read_text() == metrics
    # more epochs: the run resumes from its last checkpoint
    longer = train.train_and_evaluate(
        tiny_config(idx_dir, "teacher", model="wrn-tiny", num_epochs=6),
        str(workdir),
        progress=False,
    )
    assert longer["epochs"] == 6
    assert [r["epoch"] for r in read_jsonl(str(workdir / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]
    assert longer["wall_time_s"] > saved["wall_time_s"] * 0.5


def cli_command(workdir, *extra, data_dir, method="student"):
    """The CLI on the tiny IDX data, with the config file given by its absolute path (the
    command runs from another directory: configs load from anywhere)."""
    return [
        sys.executable,
        "-m",
        "at_jax.main",
        "--config",
        os.path.join(REPO, "configs", "fashion_mnist.py") + f":{method}",
        "--workdir",
        str(workdir),
        "--config.model=wrn-tiny",
        "--config.data.source=local",
        f"--config.data.data_dir={data_dir}",
        "--config.batch_size=32",
        "--config.eval_batch_size=64",
        "--config.optimizer.lr=0.05",
        "--config.data.augment.crop_pad=1",
        *extra,
    ]


def cli_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "XLA_FLAGS": xla_flags()}  # the CLI picks one CPU device per core


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


@pytest.mark.heavy
def test_sigterm_then_sigkill_mid_epoch_then_the_same_command_ends_like_an_uninterrupted_run(
    teacher_run, tmp_path, procs
):
    """In-memory data, a CRD student (its memory banks are train state). SIGTERM mid-epoch: the
    step in flight ends, a checkpoint is saved, one line says so, exit code 143. The same command
    resumes; SIGKILL mid-epoch (the newest checkpoint is then older than the last step); the
    same command again finishes the run with the metrics of an uninterrupted one. Every command
    runs from a directory outside the repository, with the config given by path."""
    teacher_dir, idx_dir = teacher_run
    extra = [
        f"--config.teacher.workdir={teacher_dir}",
        "--config.loss.crd.k=64",
        "--config.num_epochs=3",
        "--config.optimizer.lr_decay_epochs=(2,)",
        "--config.checkpoint_every_steps=3",
        "--config.log_every_steps=1",
    ]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(name):
        return procs.start(
            cli_command(tmp_path / name, *extra, data_dir=idx_dir, method="crd"),
            cwd=elsewhere,
            env=cli_env(),
        )

    # the uninterrupted reference, in this process (2 devices, as the CLI picks on 2 cores);
    # the runs below then load its compiled programs from the shared cache
    reference = apply_flags(
        fashion_mnist.get_config("crd"), cli_command("ref", *extra, data_dir=idx_dir)[7:]
    )
    train.train_and_evaluate(reference, str(tmp_path / "ref"), progress=False)
    rows = tmp_path / "run" / "metrics.jsonl"
    first = run("run")  # 8 steps per epoch; a metrics row per step
    wait_until(lambda: len(read_jsonl(str(rows))) >= 2, first, 240, "step 2")
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, out
    stopped = re.search(
        r"stopped by SIGTERM at step (\d+) \(epoch 1, step (\d+) of 8\); "
        r"checkpoint saved; run the same command to resume",
        out,
    )
    assert stopped and stopped.group(1) == stopped.group(2), out
    step = int(stopped.group(1))
    assert 2 <= step < 8 and (tmp_path / "run" / "checkpoints" / str(step)).is_dir()
    assert out.strip().splitlines()[-1].startswith("stopped by SIGTERM"), out
    assert "Traceback" not in out

    second = run("run")  # resumes at that step; killed in epoch 2, after checkpoint 12
    wait_until(
        lambda: (tmp_path / "run" / "checkpoints" / "12").is_dir(), second, 240, "checkpoint 12"
    )
    second.send_signal(signal.SIGKILL)
    second.wait()
    out = finish(run("run"))
    assert f"from step 12 ({position(12, 8)})" in out and "epoch 2, step 4 of 8" in out
    assert_same_run(tmp_path / "ref", tmp_path / "run", rel=1e-5)


def make_step(config, data, mesh):
    steps = len(data.train_labels) // config.batch_size
    return step_lib.Step.from_config(config, data.spec, steps, mesh=mesh)


@pytest.mark.heavy
def test_sharded_step_equals_single_device(idx_dir):
    if len(jax.devices()) != 8:  # rerun this test alone in a process with 8 simulated devices
        name = f"{os.path.abspath(__file__)}::test_sharded_step_equals_single_device"
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", name],
            cwd=REPO,
            env={**os.environ, "XLA_FLAGS": xla_flags(8)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr
        return
    config = tiny_config(idx_dir, "student")
    data = load_dataset("fashion_mnist", "local", str(idx_dir))
    idx = jnp.arange(32, dtype=jnp.int32)[None]
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = Mesh(np.asarray(devices), ("data",))
        st = make_step(config, data, mesh)
        state = st.init_state()
        batch = {
            "index": jax.device_put(idx, sharded(mesh, None, "data")),
            "pool_image": jax.device_put(data.train_images, st.replicated),
            "pool_label": jax.device_put(data.train_labels, st.replicated),
        }
        state, sums = st.train_step(state, batch, {})
        assert len(state.params["student"]["fc"]["kernel"].sharding.device_set) == len(devices)
        results.append((jax.device_get(state.params), jax.device_get(sums)))
    (p1, s1), (p8, s8) = results
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), p1, p8)
    np.testing.assert_allclose(s1["train/loss"], s8["train/loss"], rtol=1e-5)


def one_step(config, data, idx):
    mesh = data_mesh()
    st = make_step(config, data, mesh)
    batch = {
        "index": jax.device_put(idx, sharded(mesh, None, "data")),
        "pool_image": jax.device_put(data.train_images, st.replicated),
        "pool_label": jax.device_put(data.train_labels, st.replicated),
    }
    state, metrics = st.train_step(st.init_state(), batch, {})
    return st, jax.device_get((state.params, metrics))


@pytest.mark.heavy
def test_seed_strategies_unrolled_seeds_equal_single_seed_runs(idx_dir):
    data = load_dataset("fashion_mnist", "local", str(idx_dir))
    idx = np.stack([np.arange(32), np.arange(32, 64)]).astype(np.int32)
    out = {}
    for strategy in ("vmap", "unroll"):
        st, out[strategy] = one_step(
            tiny_config(idx_dir, "student", num_seeds=2, seed_strategy=strategy), data, idx
        )
        assert st.seed_strategy() == strategy
    first = lambda tree, s: jax.tree.map(lambda a: a[s], tree)  # noqa: E731
    # seed 0 is the same in both; under vmap the "rbg" PRNG draws other (equally valid)
    # augmentation for the later seeds, so each strategy is deterministic on its own
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        first(out["vmap"], 0),
        first(out["unroll"], 0),
    )
    # unrolled, seed s of a K-seed run is exactly the single-seed run with seed + s
    _, single = one_step(tiny_config(idx_dir, "student", seed=1), data, idx[1:])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        first(out["unroll"], 1),
        first(single, 0),
    )
    assert not np.allclose(out["unroll"][1]["train/loss"][0], out["unroll"][1]["train/loss"][1])
    assert (
        make_step(tiny_config(idx_dir, num_seeds=2), data, data_mesh()).seed_strategy() == "unroll"
    )  # auto, on CPU
    # evaluation of every seed: the same numbers either way
    from at_jax import evaluate

    st = make_step(tiny_config(idx_dir, num_seeds=2), data, data_mesh())
    state = st.init_state()
    got = [
        evaluate.evaluate(
            evaluate.make_eval_fn(st.model, data.mean, data.std, seeds=2, seed_strategy=strategy),
            evaluate.student_variables(state),
            array_batches(data.test_images, data.test_labels, 64),
        )
        for strategy in ("vmap", "unroll")
    ]
    for key in ("error", "top5_error"):
        assert got[0][key].shape == (2,)
        np.testing.assert_allclose(got[0][key], got[1][key])


def test_two_seeds_train_independently_in_one_program(idx_dir, tmp_path):
    config = tiny_config(idx_dir, "student", num_seeds=2)
    results = train.train_and_evaluate(config, str(tmp_path), progress=False)
    per_seed = results["final_test_error_per_seed"]
    assert len(per_seed) == 2
    assert results["final_test_error"] == pytest.approx(np.median(per_seed))
    _, variables, _ = runs.load_run_variables(str(tmp_path), 10, (16, 16, 1), seed_index=0)
    _, other, _ = runs.load_run_variables(str(tmp_path), 10, (16, 16, 1), seed_index=1)
    kernel = np.stack([variables["params"]["conv0"]["kernel"], other["params"]["conv0"]["kernel"]])
    assert kernel.shape[0] == 2 and not np.allclose(kernel[0], kernel[1])


def test_missing_teacher_is_explained(idx_dir, tmp_path):
    config = tiny_config(idx_dir, "at")
    config.teacher.workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json: train that run first"):
        train.train_and_evaluate(config, str(tmp_path / "s"), progress=False)
    config.teacher.workdir = ""
    with pytest.raises(ValueError, match="no teacher is set"):
        train.train_and_evaluate(config, str(tmp_path / "s"), progress=False)


def test_teacher_checkpoint_that_does_not_match_its_config(idx_dir, teacher_dir, tmp_path):
    import shutil

    copy = tmp_path / "teacher"
    shutil.copytree(teacher_dir, copy)
    saved = json.load(open(copy / "config.json"))
    saved["model"] = "wrn-16-1"
    json.dump(saved, open(copy / "config.json", "w"))
    config = tiny_config(idx_dir, "at")
    config.teacher.workdir = str(copy)
    with pytest.raises(ValueError, match="does not match the architecture"):
        train.train_and_evaluate(config, str(tmp_path / "s"), progress=False)


def test_bad_batch_size_and_missing_data(idx_dir, tmp_path):
    n = len(jax.devices())
    assert n > 1, "the test suite runs with several simulated devices (tests/conftest.py)"
    with pytest.raises(ValueError, match=f"not divisible by the {n} devices"):
        train.train_and_evaluate(
            tiny_config(idx_dir, batch_size=32 * n + 1), str(tmp_path), progress=False
        )
    with pytest.raises(FileNotFoundError, match="looked in"):
        train.train_and_evaluate(tiny_config(tmp_path / "empty"), str(tmp_path), progress=False)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(idx_dir, tmp_path):
    config = tiny_config(idx_dir, num_epochs=3)
    config.optimizer.lr_decay_epochs = (1,)
    config.optimizer.lr_decay_factor = 1e30  # epoch 2 explodes
    with pytest.raises(train.TrainingDiverged, match="epoch 2.*last good checkpoint \\(step 8\\)"):
        train.train_and_evaluate(config, str(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["8"]
    assert not (tmp_path / "results.json").exists()
    assert [r["epoch"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1]


def test_method_configs_compose_terms():
    from at_jax import recipes
    from configs import cifar10, cifar100, fashion_mnist

    for module in (cifar10, cifar100, fashion_mnist):
        for method in recipes.METHODS:
            config = module.get_config(method)
            from at_jax.objective import validate_terms

            active = validate_terms(dict(config.loss))
            assert active, method
    config = cifar10.get_config("at_kd_decay")
    assert config.loss.at.weight_schedule == "lr" and config.loss.ce.weight == 0
    assert cifar10.get_config("at_fmax1").loss.at.reduce == "max"
    assert cifar100.get_config("teacher").data.name == "cifar100"
    assert cifar10.get_config("kd").teacher.workdir == "runs/cifar10/wrn-16-2"
    # the reference CIFAR code's details: BN scales U(0, 1); the paper's (pre-2018) KD on the
    # CIFAR-10 and Fashion-MNIST tables, today's on CIFAR-100; F-ActT's β decays with the lr
    for module, legacy in ((cifar10, True), (fashion_mnist, True), (cifar100, False)):
        config = module.get_config("kd")
        assert config.model_overrides.bn_scale_init == "uniform"
        assert config.loss.kd.legacy is legacy
    assert cifar10.get_config("factt").loss.factt.weight_schedule == "lr"
    with pytest.raises(ValueError, match="unknown method"):
        cifar10.get_config("distill")


def test_the_objective_is_checked_once_and_passed_on(idx_dir, monkeypatch):
    """validate_config checks config.loss and returns its active terms; the step, its networks
    and its metrics take them as they are, without checking them again."""
    from at_jax import objective, recipes
    from at_jax.data import DataSpec

    config = tiny_config(idx_dir, "at")
    config.teacher.workdir = ""
    config.loss.at.weight = 0.0
    config.loss.factt.weight = 0.0
    terms = recipes.validate_config(config)
    assert isinstance(terms, objective.ActiveTerms) and list(terms) == ["ce"]
    calls = []
    real = objective.validate_terms
    monkeypatch.setattr(objective, "validate_terms", lambda spec: calls.append(spec) or real(spec))
    spec = DataSpec(10, (16, 16, 1), (0.5,), (0.25,))
    st = step_lib.Step.from_config(config, spec, 4, terms=terms)
    assert sorted(st.empty_sums()) == [
        "train/ce", "train/count", "train/errors", "train/loss", "train/top5_errors"
    ]  # fmt: skip
    assert st.attention_pairs() is None and calls == []
    step_lib.Step.from_config(config, spec, 4)  # without them, config.loss is checked here
    assert len(calls) == 1
