"""The distillation baselines as training terms: every method's config validates its feature
points against the models; CRD's memory lives in the train state on the device; the terms with
a first stage (AB, FSP, FT) train it in WORKDIR/init_stage and the main stage starts from it;
all of them train the tiny WRN from the shared teacher, and a run interrupted in its main stage
resumes to the numbers of an uninterrupted one."""

import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from at_jax import recipes, stages, train
from at_jax.checkpoints import restore_seeds
from at_jax.data import open_data
from at_jax.distill import REFERENCE_WEIGHTS
from at_jax.distill.methods import BASELINE_METHODS, baseline_term
from at_jax.files import read_jsonl
from at_jax.models import get_model
from at_jax.networks import Networks
from at_jax.sharding import data_mesh
from at_jax.step import Step
from at_jax.terms import TermData

SHAPE = (16, 16, 1)  # the tiny IDX images


def _teacher_shapes(name="wrn-tiny"):
    teacher = get_model(name, num_classes=10)
    return teacher, jax.eval_shape(teacher.init, jax.random.key(0), jnp.zeros((1, *SHAPE)))


def _spec():
    from at_jax.data import DataSpec

    return DataSpec(10, SHAPE, (0.5,), (0.25,))


def test_every_baseline_config_validates_and_finds_its_feature_points():
    """configs/fashion_mnist.py:<method> for all twelve (and crd_kd): the reference's weights,
    a valid config, and the networks built on the tiny WRN pair (shapes only); a student that
    lacks a method's feature point is refused in one line that names what is missing."""
    from configs import cifar100, fashion_mnist

    assert set(BASELINE_METHODS) == {*REFERENCE_WEIGHTS, "crd_kd"} and len(REFERENCE_WEIGHTS) == 12
    teacher, t_vars = _teacher_shapes()
    labels = np.arange(64) % 10
    for method in BASELINE_METHODS:
        name = method.split("_")[0]
        for module in (fashion_mnist, cifar100):
            config = module.get_config(method)
            assert config.loss[name].weight == REFERENCE_WEIGHTS[name]
            terms = recipes.validate_config(config)
        config = fashion_mnist.get_config(method)
        config.model = "wrn-tiny"
        net = Networks.from_config(
            config,
            _spec(),
            teacher_model=teacher,
            teacher_variables=t_vars,
            term_data=TermData(64, labels),
        )
        assert name in net.terms
        two = stages.plan(config, recipes.validate_config(config))
        assert (two is not None) == (name in ("ab", "fsp", "ft")), method
    assert fashion_mnist.get_config("crd_kd").loss.kd.alpha == 1.0
    terms = recipes.validate_config(fashion_mnist.get_config("ab"))
    assert stages.plan(fashion_mnist.get_config("ab"), terms).init_config.num_epochs == 30

    config = fashion_mnist.get_config("ab")
    config.model = "nin-tiny"  # no pre-activations sown
    with pytest.raises(ValueError, match="cannot pair 'preact'") as refused:
        Networks.from_config(config, _spec(), teacher_model=teacher, teacher_variables=t_vars)
    assert "\n" not in str(refused.value)
    config = fashion_mnist.get_config("fsp")
    config.model, config.loss.fsp.points = "wrn-tiny", "stem,group9"
    with pytest.raises(ValueError, match="no feature point 'group9'"):
        Networks.from_config(config, _spec(), teacher_model=teacher, teacher_variables=t_vars)
    config = fashion_mnist.get_config("crd")
    config.model = "wrn-tiny"
    with pytest.raises(ValueError, match="needs the training set's labels"):
        Networks.from_config(config, _spec(), teacher_model=teacher, teacher_variables=t_vars)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"loss.rkd": {"weight": 1.0, "init_epochs": 5}}, "has no stage of its own"),
        ({"loss.ab.init_epochs": 0}, "init_epochs > 0"),
        ({"loss.ab.init_epochs": -1}, "init_epochs must be an integer >= 0"),
        ({"loss.fsp": {"weight": 1.0, "init_epochs": 2}}, "each train in a first stage"),
        ({"loss.ce.weight": 0.0}, "has no loss term"),
    ],
)
def test_stage_settings_that_cannot_run_are_refused(edit, message):
    from configs import fashion_mnist

    config = fashion_mnist.get_config("ab")
    for path, value in edit.items():
        recipes.set_path(config, path, value)
    with pytest.raises(ValueError, match=message):
        stages.plan(config, recipes.validate_config(config))


def test_crd_memory_is_term_state_updated_on_the_device_at_the_batch_indices(teacher_run):
    """The banks (N × 128 each, a seed axis) and Z live in the train state, replicated over the
    mesh; a step copies nothing to the host, changes the rows of the batch's examples and no
    other, and sets Z; in-memory batches give the examples' dataset indices."""
    from conftest import tiny_config

    teacher_dir, idx_dir = teacher_run
    config = tiny_config(idx_dir, "crd")
    config.loss.crd.k = 32
    config.teacher.workdir = str(teacher_dir)
    mesh = data_mesh()
    data = open_data(config, mesh)
    t_model, t_vars, _ = train.run_teacher(config.teacher, data, mesh, lambda m: None)
    step = Step.from_config(
        config,
        data.spec,
        data.steps_per_epoch,
        teacher_model=t_model,
        teacher_variables=t_vars,
        term_data=TermData(data.n_train, data.train_labels()),
        mesh=mesh,
    )
    state = step.init_state()
    memory = state.term_state["crd"]["memory"]
    assert memory.memory_s.shape == (1, data.n_train, 128) and float(memory.z_s[0]) == -1.0
    assert memory.memory_s.sharding.is_fully_replicated
    before = np.asarray(memory.memory_s[0])
    batch = next(iter(data.train_batches()))
    seen = np.asarray(batch["index"][0])
    with jax.transfer_guard_device_to_host("disallow"):
        state, metrics = step.train_step(state, batch, t_vars)
    after = state.term_state["crd"]["memory"]
    rows = np.asarray(after.memory_s[0])
    changed = np.flatnonzero(np.any(rows != before, axis=1))
    assert set(changed) == set(seen.tolist())
    assert float(after.z_s[0]) > 0 and float(after.z_t[0]) > 0
    np.testing.assert_allclose(np.linalg.norm(rows[seen], axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(float(metrics["train/crd"][0]))


def _interrupt_after(rows_file, rows):
    def watch():
        while len(read_jsonl(str(rows_file))) < rows:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, daemon=True).start()


@pytest.mark.heavy
def test_every_baseline_trains_from_the_teacher_and_resumes_exactly(teacher_run, tmp_path):
    """FitNet, SP, CC, VID, RKD, PKT, NST, DKD, CRD and FT in one objective (one compilation),
    FT's paraphraser trained first in WORKDIR/init_stage: each term is measured and finite, the
    losses go down, the terms' own modules stay out of the student's weights, FT's paraphraser
    is the first stage's and stays frozen while its translator trains, and a run stopped (SIGINT)
    in its main stage resumes there, without training the first stage again, to the numbers of
    an uninterrupted one (CRD's memory included)."""
    from at_jax.teacher import load_run_variables
    from conftest import assert_same_run, tiny_config

    teacher_dir, idx_dir = teacher_run
    weights = {"fitnet": 1.0, "sp": 10.0, "cc": 0.02, "vid": 0.1, "rkd": 0.1, "pkt": 100.0}
    weights.update({"nst": 1.0, "dkd": 0.1, "crd": 0.8, "ft": 1.0})
    config = tiny_config(idx_dir, "student", num_epochs=2, **{"data.augment.crop_pad": 0})
    for name, weight in weights.items():
        config.loss[name] = ml_collections.ConfigDict(baseline_term(name))
        config.loss[name].weight = weight
    config.loss.dkd.warmup, config.loss.crd.k, config.loss.ft.init_epochs = 2, 64, 1
    config.log_every_steps, config.checkpoint_every_steps = 2, 2
    config.teacher.workdir = str(teacher_dir)

    results = train.train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    assert set(weights) <= set(results["loss_terms"])
    assert results["first_stage"]["term"] == "ft" and results["first_stage"]["epochs"] == 1
    first = read_jsonl(str(tmp_path / "a" / "init_stage" / "metrics.jsonl"))
    assert first[-1]["train/ft"] < first[0]["train/ft"]  # the paraphraser learns to rebuild
    steps = read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    rows = [r for r in steps if "epoch" in r]
    assert all(np.isfinite(r[f"train/{k}"]) for r in steps for k in weights)
    # within the first epoch (in the second, CRD contrasts with banks that now hold embeddings
    # instead of their random start: its loss jumps, as the reference's)
    window = [r for r in steps if "epoch" not in r and r["step"] <= 8]
    assert window[-1]["train/loss"] < window[0]["train/loss"]
    assert rows[-1]["train/ce"] < rows[0]["train/ce"]
    _, variables, _ = load_run_variables(str(tmp_path / "a"), None, SHAPE)
    names = {str(k) for path, _ in jax.tree_util.tree_leaves_with_path(variables) for k in path}
    assert "['group0_block0']" in names
    assert not any(w in n for n in names for w in ("regressor", "embed_", "pair0", "translator"))
    _, init_terms, _ = restore_seeds(str(tmp_path / "a" / "init_stage"), ("ft",))
    _, main_terms, _ = restore_seeds(str(tmp_path / "a"), ("ft",))
    jax.tree.map(
        np.testing.assert_array_equal,
        init_terms["ft"]["paraphraser"],
        main_terms["ft"]["paraphraser"],
    )
    moved = jax.tree.map(
        lambda a, b: np.abs(a - b).max(),
        init_terms["ft"]["translator"],
        main_terms["ft"]["translator"],
    )
    assert max(jax.tree.leaves(moved)) > 0

    run = tmp_path / "b"
    _interrupt_after(run / "metrics.jsonl", 3)
    with pytest.raises(train.Stopped):
        train.train_and_evaluate(config, str(run), progress=False)
    done_first = (run / "init_stage" / "results.json").stat().st_mtime
    train.train_and_evaluate(config, str(run), progress=False)
    assert (run / "init_stage" / "results.json").stat().st_mtime == done_first
    assert_same_run(tmp_path / "a", run, rel=1e-5)
    assert json.load(open(run / "results.json"))["first_stage"] == {
        **results["first_stage"],
        "workdir": str(run / "init_stage"),
    }


@pytest.mark.heavy
@pytest.mark.parametrize("method", ["ab", "fsp"])
def test_ab_and_fsp_train_the_student_in_their_first_stage_then_ce_alone(
    method, teacher_run, tmp_path
):
    """AB (connectors + the student's layers on the pre-activations) and FSP (the student's
    layers on the flow matrices) lower their loss in the first stage with the classifier
    frozen; the main stage starts from that student and trains with CE alone. AB stopped in its
    first stage resumes there (its connectors from the checkpoint) and ends as the
    uninterrupted run, both stages."""
    from conftest import tiny_config

    teacher_dir, idx_dir = teacher_run
    config = tiny_config(idx_dir, method, num_epochs=1)
    config.loss[method].init_epochs, config.log_every_steps = 1, 2
    config.teacher.workdir = str(teacher_dir)
    results = train.train_and_evaluate(config, str(tmp_path / "r"), progress=False)
    assert results["loss_terms"] == ["ce"] and results["first_stage"]["term"] == method
    first = read_jsonl(str(tmp_path / "r" / "init_stage" / "metrics.jsonl"))
    assert first[-1][f"train/{method}"] < first[0][f"train/{method}"]
    assert "train/ce" not in first[0]  # the first stage trains the method's loss alone
    two = stages.plan(config, recipes.validate_config(config))
    teacher, t_vars = _teacher_shapes()
    fresh = Step.from_config(
        two.init_config, _spec(), 8, teacher_model=teacher, teacher_variables=t_vars
    ).init_state()
    trained, _, _ = restore_seeds(str(tmp_path / "r" / "init_stage"))
    np.testing.assert_array_equal(
        trained["params"]["fc"]["kernel"], fresh.params["student"]["fc"]["kernel"]
    )
    moved = np.abs(
        trained["params"]["conv0"]["kernel"] - fresh.params["student"]["conv0"]["kernel"]
    )
    assert moved.max() > 0
    if method == "ab":
        from conftest import assert_same_run

        run = tmp_path / "stopped"
        _interrupt_after(run / "init_stage" / "metrics.jsonl", 2)
        with pytest.raises(train.Stopped):
            train.train_and_evaluate(config, str(run), progress=False)
        assert not (run / "init_stage" / "results.json").exists()
        train.train_and_evaluate(config, str(run), progress=False)
        assert_same_run(tmp_path / "r" / "init_stage", run / "init_stage", rel=1e-5)
        assert_same_run(tmp_path / "r", run, rel=1e-5)
