"""The streamed path: sources in their real on-disk layouts, host transforms, the Grain pipeline
(sharding over processes, determinism, checkpointable position) and whole runs from image trees."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from at_jax import runs, step as step_lib, train
from at_jax.data import open_data, sources
from at_jax.data.transforms import EvalTransform, TrainTransform, random_resized_crop_box
from at_jax.files import read_jsonl
from at_jax.sharding import data_mesh
from conftest import make_cub, make_image_folder, make_scenes, streamed_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


def test_image_folder_source_lists_classes_by_name_and_both_splits(folder):
    train_src, val_src, classes = sources.image_folder(str(folder))
    assert classes == ["cat", "dog", "emu"]  # sorted, the hidden .cache folder ignored
    assert len(train_src) == 24 and len(val_src) == 12
    labels = [r["label"] for r in train_src.records]
    assert labels == sorted(labels) and set(labels) == {0, 1, 2}
    exts = {os.path.splitext(r["image"])[1] for r in train_src.records}
    assert exts == {".png", ".JPEG", ".jpg"}
    assert all(
        os.path.basename(os.path.dirname(r["image"])) == classes[r["label"]]
        for r in val_src.records
    )


def test_cub_source_reads_split_labels_and_boxes(tmp_path):
    base = make_cub(tmp_path)
    for data_dir in (tmp_path, base):  # the parent folder or CUB_200_2011 itself
        train_src, test_src, classes = sources.cub(str(data_dir))
        assert len(train_src) == 9 and len(test_src) == 3
        assert classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    first = train_src[0]
    x, y, w, h = (
        float(v) for v in (base / "bounding_boxes.txt").read_text().split("\n")[0].split()[1:]
    )
    assert first["bbox"] == (x, y, x + w, y + h) and first["label"] == 0
    # the box crop: train and eval views of a red bird on blue are red
    out = TrainTransform(32)(first, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
    assert out["image"][..., 0].mean() > 180 and out["image"][..., 2].mean() < 60
    view = EvalTransform(32)(test_src[0])["image"]
    assert view[..., 0].mean() > 180 and view[..., 2].mean() < 60


def test_scenes_source_uses_the_official_lists(tmp_path):
    make_scenes(tmp_path)
    train_src, test_src, classes = sources.scenes(str(tmp_path))
    assert classes == ["airport_inside", "bakery", "kitchen"]
    assert len(train_src) == 12 and len(test_src) == 3
    assert [r["label"] for r in test_src.records] == [0, 1, 2]


@pytest.mark.parametrize(
    "name,setup,message",
    [
        ("imagefolder", lambda p: None, "no 'train' folder"),
        ("imagefolder", lambda p: (p / "train" / "a").mkdir(parents=True), "no images"),
        ("cub", lambda p: None, "missing images.txt"),
        ("scenes", lambda p: (p / "Images" / "a").mkdir(parents=True), "missing TrainImages.txt"),
    ],
)
def test_missing_or_malformed_data_names_the_path_and_the_layout(tmp_path, name, setup, message):
    setup(tmp_path)
    with pytest.raises(sources.DataLayoutError) as e:
        sources.open_source(name, str(tmp_path))
    text = str(e.value)
    assert message in text and str(tmp_path) in text and "Expected layout" in text


def test_malformed_cub_table_is_explained(tmp_path):
    base = make_cub(tmp_path)
    (base / "bounding_boxes.txt").write_text("1 2 3\n")
    with pytest.raises(sources.DataLayoutError, match="line 1 has 3 fields, expected 5"):
        sources.cub(str(tmp_path))


def test_random_resized_crop_box_stays_in_range():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(rng.integers(10, 400)), int(rng.integers(10, 400))
        x, y, cw, ch = random_resized_crop_box(w, h, rng)
        assert x >= 0 and x + cw <= w and y >= 0 and y + ch <= h and cw > 0 and ch > 0
    # a square image: area 8%-100% and aspect ratio 3/4-4/3 (up to rounding)
    for _ in range(300):
        x, y, cw, ch = random_resized_crop_box(300, 300, rng)
        assert 0.08 * 0.97 <= cw * ch / 300**2 <= 1.0 and 0.74 <= cw / ch <= 1.36
    # an extreme panorama falls back to the central box with the ratio clamped
    assert random_resized_crop_box(1000, 10, np.random.default_rng(1)) == (493, 0, 13, 10)


def test_eval_view_is_the_centre_of_the_short_side_resize(tmp_path):
    pixels = np.zeros((112, 160, 3), np.uint8)
    pixels[:, :24] = 255  # a white band on the left edge: cut off by the centre crop
    Image.fromarray(pixels).save(tmp_path / "x.png")
    view = EvalTransform(56)({"image": str(tmp_path / "x.png"), "label": 3})
    assert view["image"].shape == (56, 56, 3) and view["label"] == 3
    # short side 112 -> 64 (56·256/224): the 160-wide image becomes ~91 wide, the centre 56
    # columns start at ~18 resized pixels = 31 source pixels > 24: no white left
    assert view["image"].max() < 10
    wide = EvalTransform(56)({"image": pixels, "label": 0})["image"]
    np.testing.assert_array_equal(wide, view["image"])  # arrays and files give the same view


def test_reduced_scale_jpeg_decoding_matches_a_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (20, 30, 3)), np.ones((24, 24, 1))).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(smooth).save(tmp_path / "big.png")
    fast = EvalTransform(64)({"image": str(tmp_path / "big.jpg"), "label": 0})["image"]
    full = EvalTransform(64)({"image": str(tmp_path / "big.png"), "label": 0})["image"]
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 6


def local_records(data, index, count, epoch_steps):
    """Per step: the local batch (images, labels) of process ``index`` of ``count``."""
    ds = data.train_dataset(index, count)
    return [ds[i] for i in range(epoch_steps)]


def test_process_shards_are_disjoint_cover_the_epoch_and_form_the_same_global_batch(folder):
    config = streamed_config(folder, num_epochs=2)
    data = open_data(config, data_mesh())
    steps = data.steps_per_epoch
    assert steps == 24 // 8
    one = local_records(data, 0, 1, 2 * steps)
    two = [local_records(data, p, 2, 2 * steps) for p in range(2)]
    for i in range(2 * steps):
        assert two[0][i]["image"].shape == (4, 32, 32, 3)
        merged = np.concatenate([two[0][i]["image"], two[1][i]["image"]])
        # the same examples, augmented identically, whatever the number of processes
        key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
        assert key(merged) == key(one[i]["image"])
    for epoch in range(2):
        part = [
            np.concatenate([b["image"] for b in two[p][epoch * steps : (epoch + 1) * steps]])
            for p in range(2)
        ]
        a, b = ({x.tobytes() for x in p} for p in part)
        assert not a & b and len(a) + len(b) == 24  # disjoint, every image once per epoch
    # a different permutation each epoch, reproducible from the seed
    labels = [b["label"].tolist() for b in one]
    assert labels[:steps] != labels[steps:]
    again = local_records(open_data(config, data_mesh()), 0, 1, 2 * steps)
    assert all((x["image"] == y["image"]).all() for x, y in zip(one, again, strict=True))


def test_eval_batches_cover_the_test_set_once_with_padding_masked(folder):
    config = streamed_config(folder, eval_batch_size=8)
    data = open_data(config, data_mesh())
    batches = list(data.eval_batches())
    masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
    labels = np.concatenate([np.asarray(b["label"]) for b in batches])
    assert len(masks) == 16 and masks.sum() == 12  # 12 test images padded to 2 batches of 8
    assert np.bincount(labels[masks > 0]).tolist() == [4, 4, 4]


def test_iterator_state_resumes_at_the_exact_next_batch(folder):
    config = streamed_config(folder, num_epochs=2, **{"data.num_workers": 2})
    data = open_data(config, data_mesh())
    it = data.train_iterator()
    seen = [next(it) for _ in range(2)]
    state = it.get_state()
    after = [next(it) for _ in range(3)]
    expected = [np.asarray(b["image"]) for b in after]
    it.close()
    # each example's index in the training set (CRD's memory row): one epoch visits each once,
    # and the labels are those records'
    epoch = [np.asarray(b["example_index"]) for b in (*seen, after[0])]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(24))
    labels = data.train_labels()
    for b in (*seen, *after):
        np.testing.assert_array_equal(labels[np.asarray(b["example_index"])], b["label"])
    resumed = data.train_iterator()
    resumed.set_state(state)
    got = [np.asarray(next(resumed)["image"]) for _ in range(3)]
    resumed.close()
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tfds_imagenet_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        train_src, _test_src, classes = sources.open_source("imagenet2012", "")
        record = train_src[0]
    assert classes is None and len(train_src) == 4
    assert record["image"].ndim == 3 and record["image"].dtype == np.uint8
    out = TrainTransform(32)(record, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3)


@pytest.mark.heavy
def test_teacher_then_at_student_from_an_image_folder(folder, tmp_path):
    teacher = train.train_and_evaluate(
        streamed_config(
            folder,
            "imagefolder",
            "teacher",
            model="resnet-tiny",
            num_epochs=3,
            log_every_steps=2,
            **{"optimizer.lr": 0.1},
        ),
        str(tmp_path / "t"),
        progress=False,
    )
    assert (
        teacher["epochs"] == 3
        and 0 <= teacher["final_test_top5_error"] <= teacher["final_test_error"] <= 100
    )
    rows = read_jsonl(str(tmp_path / "t" / "metrics.jsonl"))
    assert [r["step"] for r in rows if "epoch" not in r] == [2, 4, 6, 8]  # log_every_steps
    assert [r["epoch"] for r in rows if "epoch" in r] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    config = streamed_config(folder, "imagefolder", "at", num_epochs=1)
    config.teacher.workdir = str(tmp_path / "t")
    student = train.train_and_evaluate(config, str(tmp_path / "s"), progress=False)
    assert student["teacher_test_error"] == pytest.approx(teacher["final_test_error"], abs=1e-4)
    assert student["teacher_test_top5_error"] == pytest.approx(
        teacher["final_test_top5_error"], abs=1e-4
    )
    row = read_jsonl(str(tmp_path / "s" / "metrics.jsonl"))[-1]
    assert row["train/at"] > 0 and np.isfinite(row["test/top5_error"])


def test_corrupt_newest_checkpoint_falls_back_to_an_older_one(folder, tmp_path):
    config = streamed_config(folder, num_epochs=2, checkpoint_every_steps=1, keep_checkpoints=3)
    workdir = tmp_path / "run"
    done = train.train_and_evaluate(config, str(workdir), progress=False)
    ckpts = workdir / "checkpoints"
    assert sorted(int(s) for s in os.listdir(ckpts)) == [4, 5, 6]
    os.remove(workdir / "results.json")
    for root, _, files in os.walk(ckpts / "6"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\xff\xfe garbage")
    again = train.train_and_evaluate(config, str(workdir), progress=False)
    assert again["final_test_error"] == pytest.approx(done["final_test_error"], abs=1e-4)
    assert os.listdir(workdir / "corrupt_checkpoints") == ["6"]
    # nothing readable left: one clear error, and nothing deleted
    for step in os.listdir(ckpts):
        for root, _, files in os.walk(ckpts / step):
            for name in files:
                open(os.path.join(root, name), "wb").close()
    os.remove(workdir / "results.json")
    with pytest.raises(runs.CheckpointError, match="no usable checkpoint.*start the run over"):
        train.train_and_evaluate(config, str(workdir), progress=False)


def test_a_term_that_owns_parameters_is_registered_like_any_other(folder, tmp_path):
    from at_jax import objective

    teacher_dir = tmp_path / "t"
    train.train_and_evaluate(
        streamed_config(folder, num_epochs=1, model="resnet-tiny"), str(teacher_dir), progress=False
    )
    config = streamed_config(folder, "imagefolder", "factt", num_epochs=1)
    config.teacher.workdir = str(teacher_dir)
    config.model_overrides = {"widths": (4, 8, 16, 32)}  # half the teacher's channels
    data = open_data(config, data_mesh())
    t_model, t_vars, _ = runs.load_run_variables(
        str(teacher_dir), data.num_classes, data.image_shape
    )
    st = step_lib.Step.from_config(
        config, data.spec, data.steps_per_epoch, teacher_model=t_model, teacher_variables=t_vars
    )
    assert set(st.term_modules) == {"factt"}
    assert isinstance(st.term_modules["factt"], objective.FActTAdapters)
    state = st.init_state()
    kernels = state.params["terms"]["factt"]
    assert kernels["layer4"]["kernel"].shape == (1, 1, 1, 32, 64)  # (seeds, 1, 1, in, out)
    batch = next(iter(data.eval_batches()))
    before = jax.device_get(kernels)
    state, metrics = st.train_step(
        state,
        {"image": batch["image"], "label": batch["label"]},
        jax.device_put(t_vars, st.replicated),
    )
    after = jax.device_get(state.params["terms"]["factt"])
    assert not np.allclose(before["layer4"]["kernel"], after["layer4"]["kernel"])
    assert np.isfinite(np.asarray(metrics["train/factt"])).all()


def test_run_directory_is_refused_for_another_dataset(folder, tmp_path):
    config = streamed_config(folder, num_epochs=1)
    train.train_and_evaluate(config, str(tmp_path), progress=False)
    saved = json.load(open(tmp_path / "results.json"))
    assert train.train_and_evaluate(config, str(tmp_path), progress=False) == saved
    other = streamed_config(folder, num_epochs=1, **{"data.image_size": 40})
    with pytest.raises(ValueError, match="data.image_size: 32 -> 40"):
        train.train_and_evaluate(other, str(tmp_path), progress=False)
    shutil.rmtree(tmp_path / "checkpoints")


def test_tfds_caltech_birds_records_carry_their_box_in_pixels():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=3):
        train_src, _, _ = sources.open_source("caltech_birds2011", "")
        record = train_src[0]
        raw = train_src.source[0]
    h, w = record["image"].shape[:2]
    ymin, xmin, ymax, xmax = np.asarray(raw["bbox"], np.float64)
    np.testing.assert_allclose(record["bbox"], (xmin * w, ymin * h, xmax * w, ymax * h))
    assert TrainTransform(32)(record, np.random.default_rng(0))["image"].shape == (32, 32, 3)
    assert EvalTransform(32)(record)["image"].shape == (32, 32, 3)
