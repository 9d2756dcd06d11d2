"""Formulas against independent NumPy computations in the reference's channel-first layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.attention import attention_map
from at_jax.losses import at_loss, cross_entropy, factt_loss, kd_loss, pair_activations
from at_jax.objective import FActTAdapters, StepOutputs, make_objective
from conftest import init


def np_attention(x_nchw, p, reduce, normalize):
    """Reference-style attention on NCHW: reduce over channels of |x|^p, flatten, normalise."""
    powered = np.abs(x_nchw.astype(np.float64)) ** p
    m = {"sum": powered.sum(1), "mean": powered.mean(1), "max": powered.max(1)}[reduce]
    q = m.reshape(m.shape[0], -1)
    if normalize == "l2":
        q = q / np.maximum(np.sqrt((q**2).sum(1, keepdims=True)), 1e-12)
    elif normalize == "l1":
        q = q / np.maximum(np.abs(q).sum(1, keepdims=True), 1e-12)
    return q


def nhwc(x_nchw):
    return jnp.asarray(x_nchw.transpose(0, 2, 3, 1))


@pytest.fixture
def acts():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 5, 6, 6)).astype(np.float32), rng.normal(size=(3, 7, 6, 6)).astype(
        np.float32
    )


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("normalize", ["l2", "l1", None])
@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_attention_map_matches_channel_first_numpy(acts, reduce, normalize, p):
    x, _ = acts
    got = attention_map(nhwc(x), p=p, reduce=reduce, normalize=normalize)
    np.testing.assert_allclose(got, np_attention(x, p, reduce, normalize), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max"])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_at_loss_code_and_paper_modes(acts, reduce, p):
    s, t = acts  # different channel counts, same spatial size
    qs, qt = np_attention(s, p, reduce, "l2"), np_attention(t, p, reduce, "l2")
    code = ((qs - qt) ** 2).mean()
    paper = np.sqrt(((qs - qt) ** 2).sum(1)).mean()
    np.testing.assert_allclose(at_loss(nhwc(s), nhwc(t), p, reduce, "code"), code, rtol=1e-5)
    np.testing.assert_allclose(at_loss(nhwc(s), nhwc(t), p, reduce, "paper"), paper, rtol=1e-5)


def test_at_loss_pools_the_larger_map_and_is_zero_for_identical_maps():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    s = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    mt = (t**2).mean(1).reshape(2, 4, 2, 4, 2).mean((2, 4)).reshape(2, -1)
    mt /= np.linalg.norm(mt, axis=1, keepdims=True)
    expected = ((np_attention(s, 2, "mean", "l2") - mt) ** 2).mean()
    np.testing.assert_allclose(at_loss(nhwc(s), nhwc(t)), expected, rtol=1e-5)
    assert float(at_loss(nhwc(t), nhwc(t) * 3.0)) < 1e-12  # scale-invariant after normalisation


def test_bad_attention_options_are_explained(acts):
    x, t = acts
    with pytest.raises(ValueError, match="reduce must be one of"):
        attention_map(nhwc(x), reduce="median")
    with pytest.raises(ValueError, match="normalize must be one of"):
        attention_map(nhwc(x), normalize="l3")
    with pytest.raises(ValueError, match="mode must be one of"):
        at_loss(nhwc(x), nhwc(t), mode="fancy")
    with pytest.raises(ValueError, match="pool must be one of"):
        at_loss(nhwc(x), nhwc(t), pool="bilinear")
    with pytest.raises(ValueError, match="NHWC"):
        attention_map(jnp.ones((2, 3, 4)))


def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.9), (1.0, 0.5), (2.0, 1.0)])
def test_kd_loss_matches_reference_formula(temperature, alpha):
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 6, 10)) * 3
    labels = rng.integers(0, 10, size=6)
    log_p, log_q = np_log_softmax(s / temperature), np_log_softmax(t / temperature)
    kl = (np.exp(log_q) * (log_q - log_p)).sum() * temperature**2 / 6
    ce = -np_log_softmax(s)[np.arange(6), labels].mean()
    expected = alpha * kl + (1 - alpha) * ce
    got = kd_loss(
        jnp.asarray(s, jnp.float32),
        jnp.asarray(t, jnp.float32),
        jnp.asarray(labels),
        temperature,
        alpha,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    np.testing.assert_allclose(
        cross_entropy(jnp.asarray(s, jnp.float32), jnp.asarray(labels)), ce, rtol=1e-5
    )


def test_factt_loss_matches_numpy_and_requires_equal_channels():
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(2, 3, 4, 4, 5)).astype(np.float32)
    fs, ft = s.reshape(3, -1), t.reshape(3, -1)
    fs /= np.linalg.norm(fs, axis=1, keepdims=True)
    ft /= np.linalg.norm(ft, axis=1, keepdims=True)
    np.testing.assert_allclose(
        factt_loss(jnp.asarray(s), jnp.asarray(t)), ((fs - ft) ** 2).mean(), rtol=1e-5
    )
    with pytest.raises(ValueError, match="1x1 conv"):
        factt_loss(jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4, 5)))


def test_pair_activations():
    wrn16 = {f"group{g}": 0 for g in range(3)} | {
        f"group{g}.block{i}": 0 for g in range(3) for i in range(2)
    }
    wrn40 = {f"group{g}": 0 for g in range(3)} | {
        f"group{g}.block{i}": 0 for g in range(3) for i in range(6)
    }
    assert pair_activations(wrn16, wrn40) == [
        ("group0", "group0"),
        ("group1", "group1"),
        ("group2", "group2"),
    ]
    assert len(pair_activations(wrn16, wrn16, "blocks")) == 6
    with pytest.raises(ValueError, match="same depth"):
        pair_activations(wrn16, wrn40, "blocks")
    nin = {"block0": 0, "block1": 0, "block2": 0}
    assert pair_activations(nin, wrn16)[2] == ("block2", "group2")
    assert pair_activations(wrn16, wrn40, ["group2"]) == [("group2", "group2")]
    with pytest.raises(ValueError, match="the student has no 'layer4' and the teacher has no"):
        pair_activations(wrn16, wrn40, ["layer4"])


def make_outputs(rng, with_teacher=True):
    k = jax.random.split(rng, 6)
    s_acts = {
        "group0": jax.random.normal(k[0], (4, 8, 8, 4)),
        "group1": jax.random.normal(k[1], (4, 4, 4, 8)),
    }
    t_acts = {
        "group0": jax.random.normal(k[2], (4, 8, 8, 6)),
        "group1": jax.random.normal(k[3], (4, 4, 4, 8)),
    }
    return StepOutputs(
        images=jnp.zeros((4, 8, 8, 1)),
        labels=jnp.array([0, 1, 2, 1]),
        student_logits=jax.random.normal(k[4], (4, 3)),
        student_acts=s_acts,
        teacher_logits=jax.random.normal(k[5], (4, 3)) if with_teacher else None,
        teacher_acts=t_acts if with_teacher else {},
    )


def test_objective_is_the_weighted_sum_of_named_terms():
    out = make_outputs(jax.random.key(0))
    objective = make_objective(
        {
            "kd": {"weight": 1.0, "temperature": 4.0, "alpha": 0.9},
            "at": {"weight": 1000.0, "p": 2.0},
            "ce": {"weight": 0.0},
        }
    )
    loss, m = objective(out)
    assert set(m) == {"kd", "at", "loss"}
    at = sum(at_loss(out.student_acts[n], out.teacher_acts[n]) for n in ("group0", "group1"))
    np.testing.assert_allclose(m["at"], at, rtol=1e-6)
    np.testing.assert_allclose(
        m["kd"], kd_loss(out.student_logits, out.teacher_logits, out.labels), rtol=1e-6
    )
    np.testing.assert_allclose(loss, m["kd"] + 1000.0 * at, rtol=1e-6)


def test_weight_following_the_lr_schedule_scales_the_term():
    out = make_outputs(jax.random.key(1))
    out.weight_scale = 0.2
    loss, m = make_objective({"at": {"weight": 10.0, "weight_schedule": "lr"}})(out)
    np.testing.assert_allclose(loss, 2.0 * m["at"], rtol=1e-6)


def test_objective_spec_errors_are_explained():
    with pytest.raises(ValueError, match="unknown loss term 'atx'.*known terms"):
        make_objective({"atx": {"weight": 1.0}})
    with pytest.raises(ValueError, match="no option.*'beta'"):
        make_objective({"at": {"weight": 1.0, "beta": 3}})
    with pytest.raises(ValueError, match="non-zero weight"):
        make_objective({"ce": {"weight": 0.0}})
    objective = make_objective({"at": {"weight": 1.0}})
    with pytest.raises(ValueError, match="needs a teacher"):
        objective(make_outputs(jax.random.key(0), with_teacher=False))


def test_factt_adapters_are_trainable_and_map_channels():
    from at_jax.objective import term_modules

    out = make_outputs(jax.random.key(2))
    modules = term_modules(
        {"factt": {"weight": 1.0, "pairs": [("group0", "group0")]}},
        out.student_acts,
        {"group0": jnp.zeros((2, 4, 4, 6))},
    )
    adapters = modules["factt"]
    assert isinstance(adapters, FActTAdapters) and dict(adapters.channels) == {"group0": 6}
    params = adapters.init(jax.random.key(0), out.student_acts)

    def loss_fn(p):
        out.term_modules = {"factt": lambda acts: adapters.apply(p, acts)}
        return make_objective({"factt": {"weight": 1.0}})(out)[0]

    grads = jax.grad(loss_fn)(params)
    assert params["params"]["group0"]["kernel"].shape == (1, 1, 4, 6)
    assert float(jnp.abs(grads["params"]["group0"]["kernel"]).sum()) > 0


def test_at_gradient_reaches_the_student_transfer_path_only():
    from at_jax.models import forward, get_model

    student, teacher = get_model("wrn-tiny"), get_model("wrn-16-1")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    sv = init(student, 1, x)
    tv = init(teacher, 2, x)
    t_logits, t_acts, _ = forward(teacher, tv, x)
    objective = make_objective({"at": {"weight": 1000.0}})

    def loss_fn(s_params):
        s_logits, s_acts, _ = forward(student, {**sv, "params": s_params}, x, train=True)
        return objective(StepOutputs(x, jnp.array([1, 2]), s_logits, s_acts, t_logits, t_acts))[0]

    grads = jax.jit(jax.grad(loss_fn))(sv["params"])
    assert float(jnp.abs(grads["group2_block0"]["conv1"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["conv0"]["kernel"]).sum()) > 0
    # the head (final BN and fc) lies after the last transfer point: AT alone cannot reach it
    assert float(jnp.abs(grads["fc"]["kernel"]).sum()) == 0
    assert float(jnp.abs(grads["bn"]["scale"]).sum()) == 0


def test_attention_distance_is_zero_for_the_teacher_itself_and_grows_with_difference():
    from at_jax.analysis import attention_distance
    from at_jax.models import get_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 16, 16, 1), dtype=np.uint8)
    model = get_model("wrn-tiny", num_classes=10)
    v1 = init(model, 0, jnp.zeros((1, 16, 16, 1)))
    v2 = init(model, 1, jnp.zeros((1, 16, 16, 1)))
    same = attention_distance((model, v1), (model, v1), images, 0.5, 0.25, batch_size=2)
    assert set(same) == {"group0<-group0", "group1<-group1", "group2<-group2", "mean"}
    assert max(same.values()) < 1e-5
    other = attention_distance((model, v2), (model, v1), images, 0.5, 0.25, batch_size=2)
    assert 0 < other["mean"] <= np.sqrt(2) + 1e-6
    # the per-image mean equals the distance computed directly on all images at once
    from at_jax.models import forward
    from at_jax.preprocess import normalize

    x = normalize(images, 0.5, 0.25)
    a1, a2 = forward(model, v1, x)[1], forward(model, v2, x)[1]
    direct = np.linalg.norm(attention_map(a2["group1"]) - attention_map(a1["group1"]), axis=-1)
    np.testing.assert_allclose(other["group1<-group1"], direct.mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="at least one image"):
        attention_distance((model, v2), (model, v1), images[:0], 0.5, 0.25)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_legacy_kd_is_two_over_c_times_the_kl_term_plus_the_ce_term(num_classes):
    rng = np.random.default_rng(5)
    s, t = rng.normal(size=(2, 8, num_classes)) * 2
    labels = rng.integers(0, num_classes, size=8)
    T, alpha = 4.0, 0.9
    log_p, log_q = np_log_softmax(s / T), np_log_softmax(t / T)
    # torch's old kl_div default: the mean over all B×C elements of q·(log q − log p)
    elementwise_mean = (np.exp(log_q) * (log_q - log_p)).mean()
    ce = -np_log_softmax(s)[np.arange(8), labels].mean()
    expected = elementwise_mean * (T * T * 2 * alpha) + ce * (1 - alpha)
    args = (jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(labels), T, alpha)
    np.testing.assert_allclose(kd_loss(*args, legacy=True), expected, rtol=1e-5)
    kl_term = kd_loss(*args) - (1 - alpha) * ce
    np.testing.assert_allclose(
        kd_loss(*args, legacy=True) - (1 - alpha) * ce, 2 / num_classes * kl_term, rtol=1e-4
    )
    spec = {"kd": {"weight": 1.0, "legacy": True}, "ce": {"weight": 0.0}}
    out = StepOutputs(
        images=jnp.zeros((8, 2, 2, 1)),
        labels=jnp.asarray(labels),
        student_logits=args[0],
        student_acts={},
        teacher_logits=args[1],
    )
    np.testing.assert_allclose(make_objective(spec)(out)[0], expected, rtol=1e-5)


def test_a_term_with_start_epoch_counts_from_that_epoch_on():
    out = make_outputs(jax.random.key(3))
    objective = make_objective({"ce": {"weight": 1.0}, "at": {"weight": 100.0, "start_epoch": 3}})
    values = {}
    for epoch in (1, 2, 3, 7):
        out.epoch = jnp.asarray(epoch)
        out.extras = {}
        values[epoch] = objective(out)
    for epoch in (1, 2):
        np.testing.assert_allclose(values[epoch][0], values[epoch][1]["ce"], rtol=1e-6)
        assert float(values[epoch][1]["at"]) > 0  # still measured
    for epoch in (3, 7):
        np.testing.assert_allclose(
            values[epoch][0], values[epoch][1]["ce"] + 100.0 * values[epoch][1]["at"], rtol=1e-6
        )
    with pytest.raises(ValueError, match="start_epoch must be an integer"):
        make_objective({"ce": {"weight": 1.0, "start_epoch": -1}})
