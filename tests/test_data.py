import os
import pickle
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from at_jax.data import CIFAR_MEAN, CIFAR_STD, load_dataset
from at_jax.data.augment import augment, random_crop
from at_jax.data.local import read_idx
from at_jax.preprocess import normalize
from conftest import make_idx_dataset, write_idx


def cifar_batches(rng, n, label_key):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    return {b"data": data, label_key.encode(): labels, b"batch_label": b"x"}


def write_cifar(root, name, archive):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            "labels",
        )
    else:
        folder, files, key = "cifar-100-python", ["train", "test"], "fine_labels"
    (root / folder).mkdir(parents=True)
    batches = {}
    for f in files:
        batches[f] = cifar_batches(rng, 4, key)
        with open(root / folder / f, "wb") as fh:
            pickle.dump(batches[f], fh)
    if archive:
        path = root / ("cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz")
        with tarfile.open(path, "w:gz") as tar:
            tar.add(root / folder, arcname=folder)
        for f in files:
            os.remove(root / folder / f)
        os.rmdir(root / folder)
    return batches, files, key


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("archive", [True, False])
def test_cifar_python_archive_and_folder(tmp_path, name, archive):
    batches, files, key = write_cifar(tmp_path, name, archive)
    ds = load_dataset(name, source="local", data_dir=str(tmp_path))
    n_train = 4 * (len(files) - 1)
    assert ds.train_images.shape == (n_train, 32, 32, 3) and ds.test_images.shape == (4, 32, 32, 3)
    assert ds.num_classes == (10 if name == "cifar10" else 100)
    first = batches[files[0]]
    # CHW rows -> HWC: pixel (row 1, col 2) of channel 1 of the first image
    assert ds.train_images[0, 1, 2, 1] == first[b"data"][0][1024 + 1 * 32 + 2]
    np.testing.assert_array_equal(ds.test_labels, batches[files[-1]][key.encode()])
    assert ds.mean == CIFAR_MEAN and ds.std == CIFAR_STD


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_gz_or_raw(tmp_path, gz):
    make_idx_dataset(tmp_path, n_train=20, n_test=10, size=28, gz=gz)
    ds = load_dataset("fashion_mnist", source="local", data_dir=str(tmp_path), train_size=12)
    assert ds.train_images.shape == (12, 28, 28, 1) and ds.test_images.shape == (10, 28, 28, 1)
    raw = read_idx(str(tmp_path / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))))
    np.testing.assert_array_equal(ds.test_labels, raw)


def test_corrupt_idx_file_is_explained(tmp_path):
    write_idx(tmp_path / "x.gz", np.zeros((2, 3, 3), np.uint8))
    data = open(tmp_path / "x.gz", "rb").read()
    import gzip

    raw = gzip.decompress(data)[:-4]
    with gzip.open(tmp_path / "y.gz", "wb") as f:
        f.write(raw)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "y.gz"))


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        ds = load_dataset("cifar10", source="tfds")
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.source == "tfds:cifar10" and ds.train_labels.shape == (6,)


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"looked in: {tmp_path}.*apt-get install"):
        load_dataset("fashion_mnist", source="local", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", source="local", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet21k")


def test_real_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion_mnist", source="local")
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (
        10000,
        28,
        28,
        1,
    )
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert abs(ds.train_images.mean() / 255 - ds.mean[0]) < 1e-3


def test_augmentation_crop_flip_and_normalisation():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (8, 6, 6, 3)), jnp.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    norm = normalize(x, mean, std)
    np.testing.assert_allclose(norm, (np.asarray(x) / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    key = jax.random.key(0)
    out = augment(x, key, mean, std, crop_pad=2, flip=True)
    np.testing.assert_array_equal(out, augment(x, key, mean, std, crop_pad=2, flip=True))
    assert out.shape == x.shape
    padded = np.pad(np.asarray(norm), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    windows = [padded[:, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
    for b in range(8):  # every output is a window of the reflect-padded image, maybe flipped
        o = np.asarray(out[b])
        assert any(np.allclose(o, w[b]) or np.allclose(o, w[b][:, ::-1]) for w in windows)
    crops = random_crop(norm, jax.random.key(3), 2)
    assert not np.allclose(crops, norm)  # some offset is not the centre
    np.testing.assert_array_equal(augment(x, key, mean, std, crop_pad=0, flip=False), norm)


def test_in_memory_batches_follow_the_data_interface(idx_dir):
    """Both data paths give their batches as one interface (at_jax.data.TrainBatches): the
    in-memory batches from a step are those an uninterrupted iterator reaches there, their
    checkpointable state is empty, and they report nothing skipped."""
    from at_jax.data import DataSpec, open_data
    from at_jax.sharding import data_mesh
    from conftest import tiny_config

    config = tiny_config(idx_dir, num_epochs=2)
    data = open_data(config, data_mesh())
    assert isinstance(data.spec, DataSpec) and data.spec.num_classes == data.num_classes == 10
    assert data.spec.image_shape == data.image_shape and not data.counts_skipped
    first = data.train_batches()
    assert first.checkpoint_state is None and not first.report and data.warnings == []
    batches = [next(first) for _ in range(data.steps_per_epoch + 2)]
    later = data.train_batches()
    later.start_at(data.steps_per_epoch + 1)  # across an epoch boundary
    np.testing.assert_array_equal(next(later)["index"], batches[-1]["index"])
    with pytest.raises(RuntimeError, match="before the first batch"):
        later.start_at(0)
    first.close(), later.close()
    assert data.describe_skipped([3, 1]) == "train example 1, train example 3"


def test_data_spec_is_checked_and_round_trips_through_json():
    from at_jax.data import DataSpec

    spec = DataSpec(10, [28, 28, 1], [0.286], [0.353])
    assert spec.image_shape == (28, 28, 1) and spec.mean == (0.286,)
    assert DataSpec.from_json(spec.to_json()) == spec
    assert DataSpec(None, (8, 8, 3), (0.5,) * 3, (0.2,) * 3).with_classes(4).class_count() == 4
    with pytest.raises(ValueError, match="one mean and std per channel"):
        DataSpec(10, (28, 28, 1), (0.5, 0.5, 0.5), (0.2,))
    with pytest.raises(ValueError, match="class count of this data is not known"):
        DataSpec(None, (8, 8, 3), (0.5,) * 3, (0.2,) * 3).class_count()
