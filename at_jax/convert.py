"""torchvision ResNet, MAE/timm ViT or RepDistiller CIFAR weights → an at_jax run directory.

    python -m at_jax.convert --torchvision resnet34-b627a593.pth --model resnet-34 \
        --workdir runs/torchvision/resnet-34
    python -m at_jax.convert --repdistiller wrn_40_2_vanilla/ckpt_epoch_240.pth \
        --model wrn_40_2 --dataset cifar100 --image_size 32 \
        --workdir runs/cifar100/repdistiller/wrn_40_2
    python -m at_jax.convert --timm mae_pretrain_vit_large.pth --model vit-large/16 \
        --workdir runs/mae/vit-large

ViTs (MAE's and timm's layout, :mod:`at_jax.models.vit_convert`; the ``model`` entry of MAE's
files): ``--image_size`` other than the checkpoint's resizes the position embedding bicubically as
MAE's ``interpolate_pos_embed``; a checkpoint without a head (MAE pre-training) gets a zero
classifier for the dataset's classes (``--num_classes`` where the dataset does not fix them): it
is an attention teacher, whose test error means nothing. The heads' count is not in the weights:
``--model`` gives it (vit-large/16: 16 heads).

The run directory (``config.json`` + an Orbax checkpoint, like a trained run's) serves as
``config.teacher.workdir`` (a teacher, evaluated at the start of every student run) and as
``config.init_from`` (a starting point for fine-tuning or for a student).

Input: a torchvision ``state_dict`` saved with ``torch.save`` (``.pth``/``.pt``; reading it needs
PyTorch), or the same arrays in a NumPy ``.npz`` (no PyTorch needed)::

    python -c "import torch, numpy; sd = torch.load('resnet34.pth', map_location='cpu');
               numpy.savez('resnet34.npz', **{k: v.numpy() for k, v in sd.items()})"

A checkpoint that wraps the state_dict (``{"state_dict": ...}``, ``{"model": ...}``) or whose keys
carry DataParallel's ``module.`` prefix is accepted. The images it expects are normalised with the
ImageNet mean/std, as at_jax's streamed pipeline does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from at_jax import recipes
from at_jax.checkpoints import Checkpoints
from at_jax.data.catalog import dataset_spec
from at_jax.files import write_json_atomic
from at_jax.models import from_torchvision, get_model
from at_jax.models.cifar import REPDISTILLER_MODELS, reference_layout
from at_jax.models.vit import VisionTransformer
from at_jax.models.vit_convert import from_timm
from at_jax.naming import natural_sorted
from at_jax.rundir import CHECKPOINT_DIR, CONFIG_FILE
from at_jax.teacher import write_data_info

__all__ = [
    "convert",
    "main",
    "read_state_dict",
    "to_variables",
    "write_run",
    "ConversionError",
    "MODELS",
]

MODELS = ("resnet-18", "resnet-34", "resnet-tiny")  # --torchvision; --timm takes vit-SIZE/P


class ConversionError(ValueError):
    """The file cannot be read or does not hold the named model."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(
            f"{path} does not hold a state_dict (a mapping of parameter names "
            f"to arrays); it holds {type(obj).__name__}"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torchvision state_dict from ``.pth``/``.pt`` (needs torch) or ``.npz``, as NumPy arrays."""
    if not os.path.isfile(path):
        raise ConversionError(f"no such file: {path}")
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                return dict(_unwrap({k: np.asarray(npz[k]) for k in npz.files}, path))
        except (OSError, ValueError) as e:
            raise ConversionError(f"cannot read {path} as .npz: {e}") from None
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"reading {path} (a PyTorch file) needs PyTorch, which is not installed: "
            "pip install torch, or save the state_dict as .npz where torch is installed "
            "(see python -m at_jax.convert --help) and convert that"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, ...
        raise ConversionError(
            f"cannot read {path} with torch.load: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return {
        k: v.detach().cpu().numpy() for k, v in _unwrap(obj, path).items() if hasattr(v, "detach")
    }


def _infer_model(state_dict: Mapping[str, Any]) -> str:
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("layer3.")}
    return {2: "resnet-18", 6: "resnet-34"}.get(
        len(blocks), f"a ResNet with {len(blocks)} blocks in layer3"
    )


def _check_shapes(model, variables: dict, image_shape: tuple, model_name: str, looks: str) -> None:
    """Raise unless ``variables`` have exactly the arrays ``model`` makes for ``image_shape``."""
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    want = {p: v.shape for p, v in traverse_util.flatten_dict(expected).items()}
    got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(variables).items()}
    if want != got:
        missing = natural_sorted("/".join(p) for p in set(want) - set(got))
        extra = natural_sorted("/".join(p) for p in set(got) - set(want))
        shapes = natural_sorted(
            f"{'/'.join(p)} {got[p]} (expected {want[p]})"
            for p in set(want) & set(got)
            if want[p] != got[p]
        )
        differ = "; ".join(
            f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", extra), ("shapes", shapes))
            if names
        )
        raise ConversionError(
            f"the weights are not a {model_name} (they look like {looks}): {differ}. "
            "Pass the matching --model."
        )


def to_vit_variables(
    state_dict: Mapping[str, Any],
    model_name: str,
    image_size: int = 224,
    num_classes: Optional[int] = None,
) -> tuple[dict, int, dict]:
    """``(variables, num_classes, model_overrides)`` of MAE/timm ViT weights for ``model_name``
    (``vit-SIZE/P``) on ``image_size`` images; ``num_classes``: the zero head of a head-less
    checkpoint."""
    try:
        model = get_model(model_name)
    except ValueError as e:
        raise ConversionError(f"--model: {e}") from None
    if not isinstance(model, VisionTransformer):
        raise ConversionError(f"--timm converts ViTs: --model must be vit-SIZE/P, got {model_name}")
    try:
        grid = model.check((image_size, image_size))
        variables, info = from_timm(state_dict, grid)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    looks = f"a ViT of width {info['width']}, depth {info['depth']}, patch {info['patch_size']}"
    if (info["width"], info["depth"], info["patch_size"]) != (
        model.embed_dim,
        model.depth,
        model.patch_size,
    ):
        raise ConversionError(f"the weights are not a {model_name}: they are {looks}")
    classes = info["num_classes"]
    if classes is None:  # MAE pre-training: an attention teacher, a zero classifier
        if num_classes is None:
            raise ConversionError(
                "the checkpoint has no head (MAE pre-training): pass --num_classes, the class "
                "count of the data it will teach on"
            )
        classes = num_classes
        variables["params"]["head"] = {
            "kernel": np.zeros((info["width"], classes), np.float32),
            "bias": np.zeros((classes,), np.float32),
        }
    overrides = {"global_pool": True} if info["global_pool"] else {}
    model = get_model(model_name, num_classes=classes, **overrides)
    _check_shapes(model, variables, (image_size, image_size, info["channels"]), model_name, looks)
    return variables, classes, overrides


def to_variables(
    state_dict: Mapping[str, Any],
    model_name: str,
    image_size: int = 224,
    fmt: str = "torchvision",
) -> tuple[dict, int]:
    """``(variables, num_classes)``: converted, and checked against ``model_name``'s layout
    (``fmt`` "torchvision" or "repdistiller": :data:`REPDISTILLER_MODELS`)."""
    known = REPDISTILLER_MODELS if fmt == "repdistiller" else MODELS
    if model_name not in known:
        raise ConversionError(f"--model must be one of {', '.join(known)}, got {model_name!r}")
    head = "fc.weight"
    if fmt == "repdistiller":
        state_dict, head = reference_layout(model_name, state_dict)
    if head not in state_dict:
        raise ConversionError(
            f"the state_dict has no {head}: it is not a {fmt} {model_name} "
            f"(keys: {natural_sorted(state_dict)[:5]} ...)"
        )
    num_classes = int(np.shape(state_dict[head])[0])
    try:
        variables = from_torchvision(state_dict)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"not a {fmt} state_dict: {e}") from None
    model = get_model(model_name, num_classes=num_classes)
    looks = _infer_model(state_dict) if fmt == "torchvision" else "another model"
    _check_shapes(model, variables, (image_size,) * 2 + (3,), model_name, looks)
    return variables, num_classes


def write_run(
    workdir: str,
    variables: dict,
    model_name: str,
    num_classes: int,
    dataset: str,
    image_size: int,
    source: dict,
    model_overrides: Optional[dict] = None,
) -> None:
    """Write ``workdir`` as a run directory: config.json and a step-0 checkpoint (one seed)."""
    if os.path.exists(os.path.join(workdir, CONFIG_FILE)) or os.path.isdir(
        os.path.join(workdir, CHECKPOINT_DIR)
    ):
        raise ConversionError(
            f"{workdir!r} already holds a run; choose a new --workdir or delete it first"
        )
    config = recipes.base_config()
    config.model = model_name
    config.model_overrides = dict(model_overrides or {})
    config.data.name = dataset
    config.data.image_size = image_size
    config.num_epochs = 0
    spec = dataset_spec(config)
    known = spec.num_classes
    if known not in (None, num_classes):
        raise ConversionError(
            f"--dataset {dataset} has {known} classes but the weights have "
            f"{num_classes}; pass --dataset imagefolder (or the one they "
            "were trained on)"
        )
    os.makedirs(workdir, exist_ok=True)
    state = {
        "step": jnp.zeros((1,), jnp.int32),
        "params": {"student": jax.tree.map(lambda a: jnp.asarray(a)[None], variables["params"])},
        "batch_stats": jax.tree.map(
            lambda a: jnp.asarray(a)[None], variables.get("batch_stats", {})
        ),
    }
    checkpoints = Checkpoints(workdir, keep=1)
    try:
        checkpoints.save(0, {"train_state": state}, {"converted_from": source})
        checkpoints.wait()
    finally:
        checkpoints.close()
    saved = json.loads(config.to_json())
    saved["converted_from"] = source
    write_json_atomic(os.path.join(workdir, CONFIG_FILE), saved)
    write_data_info(workdir, spec.with_classes(num_classes))


def _dataset_classes(dataset: str, image_size: int) -> Optional[int]:
    config = recipes.base_config()
    config.data.name, config.data.image_size = dataset, image_size
    try:
        return dataset_spec(config).num_classes
    except ValueError as e:
        raise ConversionError(f"--dataset: {e}") from None


def convert(
    path: str,
    model_name: str,
    workdir: str,
    dataset: str = "imagenet2012",
    image_size: int = 224,
    fmt: str = "torchvision",
    num_classes: Optional[int] = None,
) -> dict:
    """Convert ``path`` (a ``.pth`` or ``.npz`` state_dict; ``fmt`` "torchvision" for ResNets,
    "repdistiller" for its CIFAR models, "timm" for MAE/timm ViTs) into the run ``workdir``;
    returns a summary. ``num_classes``: a head-less ViT's classifier (default: the dataset's)."""
    if fmt not in ("torchvision", "timm", "repdistiller"):
        raise ConversionError(f"fmt must be 'torchvision', 'timm' or 'repdistiller', got {fmt!r}")
    state_dict = read_state_dict(path)
    source = {"path": os.path.abspath(path), "sha256": _sha256(path), "format": fmt}
    overrides: dict = {}
    if fmt == "timm":
        classes = num_classes or _dataset_classes(dataset, image_size)
        variables, num_classes, overrides = to_vit_variables(
            state_dict, model_name, image_size, classes
        )
        source["head"] = "converted" if "head.weight" in state_dict else "none (zeros)"
    else:
        variables, num_classes = to_variables(state_dict, model_name, image_size, fmt)
    write_run(workdir, variables, model_name, num_classes, dataset, image_size, source, overrides)
    n_params = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
    summary = {"workdir": workdir, "model": model_name, "num_classes": num_classes}
    return {**summary, "parameters": n_params, **source}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m at_jax.convert",
        description=__doc__.split("\n\n")[0],
        epilog='Save a .pth as .npz where torch is installed:  python -c "import torch, numpy; '
        "sd = torch.load('IN.pth', map_location='cpu'); numpy.savez('OUT.npz', "
        '**{k: v.numpy() for k, v in sd.items()})"',
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--torchvision",
        metavar="PATH",
        help="torchvision ResNet state_dict: .pth/.pt (needs torch) or .npz",
    )
    source.add_argument(
        "--timm",
        "--mae",
        dest="timm",
        metavar="PATH",
        help="MAE/timm ViT state_dict (MAE's files: their 'model' entry): .pth/.pt or .npz",
    )
    source.add_argument("--repdistiller", metavar="PATH", help="a RepDistiller CIFAR checkpoint")
    parser.add_argument(
        "--model",
        required=True,
        help=f"{', '.join(MODELS)} (--torchvision) or vit-SIZE/P, e.g. vit-large/16 (--timm)",
    )
    parser.add_argument("--workdir", required=True, help="the run directory to create")
    parser.add_argument(
        "--dataset",
        default="imagenet2012",
        help="what the weights were trained on, recorded in config.json "
        "(default imagenet2012: 1000 classes; 'imagefolder' for others)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=224,
        help="the images' side (a ViT's position embedding is resized to its patch grid)",
    )
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="a head-less ViT's (zero) classifier: the class count of the data it will teach on "
        "(default: the dataset's)",
    )
    args = parser.parse_args(argv)
    fmt = "timm" if args.timm else "repdistiller" if args.repdistiller else "torchvision"
    path = args.timm or args.repdistiller or args.torchvision
    try:
        summary = convert(
            path,
            args.model,
            args.workdir,
            args.dataset,
            args.image_size,
            fmt,
            args.num_classes,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"{summary['model']} ({summary['parameters']:,} parameters, {summary['num_classes']} "
        f"classes) from {path} -> {args.workdir}\n"
        f"use it as --config.teacher.workdir={args.workdir} or "
        f"--config.init_from={args.workdir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
