import json
import os
import subprocess
import sys

import pytest

from at_jax import bench
from at_jax.data import bench as data_bench
from conftest import make_image_folder


@pytest.mark.parametrize(
    "method,seeds,model", [("at", 1, "wrn-tiny"), ("vit_copy", 1, "vit-tiny/8")]
)
def test_bench_reports_the_contract_fields(method, seeds, model):
    result = bench.run(
        method,
        model,
        model,
        batch=16,
        steps=2,
        seeds=seeds,
        image_size=16,
        dataset_size=64,
        overrides={"depth": 4, "embed_dim": 32, "num_heads": 2} if "vit" in model else None,
    )
    for key in ("images_per_s", "step_ms", "device", "method", "batch", "dtype", "compile_s"):
        assert key in result
    assert result["images_per_s"] > 0 and result["compile_s"] > 0
    assert result["method"] == method and result["seeds"] == seeds and result["batch"] == 16
    assert result["teacher"] == model


def test_data_bench_from_any_directory_on_a_folder_of_classes(tmp_path):
    root = make_image_folder(tmp_path / "tree", n_train=6, n_val=1)
    for data_dir in (root, root / "train"):  # the image-folder root, or a folder of classes
        result = data_bench.run(str(data_dir), image_size=24, batch=4, steps=3, workers=0, warmup=1)
        assert result["n_images"] == 18 and result["images_per_s"] > 0
    # the installed package works outside the repository (it never imports configs/)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "at_jax.data.bench",
            f"--data_dir={root}",
            "--image_size=24",
            "--batch=4",
            "--steps=2",
            "--workers=1",
            "--warmup=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["workers"] == 1 and line["image_size"] == 24 and line["images_per_s"] > 0
    out = subprocess.run(
        [sys.executable, "-c", "import at_jax.bench, sys; print('configs' in sys.modules)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
