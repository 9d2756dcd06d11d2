"""at_jax in anyone's code: capture() on Linen and NNX models written without at_jax in mind, the
array-level losses (at_losses, channel_axis, kd_kl, the gradient losses), load_teacher, and the
analysis and figure functions on any model."""

import os
import re
import runpy
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from at_jax import gradient, objective
from at_jax.analysis import attention_distance
from at_jax.attention import attention_map
from at_jax.capture import capture, model_fn
from at_jax.figures import attention_figure
from at_jax.losses import at_loss, at_losses, cross_entropy, factt_loss, kd_kl, kd_loss
from at_jax.models import forward, get_model
from conftest import init


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(self.width, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.relu(x)


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = Block(4, name="block1")(x, train)
        return Block(6, name="block2")(nn.max_pool(x, (2, 2), (2, 2)), train)


class LinenNet(nn.Module):
    """A user's model: submodules by name, one of them nested, one called twice, nothing sown."""

    @nn.compact
    def __call__(self, x, train=False):
        x = Block(4, name="stage1")(x, train)
        x = Encoder(name="encoder")(x, train)
        shared = nn.Dense(6, name="shared")
        x = shared(shared(x))  # called twice: capture reports the first call
        return nn.Dense(3, name="head")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def linen():
    model = LinenNet()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    return model, init(model, 0, x), x


def test_capture_linen_gives_submodule_outputs_and_apply_output(linen):
    model, variables, x = linen
    out, acts = capture(model, x, names=["stage1", "encoder/block2", "shared"], variables=variables)
    np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-6)
    # by hand: the same submodules applied to their inputs
    p, s = variables["params"], variables["batch_stats"]
    block = Block(4)
    stage1 = block.apply({"params": p["stage1"], "batch_stats": s["stage1"]}, x)
    np.testing.assert_allclose(acts["stage1"], stage1, rtol=1e-6)
    enc = Encoder().apply({"params": p["encoder"], "batch_stats": s["encoder"]}, stage1)
    np.testing.assert_allclose(acts["encoder/block2"], enc, rtol=1e-6)
    first = nn.Dense(6).apply({"params": p["shared"]}, enc)
    np.testing.assert_allclose(acts["shared"], first, rtol=1e-6)  # the first of two calls
    with pytest.raises(
        ValueError,
        match=r"no submodule or sown value \['encoder/block9'\]; "
        r"closest: \['encoder/block2', 'encoder/block1'.*'stage1'.*"
        r"at_jax.capture.paths\(model, x, variables=variables\)",
    ):
        capture(model, x, names=["encoder/block9"], variables=variables)


def test_capture_linen_under_jit_grad_and_vmap_and_with_mutable_state(linen):
    model, variables, x = linen

    def loss(params):
        (logits, new_state), acts = capture(
            model,
            x,
            names=["stage1"],
            variables={**variables, "params": params},
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(acts["stage1"] ** 2) + logits.sum(), new_state

    grads, new_state = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    assert float(jnp.abs(grads["stage1"]["conv"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0
    # the updated BN statistics come back as with apply(..., mutable=["batch_stats"])
    _, expected = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(
        new_state["batch_stats"]["stage1"]["bn"]["mean"],
        expected["batch_stats"]["stage1"]["bn"]["mean"],
        rtol=1e-6,
    )
    per_example = jax.vmap(
        lambda z: capture(model, z[None], names=["stage1"], variables=variables)[1]["stage1"][0]
    )(x)
    np.testing.assert_allclose(
        per_example,
        capture(model, x, names=["stage1"], variables=variables)[1]["stage1"],
        rtol=1e-5,
    )


def test_capture_of_at_jax_models_equals_their_sown_activations():
    model = get_model("wrn-tiny")
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = init(model, 0, x)
    logits, sown, _ = forward(model, variables, x)
    out, acts = capture(
        model, x, names=["group1", "group2.block0", "group0_block0"], variables=variables
    )
    np.testing.assert_allclose(out, logits, rtol=1e-6)
    np.testing.assert_allclose(acts["group1"], sown["group1"], rtol=1e-6)
    np.testing.assert_allclose(acts["group2.block0"], sown["group2.block0"], rtol=1e-6)
    np.testing.assert_allclose(acts["group0_block0"], sown["group0.block0"], rtol=1e-6)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List(
            [nnx.Conv(1, 4, (3, 3), rngs=rngs), nnx.Conv(4, 4, (3, 3), rngs=rngs)]
        )
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        for conv in self.blocks:
            x = nnx.relu(conv(x))
        x = self.bn(x)
        self.sow(nnx.Intermediate, "features", x)
        return self.head(x.mean((1, 2)))


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_capture_nnx_by_attribute_path_inside_nnx_jit_and_grad_leaves_the_model_alone():
    model = NNXNet(nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    out, acts = capture(model, x, names=["blocks/1", "features", "blocks/0"])
    np.testing.assert_allclose(out, model(x), rtol=1e-6)
    first = nnx.relu(model.blocks[0](x))
    np.testing.assert_allclose(acts["blocks/0"], model.blocks[0](x), rtol=1e-6)
    np.testing.assert_allclose(acts["blocks/1"], model.blocks[1](first), rtol=1e-6)
    np.testing.assert_allclose(acts["features"], model.bn(nnx.relu(acts["blocks/1"])), rtol=1e-5)
    before = nnx.state(model)
    teacher = NNXNet(nnx.Rngs(1))
    teacher.eval()

    @nnx.jit
    def loss_and_grad(model, x):
        def loss(m):
            _, s = capture(m, x, names=["blocks/1"])
            _, t = capture(teacher, x, names=["blocks/1"])  # closed over: runs on a copy
            return at_losses(s, t, ["blocks/1"])[0]

        return nnx.value_and_grad(loss)(model)

    value, grads = loss_and_grad(model, x)
    assert float(value) > 0
    assert float(jnp.abs(grads["blocks"][1]["kernel"][...]).sum()) > 0
    # nothing left on the models: the same state and no captured values
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    assert not any(hasattr(m, "__captures__") for _, m in nnx.iter_modules(model))
    assert not any(hasattr(m, "__captures__") for _, m in nnx.iter_modules(teacher))
    with pytest.raises(ValueError, match=r"NNX model has no .*\['head/0'\].*'blocks/0'"):
        capture(model, x, names=["head/0"])


def test_at_losses_is_the_sum_of_at_loss_and_takes_every_pair_form():
    k = jax.random.split(jax.random.key(0), 4)
    s = {"a": jax.random.normal(k[0], (3, 8, 8, 4)), "b": jax.random.normal(k[1], (3, 4, 4, 8))}
    t = {"x": jax.random.normal(k[2], (3, 16, 16, 5)), "b": jax.random.normal(k[3], (3, 4, 4, 2))}
    total, per_pair = at_losses(s, t, [("a", "x"), "b"], mode="paper")
    assert set(per_pair) == {"a:x", "b:b"}
    np.testing.assert_allclose(per_pair["a:x"], at_loss(s["a"], t["x"], mode="paper"), rtol=1e-6)
    np.testing.assert_allclose(total, per_pair["a:x"] + per_pair["b:b"], rtol=1e-6)
    for pairs in ("a:x,b", ["a:x", "b:b"]):
        np.testing.assert_allclose(at_losses(s, t, pairs, mode="paper")[0], total, rtol=1e-6)
    # the teacher's side gets no gradient, whatever is differentiated
    g = jax.grad(lambda tt: at_losses(s, tt, [("a", "x")])[0])(t)
    assert float(jnp.abs(g["x"]).sum()) == 0.0


def test_channel_axis_nchw_equals_nhwc_and_a_wrong_layout_fails_loudly():
    k = jax.random.split(jax.random.key(2), 2)
    s = jax.random.normal(k[0], (2, 16, 8, 8))  # NCHW
    t = jax.random.normal(k[1], (2, 32, 16, 16))
    t_same_size = jax.random.normal(k[1], (2, 32, 8, 8))
    nhwc = lambda a: jnp.moveaxis(a, 1, -1)  # noqa: E731
    np.testing.assert_allclose(attention_map(s, channel_axis=1), attention_map(nhwc(s)), rtol=1e-6)
    np.testing.assert_allclose(at_loss(s, t, channel_axis=1), at_loss(nhwc(s), nhwc(t)), rtol=1e-6)
    same = jax.random.normal(k[1], (2, 16, 4, 4))
    np.testing.assert_allclose(
        factt_loss(s, jnp.tile(same, (1, 1, 2, 2)), channel_axis=1),
        factt_loss(nhwc(s), nhwc(jnp.tile(same, (1, 1, 2, 2)))),
        rtol=1e-6,
    )
    # NCHW read as NHWC: "maps" of 16x8 and 32x8 are not one integer scaling of each other
    with pytest.raises(
        ValueError,
        match=r"\(2, 16, 8, 8\) and \(2, 32, 8, 8\) with "
        r"channel_axis=-1.*NCHW arrays need channel_axis=1",
    ):
        at_loss(s, t_same_size)
    with pytest.raises(ValueError, match="not the same integer multiple.*pool='activation'"):
        at_loss(jnp.ones((2, 7, 7, 3)), jnp.ones((2, 4, 4, 3)))


def test_kd_kl_formula_and_kd_loss_is_its_weighted_sum_with_ce():
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 6, 5)) * 2)
    labels = jnp.asarray(rng.integers(0, 5, 6))
    T = 3.0
    p_t = np.exp(np.asarray(t) / T) / np.exp(np.asarray(t) / T).sum(-1, keepdims=True)
    p_s = np.exp(np.asarray(s) / T) / np.exp(np.asarray(s) / T).sum(-1, keepdims=True)
    expected = T * T * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), -1))
    np.testing.assert_allclose(kd_kl(s, t, T), expected, rtol=1e-5)
    np.testing.assert_allclose(
        kd_loss(s, t, labels, T, alpha=0.7),
        0.7 * kd_kl(s, t, T) + 0.3 * cross_entropy(s, labels),
        rtol=1e-6,
    )
    assert float(jnp.abs(jax.grad(lambda tt: kd_kl(s, tt, T))(t)).sum()) == 0.0


def test_grad_at_loss_is_a_hand_written_double_backprop_and_the_registered_term():
    student, teacher = (
        get_model("nin-tiny", batch_norm=False, dropout_rate=0.0),
        get_model("nin-tiny", batch_norm=False, dropout_rate=0.0),
    )
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    y = jnp.array([0, 1, 2])
    sv, tv = init(student, 1, x), init(teacher, 2, x)

    def s_fn(params):
        return lambda z: student.apply({"params": params}, z)

    def t_fn(z):
        return teacher.apply(tv, z)

    def by_hand(params):  # J_i = d CE_i / d x_i, then ½ mean ||J_S − J_T||²
        def ce_sum(fn, z):
            logp = jax.nn.log_softmax(fn(z))
            return -jnp.sum(logp[jnp.arange(3), y])

        diff = jax.grad(ce_sum, 1)(s_fn(params), x) - jax.grad(ce_sum, 1)(t_fn, x)
        return 0.5 * jnp.mean(jnp.sum(diff.reshape(3, -1) ** 2, -1))

    def ours(params):
        return gradient.grad_at_loss(s_fn(params), t_fn, x, y)

    @jax.jit  # one program (op by op, a double backprop compiles hundreds of primitives)
    def values_and_grads(params):
        return ours(params), by_hand(params), jax.grad(ours)(params), jax.grad(by_hand)(params)

    value_ours, value_hand, g_ours, g_hand = values_and_grads(sv["params"])
    np.testing.assert_allclose(value_ours, value_hand, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_ours, g_hand
    )

    @jax.jit  # the registered terms (what the CLI trains) on what the step provides
    def terms(params):
        logits, acts, _ = forward(student, {"params": params}, x)
        t_logits, t_acts, _ = forward(teacher, tv, x)
        out = objective.StepOutputs(
            x, y, logits, acts, t_logits, t_acts, student_fn=s_fn(params), teacher_fn=t_fn
        )
        return (
            objective.grad_at_term(out),
            objective.min_l2_term(out),
            gradient.min_l2_loss(s_fn(params), x, y),
        )

    grad_at_term, min_l2_term, min_l2 = terms(sv["params"])
    np.testing.assert_allclose(grad_at_term, value_ours, rtol=1e-6)
    np.testing.assert_allclose(min_l2_term, min_l2, rtol=1e-6)


def test_load_teacher_logits_equal_restore_and_forward(teacher_run):
    from at_jax import runs
    from at_jax.data import load_dataset

    workdir, data_dir = teacher_run
    teacher = runs.load_teacher(str(workdir))
    data = load_dataset("fashion_mnist", "local", str(data_dir))
    assert (teacher.num_classes, teacher.image_shape) == (10, data.image_shape)
    assert (teacher.mean, teacher.std) == (data.mean, data.std)
    images = data.test_images[:16]
    logits, acts = teacher(images)
    model, variables, _ = runs.load_run_variables(str(workdir), 10, data.image_shape)
    x = (images / 255.0 - data.mean[0]) / data.std[0]
    expected, expected_acts, _ = forward(model, variables, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(acts["group2"], expected_acts["group2"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(teacher(teacher.preprocess(images))[0], logits, rtol=1e-6)
    with pytest.raises(ValueError, match=r"takes images of shape \(B, H, W, 1\)"):
        teacher.preprocess(np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        runs.load_teacher(str(data_dir / "nowhere"))


def test_distance_and_figure_for_any_model(teacher_run, tmp_path):
    from at_jax import runs
    from at_jax.data import load_dataset

    workdir, data_dir = teacher_run
    teacher = runs.load_teacher(str(workdir))
    images = load_dataset("fashion_mnist", "local", str(data_dir)).test_images[:8]
    mine = LinenNet()
    variables = init(mine, 0, jnp.zeros((1, 16, 16, 1)))
    student = model_fn(mine, ["stage1", "encoder/block2"], variables)
    pairs = [("stage1", "group0"), ("encoder/block2", "group1")]
    result = attention_distance(
        student, teacher, images, pairs=pairs, preprocess=teacher.preprocess, batch_size=5
    )
    assert set(result) == {"stage1<-group0", "encoder/block2<-group1", "mean"}
    assert 0 < result["mean"] <= np.sqrt(2)
    itself = attention_distance(teacher, teacher, images, pairs="groups")
    assert itself["mean"] < 1e-5
    with pytest.raises(ValueError, match="the teacher has no 'layer9'"):
        attention_distance(
            student, teacher, images, pairs=[("stage1", "layer9")], preprocess=teacher.preprocess
        )
    path = attention_figure(
        str(tmp_path / "maps.png"),
        images[:2],
        {"teacher": teacher, "mine": student},
        points={"teacher": ["group0", "group1"], "mine": ["stage1", "encoder/block2"]},
        preprocess=teacher.preprocess,
    )
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"model 'mine' has no activation \['group0'\]"):
        attention_figure(
            str(tmp_path / "x.png"),
            images[:2],
            {"mine": student},
            points=["group0"],
            preprocess=teacher.preprocess,
        )


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize(
    "name", ["linen_custom_model", "nnx_custom_model", "gradient_attention", "teacher_from_run"]
)
def test_examples_run(name, teacher_run, monkeypatch, capsys):
    """Each example, as `python examples/NAME.py` runs it (a few steps, on the real
    Fashion-MNIST files; the teacher example on the shared tiny run)."""
    argv = [f"{name}.py", "--steps", "3"]
    if name == "teacher_from_run":
        argv += ["--run", str(teacher_run[0])]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.syspath_prepend(EXAMPLES)
    runpy.run_path(os.path.join(EXAMPLES, f"{name}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "Fashion-MNIST not found" not in out
    errors = [float(e) for e in re.findall(r"student test error ([\d.]+)%", out)]
    assert len(errors) == 1 and 0 <= errors[0] <= 100, out
    if name == "teacher_from_run":
        before, after = (float(v) for v in re.findall(r"attention distance.*: ([\d.]+)", out))
        assert after < before, out  # even three steps of AT move the maps towards the teacher
    lines = sum(1 for _ in open(os.path.join(EXAMPLES, f"{name}.py")))
    assert lines <= 85, f"{name}.py has {lines} lines: examples stay short"
