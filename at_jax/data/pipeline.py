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
import json
import math
import queue
import threading
from collections.abc import Iterator
from typing import Optional

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from at_jax.data import sources as sources_lib
from at_jax.data.batching import eval_batch_size
from at_jax.data.catalog import IMAGENET_MEAN, IMAGENET_STD, STREAMED_CLASSES
from at_jax.data.transforms import EvalRecord, TrainTransform

__all__ = ["StreamedData", "DeviceIterator"]


class DeviceIterator:
    """Global batches from a Grain iterator, put on the mesh by a background thread.

    Checkpointable with Grain's Orbax handler: :meth:`get_state` is the Grain state after the
    last batch *handed out* (not the ones prefetched), :meth:`set_state` rewinds to it."""

    _END = object()

    def __init__(self, grain_iterator, sharding: NamedSharding, prefetch: int = 2):
        self._it = grain_iterator
        self._sharding = sharding
        self._prefetch = max(1, int(prefetch))
        self._state = grain_iterator.get_state()
        self._thread: Optional[threading.Thread] = None
        self._queue: queue.Queue = queue.Queue(self._prefetch)
        self._stop = threading.Event()

    def _to_global(self, batch: dict) -> dict:
        mesh_size = self._sharding.mesh.size
        out = {}
        for key, local in batch.items():
            local = np.asarray(local)
            global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
            if global_shape[0] % mesh_size:
                raise ValueError(
                    f"a batch of {global_shape[0]} does not split over {mesh_size} devices"
                )
            out[key] = jax.make_array_from_process_local_data(self._sharding, local, global_shape)
        return out

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = next(self._it)
                except StopIteration:
                    self._queue.put((self._END, None))
                    return
                item = (self._to_global(batch), self._it.get_state())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as e:  # handed to the consumer
            self._queue.put((e, None))

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
        batch, state = self._queue.get()
        if batch is self._END:
            self._queue.put((self._END, None))
            raise StopIteration
        if isinstance(batch, Exception):
            raise batch
        self._state = state
        return batch

    # Grain's Orbax CheckpointHandler calls these three.
    def get_state(self) -> bytes:
        return json.dumps(self._state).encode()

    def set_state(self, state: bytes) -> None:
        self._halt()
        self._state = json.loads(state.decode() if isinstance(state, bytes) else state)
        self._it.set_state(self._state)

    def start_prefetch(self) -> None:
        pass  # the thread starts at the first batch

    def close(self) -> None:
        self._halt()
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


class StreamedData:
    """A streamed dataset of ``config.data`` for ``mesh``: batches, sizes and normalisation."""

    streamed = True

    def __init__(self, config, mesh: Mesh, splits: Optional[tuple] = None):
        """``splits``: ``(train, test, class_names)`` sources, instead of ``config.data``'s."""
        data = config.data
        if int(data.image_size) < 8:
            raise ValueError(f"config.data.image_size must be >= 8, got {data.image_size}")
        if int(data.num_workers) < 0:
            raise ValueError(f"config.data.num_workers must be >= 0, got {data.num_workers}")
        self.config = config
        self.mesh = mesh
        train, test, classes = splits or sources_lib.open_source(data.name, data.data_dir)
        if data.train_size:
            train = sources_lib.Subset(train, min(int(data.train_size), len(train)))
        if data.test_size:
            test = sources_lib.Subset(test, min(int(data.test_size), len(test)))
        self.train_source, self.test_source = train, test
        self.num_classes = len(classes) if classes else STREAMED_CLASSES[data.name]
        self.class_names = classes
        self.image_shape = (int(data.image_size), int(data.image_size), 3)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.n_train, self.n_test = len(train), len(test)
        self.description = getattr(train, "description", data.name)
        self.steps_per_epoch = self.n_train // int(config.batch_size)
        processes = jax.process_count()
        if int(config.batch_size) % processes:
            raise ValueError(
                f"config.batch_size={config.batch_size} is not divisible by the "
                f"{processes} processes"
            )
        self.sharding = NamedSharding(mesh, P("data"))

    def _options(self) -> grain.MultiprocessingOptions:
        # Grain's worker processes read absl flags; a program that never parsed them (a notebook,
        # pytest) would fail there: take the defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        return grain.MultiprocessingOptions(num_workers=int(self.config.data.num_workers))

    def _read_options(self) -> grain.ReadOptions:
        """Threads per worker (each builds whole batches) and how many batches they buffer.
        Grain's defaults (16 threads, 500 elements ahead) would hold 500 *batches* per worker."""
        threads = int(self.config.data.read_threads)
        if threads < 1:
            raise ValueError(f"config.data.read_threads must be >= 1, got {threads}")
        return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)

    def worker_iterable(self, ds: grain.MapDataset) -> grain.IterDataset:
        """``ds`` read by ``read_threads`` threads in each of ``num_workers`` processes."""
        ds = ds.to_iter_dataset(self._read_options())
        if int(self.config.data.num_workers):
            ds = ds.mp_prefetch(self._options())
        return ds

    def train_dataset(
        self, process_index: Optional[int] = None, process_count: Optional[int] = None
    ) -> grain.MapDataset:
        """This process's local training batches, for the whole run (``num_epochs``)."""
        config = self.config
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        per_epoch = self.steps_per_epoch * int(config.batch_size)
        ds = grain.MapDataset.source(self.train_source).seed(int(config.seed))
        ds = ds.shuffle()[:per_epoch].repeat(int(config.num_epochs))
        ds = ds.random_map(
            TrainTransform(int(config.data.image_size), bool(config.data.augment.get("flip", True)))
        )
        ds = ds[index::count]
        return ds.batch(int(config.batch_size) // count, drop_remainder=True)

    def train_iterator(self) -> DeviceIterator:
        """Global training batches ``{"image", "label"}`` from step 0 (a checkpoint restore sets
        the position)."""
        return DeviceIterator(
            iter(self.worker_iterable(self.train_dataset())),
            self.sharding,
            self.config.data.prefetch,
        )

    def eval_batch_size(self) -> int:
        size = eval_batch_size(self.config.eval_batch_size, self.n_test, self.mesh.size)
        step = math.lcm(self.mesh.size, jax.process_count())
        return max(step, size - size % step)

    def eval_batches(self) -> Iterator[dict]:
        """Global evaluation batches ``{"image", "label", "mask"}`` over the whole test set."""
        size = self.eval_batch_size()
        padded = math.ceil(self.n_test / size) * size
        ds = grain.MapDataset.range(padded).map(
            EvalRecord(self.test_source, self.config.data.image_size)
        )
        ds = ds[jax.process_index() :: jax.process_count()]
        ds = self.worker_iterable(ds.batch(size // jax.process_count()))
        iterator = DeviceIterator(iter(ds), self.sharding, self.config.data.prefetch)
        try:
            yield from iterator
        finally:
            iterator.close()
