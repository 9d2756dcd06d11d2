import atexit
import contextlib
import os
import shutil
import tempfile

# XLA:CPU compiles the tests' small programs about 40% faster with its older elemental emitters
# than with its fusion emitters, and in one thread (two test workers share CI's two cores):
# measured in benchmarks/RESULTS.md. Only the flags that this jaxlib knows are used (an unknown
# one in XLA_FLAGS aborts the process): probed once per run, in a throw-away process, and
# passed on to the workers and the tests' subprocesses through the environment.
FAST_COMPILE_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
_PROBE = """
try:
    from jaxlib import _jax
    _jax.get_tfrt_cpu_client()  # parses XLA_FLAGS (an unknown flag aborts)
except Exception:
    import jax
    jax.devices("cpu")
"""


def _known_xla_flags(flags):
    """The flags of ``flags`` that this jaxlib accepts in XLA_FLAGS."""
    import subprocess
    import sys

    def known(flag):
        env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True)
        return probe.returncode == 0

    return " ".join(flag for flag in flags if known(flag))


if "AT_JAX_TESTS_XLA_FLAGS" not in os.environ:
    os.environ["AT_JAX_TESTS_XLA_FLAGS"] = _known_xla_flags(FAST_COMPILE_FLAGS)


def xla_flags(devices=None):
    """XLA_FLAGS for a test's subprocess: the tests' compilation flags, and ``devices`` simulated
    CPU devices if given (none: the program picks, as a user's does)."""
    flags = os.environ["AT_JAX_TESTS_XLA_FLAGS"]
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return flags.strip()


# Tests run on CPU with 2 simulated devices (as many as CI's cores), so that every training test
# runs a sharded step; the sharded==single test reruns itself with 8. Set before jax is imported.
TEST_DEVICES = 2
os.environ.setdefault("XLA_FLAGS", xla_flags(TEST_DEVICES))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests' programs are small and many: compiling them is most of the suite's time, running
# them little. XLA's cheaper compilation (fewer optimisation passes) is worth it here; every
# test and its subprocesses use it alike, so results compared with each other are computed
# the same way. (The library, the CLI and the demo compile with full optimisation.)
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One persistent compilation cache for the whole run, its subprocesses included (they find it
# through XDG_CACHE_HOME, the default of config.compilation_cache_dir): a program that several
# tests compile is compiled once. Fresh for every run and removed after it, unless
# AT_JAX_TESTS_CACHE_HOME names a directory to keep (a developer's faster reruns).
_CACHE_HOME = os.environ.get("AT_JAX_TESTS_CACHE_HOME")
if not _CACHE_HOME:
    _CACHE_HOME = tempfile.mkdtemp(prefix="at_jax-tests-")
    atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)
    os.environ["AT_JAX_TESTS_CACHE_HOME"] = _CACHE_HOME  # pytest subprocesses share it
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME

import gzip
import struct

import numpy as np
import pytest

from at_jax.compilation_cache import default_cache_dir, use_compilation_cache

use_compilation_cache(default_cache_dir())


def pytest_collection_modifyitems(config, items):
    """The tests marked ``heavy`` (the longest: trained runs, CLI subprocesses) run first, the
    others after them in their usual order: with pytest-xdist the workers then end on short
    tests together instead of one of them finishing a long one alone."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable


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
        images[i, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = 220
    return images, labels.astype(np.uint8)


def make_idx_dataset(directory, n_train=256, n_test=128, size=16, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images, labels = learnable_images(n, size, rng)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return directory


def shared(tmp_path_factory, name, build):
    """``DIR/name`` built once by ``build(path)`` for the whole run: with pytest-xdist, the
    first worker builds it (under a file lock) and the others use it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # common to every worker of this run
    path = base / f"shared-{name}"
    with FileLock(str(path) + ".lock"):
        if not (path / ".done").exists():
            path.mkdir(exist_ok=True)
            build(path)
            (path / ".done").touch()
    return path


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    """A tiny Fashion-MNIST-format dataset (16×16 grey, 256 train / 128 test)."""
    return shared(tmp_path_factory, "idx", make_idx_dataset)


@contextlib.contextmanager
def optimized_xla():
    """Full XLA optimisation (the library's default) inside, for the few tests whose programs
    run long enough for it to pay (see JAX_DISABLE_MOST_OPTIMIZATIONS above)."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def optimized():
    with optimized_xla():
        yield


@pytest.fixture
def procs():
    """Start subprocesses (``procs.start(cmd, ...)``), each in its own process group; after the
    test, the whole group of each must be gone within 10 s (its Grain workers and resource
    tracker included) — whatever is left is killed and fails the test."""
    from procs import Processes

    processes = Processes()
    yield processes
    left = processes.close()
    assert not left, f"processes left behind 10 s after their run ended: {left}"


@pytest.fixture(scope="session")
def teacher_dir(idx_dir, tmp_path_factory):
    """A tiny teacher (WRN-10-1) trained for 5 epochs on ``idx_dir``: shared by the tests that
    need a trained run (copy it before changing it)."""
    from at_jax import train

    def build(workdir):
        config = tiny_config(idx_dir, "teacher", model="wrn-tiny", num_epochs=5)
        with optimized_xla():
            train.train_and_evaluate(config, str(workdir), progress=False)

    return shared(tmp_path_factory, "teacher", build)


@pytest.fixture(scope="session")
def teacher_run(teacher_dir, idx_dir):
    """``(workdir, data_dir)`` of the shared tiny teacher."""
    return teacher_dir, idx_dir


def init(model, seed, *args, **kwargs):
    """``model.init`` compiled as one program with an "rbg" key: much faster than running it op by
    op with threefry keys (each op then compiles separately)."""
    import jax

    return jax.jit(model.init)(jax.random.key(seed, impl="rbg"), *args, **kwargs)


def apply_flags(config, flags):
    """``config`` with ``--config.key=value`` command-line overrides applied, as the CLI does
    (for in-process reference runs of the CLI tests)."""
    import ast

    from at_jax import recipes

    for flag in flags:
        key, value = flag[len("--config.") :].split("=", 1)
        with contextlib.suppress(ValueError, SyntaxError):  # else it stays a string
            value = ast.literal_eval(value)
        recipes.set_path(config, key, value)
    return config


def assert_same_run(ref_dir, run_dir, rel=1e-6):
    """The same metrics rows (train and test values, lr, at the same steps) and results: what an
    interrupted and resumed run must share with an uninterrupted one."""
    import json

    from at_jax.files import read_jsonl

    ref_rows = read_jsonl(str(ref_dir / "metrics.jsonl"))
    rows = read_jsonl(str(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, rows, strict=True):
        for key in a:
            if key.startswith(("train/", "test/")) or key == "lr":
                assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (a["step"], key)
    ref = json.load(open(ref_dir / "results.json"))
    res = json.load(open(run_dir / "results.json"))
    for key in ("final_test_error", "final_test_top5_error", "best_test_error"):
        assert ref[key] == pytest.approx(res[key], abs=1e-4), key


def tiny_config(data_dir, method="student", **overrides):
    """A fast config: WRN-10-1 on the tiny IDX dataset."""
    from at_jax import recipes
    from configs import fashion_mnist

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
        recipes.set_path(config, key, value)
    return config


def write_image(path, size, rng, color=None, fmt=None):
    """A random RGB image (``size`` = (width, height)); a solid ``color`` if given."""
    from PIL import Image

    w, h = size
    if color is None:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        pixels = np.broadcast_to(np.asarray(color, np.uint8), (h, w, 3)).copy()
    Image.fromarray(pixels).save(path, format=fmt)


def make_image_folder(root, classes=("cat", "dog", "emu"), n_train=8, n_val=4, seed=0):
    """``root/train/<class>/*`` and ``root/val/<class>/*``: JPEGs (and a PNG per class) of
    varied sizes whose colour depends on the class, so that they are learnable."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
                color = [40, 40, 40]
                color[c % 3] = 220
                from PIL import Image

                pixels = np.clip(rng.normal(0, 25, (size[1], size[0], 3)) + color, 0, 255)
                ext = "png" if i == 0 else ("JPEG" if i % 2 else "jpg")
                Image.fromarray(pixels.astype(np.uint8)).save(
                    folder / f"{name}_{i}.{ext}", format="PNG" if ext == "png" else "JPEG"
                )
        (root / split / ".cache").mkdir(exist_ok=True)  # hidden folders are not classes
    return root


def make_cub(root, n_classes=3, per_class=4, seed=0):
    """A CUB_200_2011 folder: red birds in blue images, boxes in bounding_boxes.txt."""
    rng = np.random.default_rng(seed)
    base = root / "CUB_200_2011"
    (base / "images").mkdir(parents=True)
    lines = {"images": [], "labels": [], "split": [], "boxes": [], "classes": []}
    image_id = 0
    for c in range(1, n_classes + 1):
        cls = f"{c:03d}.Bird_{c}"
        lines["classes"].append(f"{c} {cls}")
        (base / "images" / cls).mkdir()
        for i in range(per_class):
            image_id += 1
            w, h = int(rng.integers(60, 100)), int(rng.integers(60, 100))
            x, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
            bw, bh = int(rng.integers(w // 3, w - x)), int(rng.integers(h // 3, h - y))
            pixels = np.zeros((h, w, 3), np.uint8)
            pixels[..., 2] = 230
            pixels[y : y + bh, x : x + bw] = (230, 0, 0)
            from PIL import Image

            name = f"{cls}/Bird_{c}_{i}.jpg"
            Image.fromarray(pixels).save(base / "images" / name, quality=95)
            lines["images"].append(f"{image_id} {name}")
            lines["labels"].append(f"{image_id} {c}")
            lines["split"].append(f"{image_id} {int(i < per_class - 1)}")
            lines["boxes"].append(f"{image_id} {x}.0 {y}.0 {bw}.0 {bh}.0")
    for key, fname in (
        ("images", "images.txt"),
        ("labels", "image_class_labels.txt"),
        ("split", "train_test_split.txt"),
        ("boxes", "bounding_boxes.txt"),
        ("classes", "classes.txt"),
    ):
        (base / fname).write_text("\n".join(lines[key]) + "\n")
    return base


def make_scenes(root, classes=("airport_inside", "bakery", "kitchen"), per_class=5, seed=0):
    """An MIT Indoor-67 folder: Images/<class>/*.jpg with TrainImages.txt / TestImages.txt."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in classes:
        (root / "Images" / c).mkdir(parents=True)
        for i in range(per_class):
            name = f"{c}/img_{i}.jpg"
            write_image(root / "Images" / name, (50, 40), rng, fmt="JPEG")
            (train if i < per_class - 1 else test).append(name)
    (root / "TrainImages.txt").write_text("\n".join(train) + "\n")
    (root / "TestImages.txt").write_text("\n".join(test) + "\n")
    return root


def shrink(config, data_dir, name, model="resnet-tiny"):
    """Point a streamed config at generated data: 32×32 crops, a tiny model, batches of 8."""
    config.model = model
    config.data.name = name
    config.data.data_dir = str(data_dir)
    config.data.image_size = 32
    config.data.num_workers = 0
    config.batch_size = 8
    config.eval_batch_size = 8
    return config


def streamed_config(data_dir, name="imagefolder", method="student", **overrides):
    """A fast streamed config: resnet-tiny on 32×32 crops of a generated image tree."""
    from at_jax import recipes

    config = recipes.base_config()
    recipes.apply_method(config, method, "")
    shrink(config, data_dir, name)
    config.num_epochs = 2
    config.optimizer.lr = 0.05
    config.optimizer.weight_decay = 1e-4
    for key, value in overrides.items():
        recipes.set_path(config, key, value)
    return config


BENCH_CONTRACT = ("images_per_s", "step_ms", "device", "method", "batch", "dtype", "compile_s")


def assert_bench_contract(result, method, model, batch, seeds=1):
    """The fields every ``at_jax.bench.run`` result has (scripts read them)."""
    for key in BENCH_CONTRACT:
        assert key in result
    assert result["images_per_s"] > 0 and result["compile_s"] > 0
    assert result["method"] == method and result["seeds"] == seeds
    assert result["batch"] == batch and result["teacher"] == model
