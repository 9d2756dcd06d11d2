import os

# Tests run on CPU with 2 simulated devices (as many as CI's cores), so that every training test
# runs a sharded step; the sharded==single test reruns itself with 8. Set before jax is imported.
TEST_DEVICES = 2
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={TEST_DEVICES}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gzip
import struct

import numpy as np
import pytest


def write_idx(path, array):
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def learnable_images(n, size, rng, num_classes=10):
    """Images whose class is a bright square's position: learnable in a few steps."""
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    cell = size // 4
    for i, y in enumerate(labels):
        r, c = divmod(int(y) % 16, 4)
        images[i, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 220
    return images, labels.astype(np.uint8)


def make_idx_dataset(directory, n_train=256, n_test=128, size=16, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images, labels = learnable_images(n, size, rng)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return directory


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    """A tiny Fashion-MNIST-format dataset (16×16 grey, 256 train / 128 test)."""
    return make_idx_dataset(tmp_path_factory.mktemp("idx"))


def init(model, seed, *args, **kwargs):
    """``model.init`` compiled as one program with an "rbg" key: much faster than running it op by
    op with threefry keys (each op then compiles separately)."""
    import jax
    return jax.jit(model.init)(jax.random.key(seed, impl="rbg"), *args, **kwargs)


def tiny_config(data_dir, method="student", **overrides):
    """A fast config: WRN-10-1 on the tiny IDX dataset."""
    from configs import fashion_mnist, methods
    config = fashion_mnist.get_config(method)
    config.model = "wrn-tiny"
    config.data.data_dir = str(data_dir)
    config.data.source = "local"
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_epochs = 1
    config.data.augment.crop_pad = 1  # the class is a square's position: keep shifts small
    config.optimizer.lr = 0.05
    for key, value in overrides.items():
        methods.set_path(config, key, value)
    return config
