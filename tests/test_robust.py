"""What long real runs meet: broken and odd image files (both on_bad_image policies, verify),
16-bit images, data errors, SIGINT and a second signal, config values checked up front."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from at_jax import train
from at_jax.data import sources, verify
from at_jax.data.transforms import BadImageError, EvalTransform, decode_image
from at_jax.files import read_jsonl
from conftest import make_cub, make_image_folder, streamed_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory):
    """An image folder with a truncated JPEG, an empty file and random bytes in train/, one
    class folder without images, and the paths of the broken files."""
    root = make_image_folder(tmp_path_factory.mktemp("broken"), n_train=6, n_val=2)
    good = (root / "train" / "cat" / "cat_1.JPEG").read_bytes()
    broken = {
        root / "train" / "cat" / "truncated.JPEG": good[: len(good) // 2],
        root / "train" / "dog" / "empty.jpg": b"",
        root / "train" / "emu" / "noise.jpg": np.random.default_rng(0).bytes(3000),
    }
    for path, payload in broken.items():
        path.write_bytes(payload)
    (root / "train" / "fox").mkdir()
    (root / "val" / "fox").mkdir()
    return root, sorted(str(p) for p in broken)


def test_a_broken_file_names_itself_and_the_reason():
    with pytest.raises(BadImageError, match=r"cannot decode /no/such\.jpg: FileNotFoundError"):
        decode_image("/no/such.jpg")
    with pytest.raises(BadImageError, match="in-memory bytes image: UnidentifiedImageError"):
        decode_image(b"not an image")


def test_verify_lists_every_broken_file_and_exits_1(broken_folder, tmp_path, capsys):
    root, broken = broken_folder
    code = verify.main(["--data_dir", str(root), "--workers", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "checked 27 images" in out and "3 cannot be decoded" in out
    for path in broken:
        assert path in out
    assert "truncated" in out.lower() and "on_bad_image=skip" in out
    assert "1 class folder(s) in" in out and "fox" in out  # the empty class folder
    clean = make_image_folder(tmp_path / "clean", n_train=2, n_val=1)
    assert verify.main(["--data_dir", str(clean), "--workers", "0"]) == 0
    assert "all can be decoded" in capsys.readouterr().out


@pytest.mark.heavy
def test_on_bad_image_error_stops_with_one_line_and_resumes_once_fixed(broken_folder, tmp_path):
    root, broken = broken_folder
    data = tmp_path / "data"
    shutil.copytree(root, data)
    config = streamed_config(
        data, num_epochs=1, checkpoint_every_steps=1, **{"data.num_workers": 2}
    )
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    message = str(e.value)
    assert "cannot decode" in message and str(data) in message
    assert "on_bad_image=skip" in message and "at_jax.data.verify" in message
    assert "with a checkpoint and resumes from there" in message
    # once the files are fixed, the same run continues from its checkpoint and finishes
    good = (data / "train" / "cat" / "cat_1.JPEG").read_bytes()
    for path in broken:
        (data / os.path.relpath(path, root)).write_bytes(good)
    results = train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    assert results["epochs"] == 1


@pytest.mark.heavy
def test_on_bad_image_skip_is_deterministic_counted_and_resumes_exactly(
    broken_folder, tmp_path, capsys
):
    root, broken = broken_folder
    config = streamed_config(
        root,
        num_epochs=2,
        checkpoint_every_steps=2,
        log_every_steps=1,
        **{"data.on_bad_image": "skip"},
    )
    first = train.train_and_evaluate(config, str(tmp_path / "a"), progress=False)
    rows = [r for r in read_jsonl(str(tmp_path / "a" / "metrics.jsonl")) if "epoch" in r]
    counts = [r["train/skipped_images"] for r in rows]
    # 24 of the 27 images per epoch; a replacement may be broken too (and is counted)
    assert all(c >= 1 for c in counts) and first["skipped_images"] == sum(counts)
    assert first["skipped_files"] and set(first["skipped_files"]) <= set(broken)
    out = capsys.readouterr().out
    assert "epoch 1: replaced" in out and "unreadable training image(s)" in out
    assert "image file is truncated" in out or "cannot identify image file" in out

    # SIGINT in the middle of the run (an in-process Ctrl-C): stopped with a checkpoint
    config.data.num_workers = 2
    rows_file = tmp_path / "b" / "metrics.jsonl"

    def interrupt():
        while len(read_jsonl(str(rows_file))) < 3:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(train.Stopped) as stopped:
        train.train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    assert stopped.value.exit_code == 130 and "stopped by SIGINT at step" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    again = train.train_and_evaluate(config, str(tmp_path / "b"), progress=False)
    # the same replacements and batches: identical metrics (workers or not, interrupted or not)
    a_rows = read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
    b_rows = read_jsonl(str(rows_file))
    assert [r["step"] for r in a_rows] == [r["step"] for r in b_rows]
    for x, y in zip(a_rows, b_rows, strict=True):
        for key in ("train/loss", "train/skipped_images", "test/error"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (x["step"], key)
    assert again["skipped_images"] == first["skipped_images"]


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 100], [257 * 200, 65535]], np.uint16)
    images = {
        "I;16": Image.fromarray(levels),
        "I;16B": Image.frombytes("I;16B", (2, 2), levels.astype(">u2").tobytes()),
        "I": Image.fromarray(levels.astype(np.int32)),
    }
    for mode, img in images.items():
        buffer = io.BytesIO()
        img.save(buffer, format="TIFF")
        assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode
        rgb = decode_image(buffer.getvalue())
        np.testing.assert_array_equal(rgb[..., 0], [[0, 100], [200, 255]])
        assert (rgb[..., 0] == rgb[..., 2]).all()
    Image.fromarray(np.full((40, 60), 257 * 77, np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    view = EvalTransform(16)({"image": str(tmp_path / "grey16.png"), "label": 0})["image"]
    assert view.shape == (16, 16, 3) and (view == 77).all()


def test_data_errors_and_warnings(tmp_path, capsys):
    # TFDS: nothing prepared where it looks -> the path, the format it needs, the command
    with pytest.raises(FileNotFoundError) as e:
        sources.open_source("imagenet2012", str(tmp_path / "tfds"))
    line = str(e.value)
    assert "\n" not in line and str(tmp_path / "tfds") in line
    assert "array_record" in line and "tfds build imagenet2012" in line
    # CUB boxes wholly outside their image: reported (and the whole image used)
    base = make_cub(tmp_path / "cub", n_classes=2, per_class=2)
    lines = (base / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = lines[0].split()[0] + " 5000.0 5000.0 10.0 10.0"
    (base / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    found = verify.verify(str(base), "cub", workers=0, progress=False)
    assert len(found["boxes_outside"]) == 1 and not found["broken"]
    config = streamed_config(base, name="cub", num_epochs=1)
    config.batch_size = config.eval_batch_size = 2
    results = train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    assert results["epochs"] == 1
    assert "bounding box(es) lay outside their image" in capsys.readouterr().out


def test_every_config_value_is_checked_before_anything_is_built(idx_dir, tmp_path):
    from conftest import tiny_config

    config = tiny_config(
        idx_dir,
        batch_size=0,
        num_epochs=-1,
        **{"optimizer.momentum": 1.5, "data.on_bad_image": "maybe"},
    )
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
    message = str(e.value)
    for expected in (
        "config.batch_size must be an integer >= 1, got 0",
        "config.num_epochs must be an integer >= 1, got -1",
        "config.optimizer.momentum must be a number in [0, 1), got 1.5",
        "config.data.on_bad_image must be one of ('error', 'skip'), got 'maybe'",
    ):
        assert expected in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("phase", ["open_data", "make_eval_fn"])
def test_a_signal_before_the_first_step_says_nothing_was_saved(
    idx_dir, tmp_path, monkeypatch, phase
):
    """SIGTERM while the data loads (set-up), or after set-up but before the loop's first step:
    no checkpoint is claimed or written (a rerun starts afresh, as any new run)."""
    from conftest import tiny_config

    module = train if phase == "open_data" else train.evaluate
    real = getattr(module, phase)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, phase, signalled)
    config = tiny_config(idx_dir)
    workdir = tmp_path / "run"
    with pytest.raises(train.Stopped) as stopped:
        train.train_and_evaluate(config, str(workdir), progress=False)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert str(stopped.value) == (
        "stopped by SIGTERM before training started; nothing new to save; "
        "run the same command to continue"
    )
    checkpoints = workdir / "checkpoints"
    assert not checkpoints.exists() or not os.listdir(checkpoints)


def test_a_signal_after_the_last_step_keeps_the_results_and_stops_the_caller(
    idx_dir, tmp_path, monkeypatch, capsys
):
    """SIGINT during the final evaluation: the run finishes and saves its results, and the
    caller hears of it (Stopped), so that a driver of several runs does not start the next."""
    from at_jax import loop
    from conftest import tiny_config

    real = loop.run_results

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "run_results", signalled)
    workdir = tmp_path / "run"
    # as the CLI, the demo and the table runner call it: one line, the signal's exit code
    with pytest.raises(SystemExit) as exit_, train.exit_when_stopped(" (the demo resumes there)"):
        train.train_and_evaluate(tiny_config(idx_dir), str(workdir), progress=False)
    assert exit_.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"stopped by SIGINT as the run finished; its results are saved in {workdir}/results.json"
        " (the demo resumes there)"
    )
    monkeypatch.setattr(loop, "run_results", real)
    saved = train.train_and_evaluate(tiny_config(idx_dir), str(workdir), progress=False)
    assert saved == json.loads((workdir / "results.json").read_text())  # reused, not retrained


def test_a_second_signal_exits_at_once():
    code = (
        "import os, signal, time\n"
        "from at_jax.preemption import StopSignals\n"
        "with StopSignals() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert stop.requested(0) == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
    )
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "SIGTERM received: finishing the step in flight" in proc.stderr
    assert "SIGTERM again: exiting now, without saving" in proc.stderr
    assert time.time() - start < 20
