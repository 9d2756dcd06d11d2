"""torchvision weights → run directories (teachers, starting points), fine-tuning with frozen
parts, and the Table 4/5 configs (configs/transfer.py, configs/imagenet.py).

The state_dicts come from a PyTorch ResNet with torchvision's names and layouts
(tests/torchvision_layout.py). ``make test`` installs torch and sets AT_JAX_REQUIRE_TORCH=1, so
there these tests cannot be skipped."""

import os
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import make_cub, make_image_folder, make_scenes, shrink

if os.environ.get("AT_JAX_REQUIRE_TORCH"):
    import torch
else:
    torch = pytest.importorskip("torch")

from at_jax import convert, finetune, runs, step as step_lib, train
from at_jax.data import open_data
from at_jax.data.catalog import IMAGENET_MEAN, IMAGENET_STD
from at_jax.models import forward
from at_jax.sharding import data_mesh
from configs import imagenet, transfer

sys.path.insert(0, os.path.dirname(__file__))
from torchvision_layout import randomized


def torch_logits(model, images_nhwc_float):
    with torch.no_grad():
        return model(
            torch.from_numpy(np.ascontiguousarray(images_nhwc_float.transpose(0, 3, 1, 2)))
        ).numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("folder"), n_train=6, n_val=4)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A 3-class tiny torchvision-layout ResNet, saved with torch.save and converted."""
    root = tmp_path_factory.mktemp("tv")
    model = randomized(seed=1, num_classes=3)
    torch.save(model.state_dict(), root / "tiny.pth")
    assert (
        convert.main(
            [
                "--torchvision",
                str(root / "tiny.pth"),
                "--model",
                "resnet-tiny",
                "--workdir",
                str(root / "run"),
                "--dataset",
                "imagefolder",
            ]
        )
        == 0
    )
    return model, root


def test_converted_pth_and_npz_give_torchs_logits(converted, tmp_path):
    model, root = converted
    net, variables, config = runs.load_run_variables(str(root / "run"), 3, (48, 48, 3))
    assert config.model == "resnet-tiny" and config.converted_from.format == "torchvision"
    x = np.random.default_rng(0).normal(size=(4, 48, 48, 3)).astype(np.float32)
    ours = np.asarray(forward(net, variables, x)[0])
    np.testing.assert_allclose(ours, torch_logits(model, x), atol=2e-5, rtol=1e-5)

    # the same arrays from an .npz (no torch needed), DataParallel's "module." prefix included
    np.savez(
        tmp_path / "tiny.npz", **{f"module.{k}": v.numpy() for k, v in model.state_dict().items()}
    )
    summary = convert.convert(
        str(tmp_path / "tiny.npz"), "resnet-tiny", str(tmp_path / "npz"), dataset="imagefolder"
    )
    assert summary["num_classes"] == 3 and summary["parameters"] == sum(
        p.numel() for p in model.parameters()
    )
    _, from_npz, _ = runs.load_run_variables(str(tmp_path / "npz"), 3, (48, 48, 3))
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(from_npz), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conversion_errors_say_what_to_do(converted, tmp_path, monkeypatch, capsys):
    _model, root = converted
    pth = str(root / "tiny.pth")
    with pytest.raises(
        convert.ConversionError, match="not a resnet-18 .*1 blocks in layer3.*missing.*--model"
    ):
        convert.convert(pth, "resnet-18", str(tmp_path / "a"))
    with pytest.raises(convert.ConversionError, match="already holds a run"):
        convert.convert(pth, "resnet-tiny", str(root / "run"), dataset="imagefolder")
    with pytest.raises(
        convert.ConversionError, match="imagenet2012 has 1000 classes but the weights have 3"
    ):
        convert.convert(pth, "resnet-tiny", str(tmp_path / "b"))
    assert not os.path.exists(tmp_path / "b" / "checkpoints")  # nothing half-written
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(convert.ConversionError, match="cannot read .*junk.pth with torch.load"):
        convert.convert(str(tmp_path / "junk.pth"), "resnet-tiny", str(tmp_path / "c"))
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(convert.ConversionError, match="needs PyTorch.*pip install torch.*npz"):
        convert.read_state_dict(pth)
    assert (
        convert.main(
            ["--torchvision", pth, "--model", "resnet-tiny", "--workdir", str(tmp_path / "d")]
        )
        == 1
    )
    assert capsys.readouterr().err.count("\n") == 1  # one line


def test_converted_run_is_a_teacher_with_torchs_test_error(converted, folder, tmp_path):
    model, root = converted
    config = transfer.get_config("at,cub")
    small(config, folder, "imagefolder", teacher=str(root / "run"), init_from="")
    results = train.train_and_evaluate(config, str(tmp_path / "s"), progress=False)
    # the teacher's error, as torch computes it on the same evaluation images
    data = open_data(config, data_mesh())
    wrong = wrong5 = 0
    for batch in data.eval_batches():
        images = (np.asarray(batch["image"]) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        logits = torch_logits(model, images.astype(np.float32))
        labels, mask = np.asarray(batch["label"]), np.asarray(batch["mask"]) > 0
        wrong += np.sum((logits.argmax(-1) != labels) & mask)
        top5 = np.argsort(-logits, -1)[:, :5]
        wrong5 += np.sum(~(top5 == labels[:, None]).any(-1) & mask)
    assert results["teacher_test_error"] == pytest.approx(100 * wrong / data.n_test, abs=1e-4)
    assert results["teacher_test_top5_error"] == pytest.approx(100 * wrong5 / data.n_test, abs=1e-4)


def small(config, data_dir, name, teacher="", init_from="", model="resnet-tiny"):
    """Shrink a Table 4/5 config to generated data: 32×32 crops of a tiny ResNet, 1 epoch."""
    shrink(config, data_dir, name, model)
    config.num_epochs = 1
    config.log_every_steps = 0
    config.checkpoint_every_steps = 0
    if config.teacher.workdir:
        config.teacher.workdir = teacher
    if config.init_from:
        config.init_from = init_from
    return config


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_finetuning_on_cub_keeps_frozen_parameters_and_bn_statistics_bit_identical(tmp_path):
    # "ImageNet" weights: 10 classes, replaced by a 3-class classifier for the CUB-format data
    torch.save(randomized(seed=2, num_classes=10).state_dict(), tmp_path / "in.pth")
    convert.convert(
        str(tmp_path / "in.pth"), "resnet-tiny", str(tmp_path / "pre"), dataset="imagefolder"
    )
    cub = make_cub(tmp_path, n_classes=3, per_class=6)
    config = small(transfer.get_config("student,cub"), cub, "cub", init_from=str(tmp_path / "pre"))
    config.num_epochs = 2
    config.optimizer.lr = 0.05
    results = train.train_and_evaluate(config, str(tmp_path / "ft"), progress=False)
    assert results["epochs"] == 2
    before, _, _ = runs.restore_variables(str(tmp_path / "pre"))
    after, _, _ = runs.restore_variables(str(tmp_path / "ft"))
    before, after = flat(before), flat(after)
    assert after["params/fc/kernel"].shape == (64, 3) and before["params/fc/kernel"].shape == (
        64,
        10,
    )
    frozen = [
        k
        for k in after
        if k.split("/")[1] in ("conv1", "bn1", "layer1_0")
        or k.startswith("batch_stats/")
        or "/bn" in k
        or "/downsample_1/" in k
    ]
    trained = [k for k in after if k not in frozen and not k.startswith("params/fc/")]
    assert len(frozen) > 20 and len(trained) >= 6
    for k in frozen:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    for k in trained:  # trained, and started from the converted weights, not from scratch
        assert not np.array_equal(after[k], before[k]), k
        assert np.linalg.norm(after[k] - before[k]) < 0.2 * np.linalg.norm(before[k]), k


def test_freeze_and_init_from_errors_name_the_choices(converted, folder, tmp_path):
    _, root = converted
    config = small(
        transfer.get_config("student,cub"), folder, "imagefolder", init_from=str(root / "run")
    )
    config.freeze.modules = ("layer9",)
    with pytest.raises(ValueError, match=r"freeze.modules names \['layer9'\].*'layer1', 'layer2'"):
        train.train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    assert (
        finetune.module_names(("conv1,bn1", "layer1"))
        == finetune.module_names("conv1, bn1,layer1")
        == ("conv1", "bn1", "layer1")
    )  # as command-line overrides give them
    with pytest.raises(ValueError, match="classifies 3 classes; this run has 5.*fine-tune"):
        runs.load_run_variables(str(root / "run"), 5, (32, 32, 3))  # as a teacher
    config.freeze.modules = ()
    config.model = "resnet-18"
    with pytest.raises(ValueError, match="init_from=.*another architecture than 'resnet-18'"):
        train.train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    config.model, config.model_overrides = "resnet-tiny", {"widths": (4, 8, 16, 32)}
    with pytest.raises(ValueError, match="shapes differ outside the classifier"):
        train.train_and_evaluate(config, str(tmp_path / "c"), progress=False)


@pytest.mark.parametrize("arg", [f"{m},{d}" for m in transfer.METHODS for d in transfer.DATASETS])
def test_every_transfer_config_is_the_papers_recipe(arg):
    method, dataset = arg.split(",")
    config = transfer.get_config(arg)
    assert config.data.name == dataset and config.freeze.batch_norm
    assert config.model == ("resnet-34" if method == "teacher" else "resnet-18")
    assert config.init_from == f"runs/torchvision/{config.model}"
    assert bool(config.teacher.workdir) == (method in ("kd", "at"))
    assert (config.loss.at.weight > 0) == (method == "at")
    assert (config.loss.kd.weight > 0) == (method == "kd")
    if method == "at":
        assert (config.loss.at.p, config.loss.at.reduce, config.loss.at.pairs) == (
            2.0,
            "sum",
            "layer3,layer4",
        )


def test_config_arguments_are_checked():
    with pytest.raises(ValueError, match="METHOD,DATASET"):
        transfer.get_config("at")
    with pytest.raises(ValueError, match="METHOD in"):
        imagenet.get_config("fitnet")


@pytest.mark.parametrize(
    "source,arg",
    [
        ("transfer", "teacher,cub"),
        ("transfer", "at,scenes"),
        ("transfer", "kd,cub"),
        ("imagenet", "at"),
    ],
)
def test_table4_and_5_configs_train_on_generated_data(source, arg, converted, folder, tmp_path):
    _, root = converted
    run = str(root / "run")  # 3 classes, as every generated data set here
    if source == "transfer":
        dataset = arg.split(",")[1]
        data_dir = (
            make_cub(tmp_path, n_classes=3, per_class=4)
            if dataset == "cub"
            else make_scenes(tmp_path, per_class=4)
        )
        config = small(transfer.get_config(arg), data_dir, dataset, teacher=run, init_from=run)
    else:
        config = small(imagenet.get_config(arg), folder, "imagefolder", teacher=run)
    results = train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    assert results["epochs"] == 1 and 0 <= results["final_test_error"] <= 100
    assert ("teacher_test_error" in results) == bool(config.teacher.workdir)
    assert sorted(results["loss_terms"]) == sorted(
        k for k, v in config.loss.items() if v.weight != 0
    )


def test_imagenet_lr_is_per_256_images():
    config = imagenet.get_config("at")
    assert step_lib.base_lr(config) == pytest.approx(0.1)
    config.batch_size = 1024
    assert step_lib.base_lr(config) == pytest.approx(0.4)
    assert float(step_lib.lr_schedule(config, 10)(300)) == pytest.approx(0.04)  # after epoch 30
    assert (config.loss.at.start_epoch, config.loss.at.pairs) == (61, "layer3,layer4")


def test_frozen_paths_take_config_freeze_or_a_whole_config(tmp_path):
    """``finetune.frozen_paths(config.freeze, shapes, model)``, and the whole config as before
    the training core was split; data.json is written from a DataSpec or from its four facts."""
    import jax.numpy as jnp

    from at_jax.data import DataSpec
    from at_jax.models import get_model

    config = transfer.get_config("student,cub")
    config.freeze.modules, config.freeze.batch_norm = ("conv1", "layer1"), False
    model = get_model(config.model, num_classes=3)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    parts = finetune.frozen_paths(config.freeze, shapes, config.model)
    assert parts == finetune.frozen_paths(config, shapes)
    assert {p[0] for p in parts} == {"conv1", "layer1_0", "layer1_1"}
    spec = DataSpec(3, (32, 32, 3), IMAGENET_MEAN, IMAGENET_STD)
    runs.write_data_info(str(tmp_path), 3, (32, 32, 3), IMAGENET_MEAN, IMAGENET_STD)
    assert runs.read_data_info(str(tmp_path), config) == spec
