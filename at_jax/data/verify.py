"""Check every image of a dataset before a long run:

    python -m at_jax.data.verify --data_dir DIR [--name imagefolder|cub|scenes] [--workers K]

decodes every file of both splits (as the training pipeline decodes them, in ``K`` processes),
with a progress bar, then lists the files that cannot be decoded with the decoder's reason, and
the layout warnings (empty class folders, bounding boxes outside their image). Exits 1 when a
file is broken, 0 otherwise. :func:`verify` does the same from Python and returns the findings.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from typing import Any, Optional

from tqdm import tqdm

from at_jax.data.sources import LAYOUTS, open_source
from at_jax.data.transforms import BadImageError, decode_image
from at_jax.data.workers import pool_worker_init

__all__ = ["verify", "check_record", "main"]


def check_record(record: dict) -> tuple[str, Optional[str], bool]:
    """``(path, reason or None, bounding box outside the image)`` of one record."""
    try:
        image = decode_image(record["image"])
    except BadImageError as e:
        return e.path, e.reason, False
    outside = False
    if record.get("bbox") is not None:
        x0, y0, x1, y1 = record["bbox"]
        height, width = image.shape[:2]
        outside = min(x1, width) - max(x0, 0.0) < 1 or min(y1, height) - max(y0, 0.0) < 1
    return str(record["image"]), None, outside


def verify(
    data_dir: str, name: str = "imagefolder", workers: Optional[int] = None, progress: bool = True
) -> dict[str, Any]:
    """Decode every image of ``data_dir`` (layout ``name``); returns ``{"checked", "broken":
    [(path, reason)], "boxes_outside": [path], "warnings": [...]}``. ``workers`` processes
    (default: one per core; 0: this process)."""
    train, test, _ = open_source(name, data_dir)
    records = [r for source in (train, test) for r in source.records]
    warnings = [w for source in (train, test) for w in getattr(source, "warnings", [])]
    if workers is None:
        workers = os.cpu_count() or 1
    bar = tqdm(
        total=len(records), desc="decoding", unit="image", disable=not progress, dynamic_ncols=True
    )
    broken, outside = [], []
    pool = None
    if workers > 0:
        pool = multiprocessing.get_context("spawn").Pool(
            workers, initializer=pool_worker_init, initargs=(os.getpid(),)
        )
        results: Any = pool.imap(check_record, records, chunksize=16)
    else:
        results = map(check_record, records)
    try:
        for path, reason, box_outside in results:
            if reason is not None:
                broken.append((path, reason))
            if box_outside:
                outside.append(path)
            bar.update(1)
        if pool is not None:
            pool.close()  # every record is checked: let the workers finish
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # (after close: a no-op; on Ctrl-C or an error: stop them)
            pool.join()
    return {
        "checked": len(records),
        "broken": broken,
        "boxes_outside": outside,
        "warnings": warnings,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m at_jax.data.verify", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data_dir", required=True, help="the dataset's root folder")
    parser.add_argument(
        "--name",
        default="imagefolder",
        choices=sorted(LAYOUTS),
        help="its layout (as config.data.name)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="decoding processes (default: one per core; 0: this process)",
    )
    args = parser.parse_args(argv)
    start = time.time()
    try:
        found = verify(args.data_dir, args.name, args.workers)
    except FileNotFoundError as e:  # the layout errors of at_jax.data.sources
        print(f"error: {e}", file=sys.stderr)
        return 2
    for warning in found["warnings"]:
        print(f"warning: {warning}")
    if found["boxes_outside"]:
        print(
            f"warning: {len(found['boxes_outside'])} bounding box(es) lie outside their image "
            f"(training uses the whole image for them): {', '.join(found['boxes_outside'][:10])}"
            + (" ..." if len(found["boxes_outside"]) > 10 else "")
        )
    broken = found["broken"]
    print(
        f"checked {found['checked']:,} images in {time.time() - start:.1f} s: "
        + (f"{len(broken)} cannot be decoded" if broken else "all can be decoded")
    )
    for path, reason in broken:
        print(f"  {path}: {reason}")
    if broken:
        print(
            "fix or remove them, or train with --config.data.on_bad_image=skip (each is then "
            "replaced by another image, and counted)"
        )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
