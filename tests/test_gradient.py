import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import gradient, objective
from at_jax.data import DataSpec
from at_jax.models import NIN, forward
from at_jax.recipes import validate_config
from conftest import init, tiny_config


def tiny_nin(**kw):
    return NIN(
        widths=(3, 3, 2, 4, 4, 4, 4, 4),
        num_classes=3,
        batch_norm=False,
        relu_before_pool=False,
        dropout_rate=0.0,
        dtype=jnp.float64,
        **kw,
    )


def outputs_for(student, params, teacher, t_vars, x, y):
    """What the step hands the terms, for models without batch norm."""

    def student_fn(z):
        return forward(student, {"params": params["student"]}, z, train=True)[0]

    def teacher_fn(z):
        return forward(teacher, t_vars, z)[0]

    logits, acts, _ = forward(student, {"params": params["student"]}, x, train=True)
    t_logits, t_acts, _ = forward(teacher, t_vars, x)
    return objective.StepOutputs(
        x, y, logits, acts, t_logits, t_acts, student_fn=student_fn, teacher_fn=teacher_fn
    )


def test_input_gradient_and_second_order_gradient_match_finite_differences():
    with jax.enable_x64(True):
        student, teacher = tiny_nin(), tiny_nin()
        x = jax.random.normal(jax.random.key(0), (3, 8, 8, 2), jnp.float64)
        y = jnp.array([0, 2, 1])

        def f64(tree):
            # float64, and jittered so that no ReLU input sits exactly on its kink (zero biases
            # after an all-zero ReLU output would), where finite differences and autodiff differ
            # (numpy's generator: no program to compile per shape)
            rng = np.random.default_rng(9)
            return jax.tree.map(
                lambda a: jnp.asarray(np.asarray(a, np.float64) + 0.05 * rng.normal(size=a.shape)),
                tree,
            )

        params = {"student": f64(init(student, 1, x)["params"])}
        t_vars = f64(init(teacher, 2, x))
        loss_of = objective.make_objective(
            {
                "ce": {"weight": 1.0},
                "grad_at": {"weight": 3.0},
                "min_l2": {"weight": 2.0},
                "symmetry": {"weight": 1.5},
                "at": {"weight": 10.0},
                "kd": {"weight": 0.5},
            }
        )

        # J equals a direct jax.grad of the summed CE w.r.t. the input
        out = outputs_for(student, params, teacher, t_vars, x, y)
        direct = jax.jit(
            jax.grad(
                lambda z: (
                    -jnp.sum(
                        jax.nn.log_softmax(student.apply({"params": params["student"]}, z))[
                            jnp.arange(3), y
                        ]
                    )
                )
            )
        )(x)
        input_gradient = jax.jit(lambda z: gradient.input_gradient(out.student_fn, z, y))
        np.testing.assert_allclose(input_gradient(x), direct, rtol=1e-10)

        @jax.jit  # one program each, not thousands of op-by-op dispatches
        def loss(p):
            return loss_of(outputs_for(student, p, teacher, t_vars, x, y))[0]

        grads = jax.jit(jax.grad(loss))(params)
        direction = jax.tree.map(
            lambda a: jax.random.normal(jax.random.key(7), a.shape, a.dtype), params
        )
        eps = 1e-6
        shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)  # noqa: E731
        numeric = (loss(shift(eps)) - loss(shift(-eps))) / (2 * eps)
        analytic = sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        assert analytic.dtype == jnp.float64
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6)
        # the second-order part is real: without differentiating through J the gradient differs
        detached = jax.jit(
            jax.grad(lambda p: loss_of(outputs_for(student, p, teacher, t_vars, x, y))[1]["ce"])
        )(params)
        assert not np.allclose(jax.tree.leaves(detached)[0], jax.tree.leaves(grads)[0])


SMALL = (4, 4, 4, 4, 4, 4, 4, 4)


def kaiming_scaled(params):
    """NIN's N(0, 0.05²) init suits its 192-wide layers; at width 4 the signal vanishes. Rescale
    each kernel to kaiming's std so that these tiny test networks have non-trivial gradients."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    for path, value in flat.items():
        if path[-1] == "kernel":
            flat[path] = value * (np.sqrt(2.0 / np.prod(value.shape[:-1])) / 0.05)
    return traverse_util.unflatten_dict(flat)


class FlipInvariant(nn.Module):
    """Averages a NIN over an image and its mirror: exactly flip-invariant."""

    @nn.compact
    def __call__(self, x, train=False):
        net = NIN(widths=SMALL, num_classes=3, batch_norm=False, dropout_rate=0.0)
        return 0.5 * (net(x) + net(x[:, :, ::-1, :]))


def test_symmetry_penalty_is_zero_exactly_for_a_flip_invariant_model():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    y = jnp.array([0, 1, 2, 0])
    values = {}
    for model, invariant in (
        (FlipInvariant(), True),
        (NIN(widths=SMALL, num_classes=3, batch_norm=False, dropout_rate=0.0), False),
    ):
        params = {"student": kaiming_scaled(init(model, 1, x)["params"])}

        @jax.jit  # one program per model, not op by op
        def terms(params, model=model):
            out = outputs_for(model, params, model, {"params": params["student"]}, x, y)
            return (
                objective.symmetry_term(out),
                objective.grad_at_term(out),
                objective.min_l2_term(out),
                objective.min_l2_term(out, squared=False),
                gradient.input_gradient(out.student_fn, x, y),
            )

        symmetry, grad_at, min_l2, min_l2_unsquared, j = terms(params)
        values[invariant] = float(symmetry)
        # grad_at against itself is zero, min_l2 (½ mean ||J||², by default) is not
        assert float(grad_at) == 0.0
        j = np.asarray(j).reshape(4, -1)
        np.testing.assert_allclose(min_l2, 0.5 * np.mean(np.sum(j * j, -1)), rtol=1e-5)
        np.testing.assert_allclose(
            min_l2_unsquared, 0.5 * np.mean(np.linalg.norm(j, axis=-1)), rtol=1e-5
        )
    assert values[False] > 1e-6 and values[True] < 1e-6 * values[False]


def test_bn_modes_differ_with_batch_norm_and_are_validated(idx_dir):
    from at_jax import step as step_lib

    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1)) * 3 + 1
    y = jnp.array([0, 1, 2, 0])
    grads = {}
    for mode in step_lib.BN_MODES:
        config = tiny_config(
            idx_dir,
            model="nin-tiny",
            **{"gradient.bn_mode": mode, "model_overrides.dropout_rate": 0.0},
        )
        st = step_lib.Step.from_config(config, DataSpec(10, (16, 16, 1), (0.5,), (0.25,)), 8)
        state = jax.jit(st.init_single)(st.seed_keys()[0])
        stats = jax.tree.map(lambda a: a + 0.5, state.batch_stats)

        @jax.jit
        def input_grad(params, stats, st=st):
            out, _ = st.networks.outputs(params, stats, {}, (x, y), jax.random.key(1))
            return gradient.input_gradient(out.student_fn, x, y)

        grads[mode] = input_grad(state.params, stats)
    assert not np.allclose(grads["batch_stats"], grads["frozen"])
    with pytest.raises(ValueError, match="bn_mode must be one of"):
        validate_config(tiny_config(idx_dir, **{"gradient.bn_mode": "both"}))


@pytest.mark.heavy
def test_gradient_terms_compose_with_at_and_kd_and_train(idx_dir, teacher_dir, tmp_path, optimized):
    """The CLI's objective with every kind of term: CE, KD, AT and the input-gradient terms
    (through batch norm, bn_mode "batch_stats"), trained end to end from the shared teacher."""
    from at_jax import train
    from at_jax.files import read_jsonl

    config = tiny_config(
        idx_dir,
        "student",
        num_epochs=2,
        **{
            "loss.grad_at.weight": 1.0,
            "loss.symmetry.weight": 0.5,
            "loss.at.weight": 10.0,
            "loss.kd.weight": 0.5,
            "data.augment.crop_pad": 0,
        },
    )
    config.teacher.workdir = str(teacher_dir)
    results = train.train_and_evaluate(config, str(tmp_path / "s"), progress=False)
    assert results["loss_terms"] == ["at", "ce", "grad_at", "kd", "symmetry"]
    rows = read_jsonl(str(tmp_path / "s" / "metrics.jsonl"))
    assert all(r["train/grad_at"] > 0 and r["train/symmetry"] > 0 for r in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_table3_configs():
    from configs import table3

    for method in table3.METHODS:
        for ds in table3.DATASETS:
            config = table3.get_config(f"{method},{ds}")
            assert config.data.name == ds and config.optimizer.weight_decay == 0
            assert config.data.augment.crop_pad == 0 and config.data.augment.flip
            objective.validate_terms(dict(config.loss))
    assert table3.get_config("baseline").model_overrides.batch_norm is False
    assert table3.get_config("teacher").model == "nin-wide"
    # two teachers, as the paper: ReLU before pooling for grad-AT and KD, none for AT
    assert table3.get_config("teacher").model_overrides.relu_before_pool is True
    assert table3.get_config("teacher_at").model_overrides.relu_before_pool is False
    assert table3.get_config("teacher_at").model_overrides.batch_norm is True
    for method, teacher in (("grad_at", "teacher"), ("kd", "teacher"), ("at", "teacher_at")):
        assert (
            table3.get_config(f"{method},fashion_mnist").teacher.workdir
            == f"runs/table3/fashion_mnist/{teacher}"
        )
    assert (
        table3.get_config("kd").loss.kd.legacy and table3.get_config("grad_at").loss.grad_at.squared
    )
    with pytest.raises(ValueError, match="unknown Table 3 method"):
        table3.get_config("jacobian")
