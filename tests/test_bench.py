import json
import os
import subprocess
import sys

from at_jax import bench
from at_jax.data import bench as data_bench
from conftest import assert_bench_contract, make_image_folder


def test_bench_reports_the_contract_fields():
    """The ViT step here; the CNN AT step's fields are checked on the GPU check's smoke run
    (tests/test_user_faults.py), which runs it."""
    overrides = {"depth": 4, "embed_dim": 32, "num_heads": 2}
    result = bench.run(
        "vit_copy", "vit-tiny/8", "vit-tiny/8", batch=16, steps=2, seeds=1, image_size=16,
        dataset_size=64, overrides=overrides,
    )  # fmt: skip
    assert_bench_contract(result, "vit_copy", "vit-tiny/8", batch=16)


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
