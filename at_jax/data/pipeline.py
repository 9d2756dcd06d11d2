"""The streamed input pipeline, on Grain: data that does not fit in memory, one host or many.

Training stream (``grain.MapDataset``, every step deterministic from ``config.seed``)::

    source -> shuffle (a new permutation each epoch) -> first steps·B records of each epoch
           -> repeat(num_epochs) -> random crop + flip (TrainTransform, seeded per record)
           -> this process's records [process_index::process_count] -> local batches of B/P
           -> worker processes (config.data.num_workers, each with config.data.read_threads
              threads building whole batches) -> global arrays on the mesh
              (jax.make_array_from_process_local_data), config.data.prefetch batches ahead

Each process decodes only its own records, and the global batch of step ``i`` holds the same
examples (with the same augmentation) whatever the number of processes: a 2-process run trains
like a 1-process run with the same global batch. The iterator's state (Grain's, for the batches
the step has consumed) goes into the run's Orbax checkpoint, so a resumed run continues at the
exact next batch.

Evaluation: every test record once (resize + centre crop), padded with masked examples to whole
global batches so that every process runs the same number of steps.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any, Optional

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from at_jax.data import sources as sources_lib
from at_jax.data.batching import eval_batch_size
from at_jax.data.catalog import IMAGENET_MEAN, IMAGENET_STD, STREAMED_CLASSES
from at_jax.data.randaugment import RandAugment
from at_jax.data.report import DataReport
from at_jax.data.spec import DataSpec, Feed, SpecFields
from at_jax.data.transforms import BadImageError, EvalRecord, TrainRecord, decode_image
from at_jax.data.workers import worker_init

__all__ = [
    "StreamedData",
    "DeviceIterator",
    "DataReport",
    "flush_shared_memory",
]  # DataReport: at_jax.data.report


MIN_SHM_BYTES = 1 << 16
# Fields of a streamed element that report to the host (read, then dropped): the index of a
# replaced (skipped) broken image, and whether a bounding box lay outside its image.
_REPORT = ("skipped_index", "box_outside")


def flush_shared_memory() -> None:
    """Let Grain finish unlinking the shared memory of batches that are gone. Grain unlinks in a
    thread pool that dies with the process; without this, a run's last batches end as
    "resource_tracker: ... leaked shared_memory objects" warnings at exit. (Grain has no public
    call for it: without the attribute this does nothing.)"""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return
    gc.collect()
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        pool.apply(lambda: None)  # one thread, first in first out: earlier unlinks are done


class DeviceIterator:
    """Global batches from a Grain iterator, put on the mesh by a background thread.

    Checkpointable with Grain's Orbax handler: :meth:`get_state` is the Grain state after the
    last batch *handed out* (not the ones prefetched), :meth:`set_state` rewinds to it. The
    report fields of the elements (:data:`_REPORT`) stay on the host: :attr:`report` adds up
    those of the batches handed out. ``keep`` names the fields that become global arrays
    (default: all the others)."""

    _END = object()

    def __init__(
        self,
        grain_iterator: Any,
        sharding: NamedSharding,
        prefetch: int = 2,
        keep: Optional[tuple[str, ...]] = None,
    ):
        self._it = grain_iterator
        self._sharding = sharding
        self._prefetch = max(1, int(prefetch))
        self._keep = keep
        self._state = grain_iterator.get_state()
        self._thread: Optional[threading.Thread] = None
        self._queue: queue.Queue = queue.Queue(self._prefetch)
        self._stop = threading.Event()
        self._restored = False
        self.report = DataReport()

    @property
    def checkpoint_state(self) -> DeviceIterator:
        """What a run's checkpoint saves of these batches: this iterator, for Grain's Orbax
        handler (:meth:`get_state`, :meth:`set_state`)."""
        return self

    def start_at(self, step: int) -> None:
        """Continue from global step ``step``: its position must have come from a checkpoint
        (:meth:`set_state`), as the streamed position is Grain's state, not a step count."""
        if step and not self._restored:
            raise ValueError(
                f"streamed batches cannot start at step {step} without the Grain state of a "
                "checkpoint at that step; resume the run from its checkpoint"
            )

    def _to_global(self, batch: dict) -> tuple[dict, dict]:
        mesh_size = self._sharding.mesh.size
        out, host = {}, {}
        for key, value in batch.items():
            local = np.array(value)  # out of Grain's shared memory, which is then freed
            if key in _REPORT:
                host[key] = local
                continue
            if self._keep is not None and key not in self._keep:
                continue
            global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
            if global_shape[0] % mesh_size:
                raise ValueError(
                    f"a batch of {global_shape[0]} does not split over {mesh_size} devices"
                )
            out[key] = jax.make_array_from_process_local_data(self._sharding, local, global_shape)
        return out, host

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = next(self._it)
                except StopIteration:
                    self._queue.put((self._END, None, None))
                    return
                item = (*self._to_global(batch), self._it.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as e:  # handed to the consumer
            self._queue.put((e, None, None))

    def _start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._fill, daemon=True)
            self._thread.start()

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)
            self._thread = None
        self._queue = queue.Queue(self._prefetch)

    def __iter__(self) -> DeviceIterator:
        return self

    def __next__(self) -> dict:
        self._start()
        batch, host, state = self._queue.get()
        if batch is self._END:
            self._queue.put((self._END, None, None))
            raise StopIteration
        if isinstance(batch, Exception):
            raise batch
        self._state = state
        if host:
            self.report.add(host)
        return batch

    # Grain's Orbax CheckpointHandler calls these three.
    def get_state(self) -> bytes:
        return json.dumps(self._state).encode()

    def set_state(self, state: bytes) -> None:
        self._halt()
        self._state = json.loads(state.decode() if isinstance(state, bytes) else state)
        self._it.set_state(self._state)
        self._restored = True

    def start_prefetch(self) -> None:
        pass  # the thread starts at the first batch

    def close(self) -> None:
        self._halt()
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        flush_shared_memory()


class StreamedData(SpecFields):
    """A streamed dataset of ``data_config`` (``config.data``) for ``mesh``, read as ``feed``
    says: batches, sizes and the dataset's :class:`~at_jax.data.spec.DataSpec` (ImageNet's
    mean/std, as torchvision's models)."""

    counts_skipped = True  # the step counts the broken images replaced in its batch

    def __init__(self, data_config: Any, feed: Feed, mesh: Mesh, splits: Optional[tuple] = None):
        """``splits``: ``(train, test, class_names)`` sources, instead of ``data_config``'s."""
        data = self.data = data_config
        self.feed, self.mesh = feed, mesh
        train, test, classes = splits or sources_lib.open_source(data.name, data.data_dir)
        if data.train_size:
            train = sources_lib.Subset(train, min(int(data.train_size), len(train)))
        if data.test_size:
            test = sources_lib.Subset(test, min(int(data.test_size), len(test)))
        self.train_source, self.test_source = train, test
        self.class_names = classes
        size = int(data.image_size)
        self.spec = DataSpec(
            len(classes) if classes else STREAMED_CLASSES[data.name],
            (size, size, 3),
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
        self.n_train, self.n_test = len(train), len(test)
        self.description = getattr(train, "description", data.name)
        self.steps_per_epoch = self.n_train // feed.batch_size
        processes = jax.process_count()
        if feed.batch_size % processes:
            raise ValueError(
                f"config.batch_size={feed.batch_size} is not divisible by the {processes} processes"
            )
        self.sharding = NamedSharding(mesh, P("data"))
        self.on_bad_image = str(data.get("on_bad_image", "error"))
        self.eval_report = DataReport()  # what the last evaluation met
        self.warnings = [w for src in (train, test) for w in getattr(src, "warnings", [])]

    def _options(self) -> grain.MultiprocessingOptions:
        # Grain's worker processes read absl flags; a program that never parsed them (a notebook,
        # pytest) would fail there: take the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        return grain.MultiprocessingOptions(num_workers=int(self.data.num_workers))

    def _read_options(self) -> grain.ReadOptions:
        """Threads per worker (each builds whole batches) and how many batches they buffer.
        Grain's defaults (16 threads, 500 elements ahead) would hold 500 *batches* per worker."""
        threads = int(self.data.read_threads)
        return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)

    def worker_iterable(self, ds: grain.MapDataset) -> grain.IterDataset:
        """``ds`` read by ``read_threads`` threads in each of ``num_workers`` processes (which
        ignore SIGINT/SIGTERM and exit with this process: :mod:`at_jax.data.workers`)."""
        ds = ds.to_iter_dataset(self._read_options())
        # Shared memory for the images only: labels, masks and counts (bytes each) are pickled
        # with the batch instead of costing a shared-memory segment each.
        ds = grain.experimental.WithOptionsIterDataset(
            ds, grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES)
        )
        if int(self.data.num_workers):
            ds = ds.mp_prefetch(
                self._options(), worker_init_fn=functools.partial(worker_init, os.getpid())
            )
        return ds

    def train_dataset(
        self, process_index: Optional[int] = None, process_count: Optional[int] = None
    ) -> grain.MapDataset:
        """This process's local training batches, for the whole run (``num_epochs``)."""
        feed = self.feed
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        per_epoch = self.steps_per_epoch * feed.batch_size
        ds = grain.MapDataset.range(len(self.train_source)).seed(feed.seed)
        ds = ds.shuffle()[:per_epoch].repeat(feed.num_epochs)
        ds = ds.random_map(
            TrainRecord(
                self.train_source,
                int(self.data.image_size),
                bool(self.data.augment.get("flip", True)),
                self.on_bad_image,
                _randaugment(self.data.augment.get("randaugment", ""), self.spec.mean),
            )
        )
        ds = ds[index::count]
        return ds.batch(feed.batch_size // count, drop_remainder=True)

    def train_batches(self, start_step: int = 0) -> DeviceIterator:
        """Global training batches ``{"image", "label", "skipped_count", "example_index"}``
        (``example_index``: each example's index in the training set) from step 0;
        ``.report`` says what was skipped. The position is Grain's iterator state, which the
        run's checkpoints hold (``checkpoint_state``): a resumed run restores it into these
        batches, then calls ``start_at`` (a ``start_step`` > 0 without that state is refused)."""
        iterator = DeviceIterator(
            iter(self.worker_iterable(self.train_dataset())),
            self.sharding,
            self.data.prefetch,
            keep=("image", "label", "skipped_count", "example_index"),
        )
        iterator.start_at(start_step)
        return iterator

    def train_iterator(self) -> DeviceIterator:
        """The training batches from step 0 (:meth:`train_batches`)."""
        return self.train_batches(0)

    def eval_batch_size(self) -> int:
        size = eval_batch_size(self.feed.eval_batch_size, self.n_test, self.mesh.size)
        step = math.lcm(self.mesh.size, jax.process_count())
        return max(step, size - size % step)

    def eval_batches(self) -> Iterator[dict]:
        """Global evaluation batches ``{"image", "label", "mask"}`` over the whole test set (a
        skipped broken image is masked out: :attr:`eval_report` names it)."""
        size = self.eval_batch_size()
        padded = math.ceil(self.n_test / size) * size
        ds = grain.MapDataset.range(padded).map(
            EvalRecord(self.test_source, self.data.image_size, self.on_bad_image)
        )
        ds = ds[jax.process_index() :: jax.process_count()]
        ds = self.worker_iterable(ds.batch(size // jax.process_count()))
        iterator = DeviceIterator(
            iter(ds), self.sharding, self.data.prefetch, keep=("image", "label", "mask")
        )
        try:
            yield from iterator
        finally:
            iterator.close()
            self.eval_report = iterator.report

    def train_labels(self) -> np.ndarray:
        """The training set's labels in record order (:func:`source_labels`)."""
        return source_labels(self.train_source)

    def _source(self, split: str) -> Any:
        return self.train_source if split == "train" else self.test_source

    def image_names(self, indices: list[int], split: str = "train") -> list[str]:
        """The files of ``split``'s records ``indices``."""
        source = self._source(split)
        return [source[i]["image"] for i in indices]

    def describe_skipped(self, indices: list[int], split: str = "train", limit: int = 10) -> str:
        """The first ``limit`` skipped files of ``split`` ("train" or "test") with the
        decoder's reason, and how many more."""
        names = self.image_names(sorted(set(indices))[:limit], split)
        shown = [f"{name} ({_skip_reason(name)})" for name in names]
        more = len(set(indices)) - len(shown)
        return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def source_labels(source: Any) -> np.ndarray:
    """A source's labels in record order: its ``labels`` where it has them, else read from every
    record (a term that keeps a memory of the training set, CRD, needs them)."""
    labels = getattr(source, "labels", None)
    if labels is None:
        labels = [int(source[i]["label"]) for i in range(len(source))]
    return np.asarray(labels, np.int32)


def _randaugment(policy: str, mean: tuple) -> Optional[RandAugment]:
    """RandAugment of ``policy`` (``config.data.augment.randaugment``, a timm policy string; ""
    = off), filling with the data's ``mean`` colour."""
    fill = tuple(min(255, round(255 * m)) for m in mean)
    return RandAugment(policy, fill) if policy else None


def _skip_reason(image: Any) -> str:
    """Why the decoder refuses ``image`` (a path or bytes)."""
    try:
        decode_image(image)
    except BadImageError as e:
        return e.reason
    return "unreadable"
