"""Fidelity to the reference's PyTorch conventions that the formula tests do not cover: batch
norm's running statistics (unbiased variance, as torch.nn.BatchNorm2d)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax import step as step_lib
from at_jax.data import load_dataset
from at_jax.models import forward, get_model
from at_jax.models.common import BatchNorm
from at_jax.sharding import data_mesh, sharded
from conftest import init, tiny_config

if os.environ.get("AT_JAX_REQUIRE_TORCH"):
    import torch
else:
    torch = pytest.importorskip("torch")


def test_batch_norm_matches_torch_batchnorm2d_in_train_and_eval_mode():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 5, 4, 3)) * 2 + 1).astype(np.float32)  # NHWC, n = 6·5·4 per channel
    bn = BatchNorm(use_running_average=False, epsilon=1e-5)
    variables = bn.init(jax.random.key(0), x)
    reference = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=0.1)
    nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    y_torch = reference.train()(nchw).detach().numpy().transpose(0, 2, 3, 1)
    y, state = bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_torch, rtol=1e-5, atol=1e-5)
    stats = state["batch_stats"]
    np.testing.assert_allclose(stats["mean"], reference.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], reference.running_var.numpy(), rtol=1e-6)
    # the formula: 0.9 · 1 + 0.1 · the unbiased variance (Flax's own BatchNorm uses the biased)
    unbiased = x.reshape(-1, 3).var(axis=0, ddof=1)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * unbiased, rtol=1e-5)
    # eval mode normalises with the running statistics, as torch's eval()
    y_eval = BatchNorm(use_running_average=True).apply({**variables, **state}, x)
    np.testing.assert_allclose(
        y_eval, reference.eval()(nchw).detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5
    )


def test_running_variance_after_one_train_step_is_pytorchs(idx_dir):
    """After one step of the real train step, the WRN's last BN (input: the group2 activations)
    holds PyTorch's running statistics of that batch."""
    config = tiny_config(
        idx_dir, "student", **{"data.augment.crop_pad": 0, "data.augment.flip": False}
    )
    data = load_dataset("fashion_mnist", "local", str(idx_dir))
    mesh = data_mesh()
    st = step_lib.Step.from_config(config, data.spec, 8, mesh=mesh)
    state = st.init_state()
    before = jax.device_get({"params": state.params["student"], "batch_stats": state.batch_stats})
    before = jax.tree.map(lambda a: a[0], before)  # seed 0
    idx = jnp.arange(32, dtype=jnp.int32)[None]
    batch = {
        "index": jax.device_put(idx, sharded(mesh, None, "data")),
        "pool_image": jax.device_put(data.train_images, st.replicated),
        "pool_label": jax.device_put(data.train_labels, st.replicated),
    }
    state, _ = st.train_step(state, batch, {})
    x = (data.train_images[:32] / 255.0 - data.mean[0]) / data.std[0]
    _, acts, _ = forward(st.model, before, jnp.asarray(x, jnp.float32), train=True)
    group2 = np.asarray(acts["group2"], np.float64).reshape(-1, acts["group2"].shape[-1])
    expected_var = 0.9 * before["batch_stats"]["bn"]["var"] + 0.1 * group2.var(axis=0, ddof=1)
    expected_mean = 0.9 * before["batch_stats"]["bn"]["mean"] + 0.1 * group2.mean(axis=0)
    after = jax.device_get(state.batch_stats["bn"])
    np.testing.assert_allclose(after["var"][0], expected_var, rtol=2e-4)
    np.testing.assert_allclose(after["mean"][0], expected_mean, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["nin-tiny", "resnet-tiny"])
def test_every_model_family_updates_with_the_unbiased_variance(name):
    model = get_model(name, num_classes=10, **({"dropout_rate": 0.0} if "nin" in name else {}))
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = init(model, 0, x)
    _, _acts, stats = forward(model, variables, x, train=True)
    first = "block0_bn0" if "nin" in name else "bn1"
    # the first BN's input is the first convolution of x: recompute it with the same kernel
    conv = variables["params"]["block0_conv0" if "nin" in name else "conv1"]
    pad, stride = (2, 1) if "nin" in name else (3, 2)
    y = jax.lax.conv_general_dilated(
        x,
        conv["kernel"],
        (stride, stride),
        [(pad, pad)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if "bias" in conv:
        y = y + conv["bias"]
    flat = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
    np.testing.assert_allclose(stats[first]["var"], 0.9 + 0.1 * flat.var(axis=0, ddof=1), rtol=2e-4)
