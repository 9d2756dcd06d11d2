"""Input-pipeline benchmark: images/s of the streamed train pipeline, to host memory.

    python -m at_jax.data.bench --data_dir DIR --image_size 224 --batch 64 --steps 50 --workers K

``DIR`` is an image folder (``DIR/train/<class>/*``, as for ``config.data.name=imagefolder``; a
folder of class folders works too). Times what the train step waits for: decode + random-resized
crop + flip + batching in ``K`` Grain worker processes (0: in this process), after ``--warmup``
batches (each worker holds at most ``2·read_threads`` batches ahead). Prints one JSON line
(``images_per_s``, ``workers``, ``read_threads``, ``batch``, ``image_size``, ``n_images``),
comparable with a PyTorch ``DataLoader`` doing the same work on the same folder
(``benchmarks/RESULTS.md`` records both).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from at_jax.compilation_cache import default_cache_dir, use_compilation_cache
from at_jax.data import sources
from at_jax.data.config import default_data_config
from at_jax.data.pipeline import StreamedData
from at_jax.data.spec import Feed
from at_jax.sharding import data_mesh

__all__ = ["run", "main", "define_flags"]

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program: at_jax.bench has flags of the same
    names)."""
    flags.DEFINE_string("data_dir", None, "Image folder root (with train/) or a folder of classes.")
    flags.DEFINE_integer("image_size", 224, "Output crop size.")
    flags.DEFINE_integer("batch", 64, "Batch size.")
    flags.DEFINE_integer("steps", 50, "Timed batches.")
    flags.DEFINE_integer("workers", 2, "Grain worker processes.")
    flags.DEFINE_integer("warmup", 3, "Untimed batches first (worker start-up).")
    flags.DEFINE_integer("read_threads", 1, "Threads per worker (config.data.read_threads).")
    flags.DEFINE_string(
        "compilation_cache_dir",
        default_cache_dir(),
        "JAX's persistent compilation cache ('' = off).",
    )


def run(
    data_dir: str,
    image_size: int,
    batch: int,
    steps: int,
    workers: int,
    warmup: int = 3,
    read_threads: int = 1,
) -> dict:
    train_dir = os.path.join(data_dir, "train")
    # an image-folder root, or a bare folder of classes (what torch_input_reference.py takes)
    train, classes = sources.class_folder(train_dir if os.path.isdir(train_dir) else data_dir)
    splits = (train, train, classes)
    data_config = default_data_config()
    data_config.name, data_config.data_dir = "imagefolder", data_dir
    data_config.image_size, data_config.num_workers = image_size, workers
    data_config.read_threads = read_threads
    feed = Feed(batch, num_epochs=max(1, -(-(steps + warmup) * batch // len(splits[0]))))
    data = StreamedData(data_config, feed, data_mesh(), splits)
    it = iter(data.worker_iterable(data.train_dataset(0, 1)))
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    seen = 0
    for _ in range(steps):
        seen += len(next(it)["label"])
    elapsed = time.perf_counter() - t0
    it.close()
    return {
        "images_per_s": seen / elapsed,
        "workers": workers,
        "read_threads": read_threads,
        "batch": batch,
        "image_size": image_size,
        "n_images": len(data.train_source),
    }


def main(argv):
    del argv
    if not FLAGS.data_dir:
        raise app.UsageError("--data_dir is required")
    use_compilation_cache(FLAGS.compilation_cache_dir)
    print(
        json.dumps(
            run(
                FLAGS.data_dir,
                FLAGS.image_size,
                FLAGS.batch,
                FLAGS.steps,
                FLAGS.workers,
                FLAGS.warmup,
                FLAGS.read_threads,
            )
        )
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
