import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.models import forward, from_torchvision, get_model
from conftest import init

# forward as one compiled program per model (op by op, every primitive compiles on its own)
jforward = jax.jit(forward, static_argnums=0, static_argnames="train")


def n_params(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


def init_shapes(name, num_classes=10, size=32, channels=3, **kw):
    model = get_model(name, num_classes=num_classes, **kw)
    return model, jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((2, size, size, channels))
    )


@pytest.mark.parametrize(
    "name,count",
    [("wrn-16-1", 175_066), ("wrn-16-2", 691_674), ("wrn-40-1", 563_930), ("wrn-40-2", 2_243_546)],
)
def test_wrn_parameter_counts_equal_reference(name, count):
    _, variables = init_shapes(name)
    assert n_params(variables["params"]) == count


@pytest.mark.parametrize("name,count", [("resnet-18", 11_689_512), ("resnet-34", 21_797_672)])
def test_resnet_parameter_counts_equal_torchvision(name, count):
    _, variables = init_shapes(name, num_classes=1000, size=64)
    assert n_params(variables["params"]) == count


@pytest.mark.parametrize(
    "name,bn,count",
    [
        ("nin-wide", False, 966_986),
        ("nin-wide", True, 969_822),
        ("nin-thin", False, 246_186),
        ("nin-thin", True, 247_614),
    ],
)
def test_nin_parameter_counts_equal_the_authors_network(name, bn, count):
    _, variables = init_shapes(name, batch_norm=bn)
    trainable = variables["params"]
    assert n_params(trainable) == count
    assert ("batch_stats" in variables) == bn
    assert "bias" in trainable["block0_conv0"] and trainable["block0_conv0"]["kernel"].shape[
        :2
    ] == (5, 5)


@pytest.mark.parametrize("size,channels,maps", [(32, 3, (32, 16, 8)), (28, 1, (28, 14, 7))])
def test_nin_output_and_transfer_point_shapes(size, channels, maps):
    model = get_model("nin-thin", batch_norm=False, relu_before_pool=False)
    x = jax.random.normal(jax.random.key(0), (2, size, size, channels))
    variables = init(model, 0, x)
    logits, acts, _ = jforward(model, variables, x)
    assert logits.shape == (2, 10)
    assert {k: v.shape for k, v in acts.items()} == {
        "block0": (2, maps[0], maps[0], 48),
        "block1": (2, maps[1], maps[1], 96),
        "block2": (2, maps[2], maps[2], 10),
    }
    # without ReLU before pooling the blocks' outputs keep their negative values
    assert float(acts["block0"].min()) < 0 and float(acts["block2"].min()) < 0
    relu = get_model("nin-thin", batch_norm=False)
    _, relu_acts, _ = jforward(relu, variables, x)
    assert float(relu_acts["block0"].min()) >= 0
    # dropout only in train mode, from the "dropout" rng
    a = jforward(model, variables, x, train=True, rngs={"dropout": jax.random.key(1)})[0]
    b = jforward(model, variables, x, train=True, rngs={"dropout": jax.random.key(2)})[0]
    assert not np.allclose(a, b)
    no_dropout = get_model("nin-thin", batch_norm=False, relu_before_pool=False, dropout_rate=0.0)
    np.testing.assert_allclose(
        jforward(no_dropout, variables, x, train=True)[0], logits, rtol=1e-5, atol=1e-6
    )


def test_bn_scale_init_uniform_as_the_reference_cifar_code():
    model = get_model("wrn-16-1", bn_scale_init="uniform")
    scales = np.concatenate(
        [
            np.ravel(v)
            for k, v in _flat(init(model, 0, jnp.ones((1, 32, 32, 3)))["params"]).items()
            if k.endswith("scale")
        ]
    )
    assert scales.min() >= 0 and scales.max() < 1 and 0.4 < scales.mean() < 0.6
    assert len(np.unique(scales)) > 100
    default = get_model("wrn-16-1")
    ones = [
        v
        for k, v in _flat(init(default, 0, jnp.ones((1, 32, 32, 3)))["params"]).items()
        if k.endswith("scale")
    ]
    assert all(np.all(np.asarray(v) == 1) for v in ones)
    with pytest.raises(ValueError, match="bn_scale_init must be one of"):
        init(get_model("wrn-tiny", bn_scale_init="zeros"), 0, jnp.ones((1, 8, 8, 3)))


def _flat(tree):
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("size,channels", [(32, 3), (28, 1)])
def test_wrn_sows_groups_and_blocks(size, channels):
    model = get_model("wrn-16-1")
    x = jax.random.normal(jax.random.key(1), (2, size, size, channels))
    variables = init(model, 0, x)
    leaves, tree = jax.tree.flatten(variables)  # BN parameters and statistics off their start
    keys = jax.random.split(jax.random.key(2), len(leaves))
    variables = jax.tree.unflatten(
        tree,
        [
            v + 0.3 * jnp.abs(jax.random.normal(k, v.shape))
            for k, v in zip(keys, leaves, strict=True)
        ],
    )
    logits, acts, _ = jforward(model, variables, x)
    assert logits.shape == (2, 10)
    s = [size, (size + 1) // 2, (size + 3) // 4]
    for g, (hw, c) in enumerate(zip(s, (16, 32, 64), strict=True)):
        assert acts[f"group{g}"].shape == (2, hw, hw, c)
        for i in range(2):
            assert acts[f"group{g}.block{i}"].shape == (2, hw, hw, c)
        np.testing.assert_array_equal(acts[f"group{g}"], acts[f"group{g}.block1"])
    assert acts["stem"].shape == (2, size, size, 16)
    # the pre-activations (AB's points): the group's output through the batch norm that comes
    # next (eval mode: the running statistics), before the ReLU
    bns = [("group1_block0", "bn0"), ("group2_block0", "bn0"), (None, "bn")]
    for g, (block, bn) in enumerate(bns):
        p = variables["params"][block][bn] if block else variables["params"][bn]
        st = variables["batch_stats"][block][bn] if block else variables["batch_stats"][bn]
        want = (acts[f"group{g}"] - st["mean"]) / np.sqrt(st["var"] + 1e-5) * p["scale"] + p["bias"]
        np.testing.assert_allclose(acts[f"group{g}.preact"], want, rtol=1e-5, atol=1e-5)


def test_nin_and_resnet_sow_their_transfer_points():
    def shapes(model, x):  # init and forward traced for their shapes, nothing compiled
        return jax.eval_shape(lambda: forward(model, model.init(jax.random.key(0), x), x))

    nin = get_model("nin-tiny")
    _, acts, _ = shapes(nin, jnp.ones((2, 32, 32, 3)))
    assert {k: v.shape for k, v in acts.items()} == {
        "block0": (2, 32, 32, 4),
        "block1": (2, 16, 16, 8),
        "block2": (2, 8, 8, 10),
    }
    res = get_model("resnet-18", num_classes=5)
    logits, acts, _ = shapes(res, jnp.ones((1, 64, 64, 3)))
    assert logits.shape == (1, 5)
    assert {k: v.shape for k, v in acts.items()} == {
        "layer1": (1, 16, 16, 64),
        "layer2": (1, 8, 8, 128),
        "layer3": (1, 4, 4, 256),
        "layer4": (1, 2, 2, 512),
        "features": (1, 512),  # the pooled vector the relational baselines read
        "stem": (1, 16, 16, 64),  # after the max-pool
        **{
            f"layer{k}.preact": (1, 2 ** (5 - k), 2 ** (5 - k), 64 * 2 ** (k - 1))
            for k in range(1, 5)
        },
    }


def test_apply_without_mutable_returns_logits_and_train_updates_batch_stats():
    model = get_model("wrn-tiny")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = init(model, 0, x)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (4, 10)
    _, _, stats = forward(model, variables, x, train=True)
    old = variables["batch_stats"]["bn"]["mean"]
    assert not np.allclose(stats["bn"]["mean"], old)


def test_kaiming_init_scale():
    model = get_model("wrn-16-2")
    variables = init(model, 0, jnp.zeros((1, 32, 32, 3)))
    kernel = variables["params"]["group1_block0"]["conv1"]["kernel"]
    assert kernel.shape == (3, 3, 64, 64)
    std = np.sqrt(2 / (3 * 3 * 64))
    assert abs(float(jnp.std(kernel)) - std) < 0.05 * std
    assert float(jnp.max(jnp.abs(kernel))) > 2.5 * std  # untruncated normal


@pytest.mark.parametrize(
    "name,message",
    [
        ("wrn-15-1", "6n\\+4"),
        ("wrn-16-0", "width"),
        ("vgg-16", "known models: wrn-D-K"),
    ],
)
def test_bad_model_names_are_explained(name, message):
    with pytest.raises(ValueError, match=message):
        get_model(name)


def test_bad_override_is_explained():
    with pytest.raises(ValueError, match="bad override"):
        get_model("wrn-16-1", colour="red")


def test_from_torchvision_maps_every_parameter():
    model = get_model("resnet-18", num_classes=7)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    # Build a torchvision-style state dict with the torchvision names and layouts.
    rng = np.random.default_rng(0)
    state = {}
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in flat:
        keys = [p.key for p in path]
        _collection, *modules, field = keys
        tv_modules = []
        for m in modules:
            tv_modules += m.rsplit("_", 1) if m[-1].isdigit() and "_" in m else [m]
        tv_field = {
            "kernel": "weight",
            "bias": "bias",
            "scale": "weight",
            "mean": "running_mean",
            "var": "running_var",
        }[field]
        shape = leaf.shape
        if field == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        state[".".join([*tv_modules, tv_field])] = rng.normal(size=shape).astype(np.float32)
    state["bn1.num_batches_tracked"] = np.array(3)
    converted = from_torchvision(state)
    assert jax.tree.structure(converted) == jax.tree.structure(variables)
    w = state["layer2.0.downsample.0.weight"]
    np.testing.assert_array_equal(
        converted["params"]["layer2_0"]["downsample_0"]["kernel"], w.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        converted["batch_stats"]["layer3_1"]["bn2"]["var"], state["layer3.1.bn2.running_var"]
    )
    np.testing.assert_array_equal(converted["params"]["fc"]["kernel"], state["fc.weight"].T)
    logits = model.apply(converted, jnp.ones((1, 64, 64, 3)))
    assert logits.shape == (1, 7)
