"""ImageNet (ILSVRC-2012), streamed: the paper's Table 5.

    configs/imagenet.py:METHOD   METHOD: student (default) | at | kd | teacher

    python -m at_jax.main --config configs/imagenet.py:student --workdir runs/imagenet/resnet-18 \
        --config.data.data_dir=/data/imagenet
    python -m at_jax.convert --torchvision resnet34-b627a593.pth --model resnet-34 \
        --workdir runs/torchvision/resnet-34
    python -m at_jax.main --config configs/imagenet.py:at --workdir runs/imagenet/resnet-18-at \
        --config.data.data_dir=/data/imagenet

Methods: ``student`` — ResNet-18 from scratch. ``at`` — the same with attention transfer from a
ResNet-34 teacher (torchvision's ImageNet weights, converted into ``runs/torchvision/resnet-34``;
``--config.teacher.workdir`` for another): F_sum², β = 1e3, on the last two groups as the paper
(``loss.at.pairs="layer3,layer4"``; the public code used all four:
``--config.loss.at.pairs=layer1,layer2,layer3,layer4``), switched on after 60 of the 100 epochs
as Table 5's note (``loss.at.start_epoch=61``: epochs count from 1, so AT starts with the second
lr drop). ``kd`` — knowledge distillation from that teacher (T = 4, α = 0.9, today's form; the
paper reports that KD did not help on ImageNet). ``teacher`` — a ResNet-34 from scratch, if you
would rather train the teacher than convert one.

Data: ``DATA_DIR/train/<wnid>/*.JPEG`` and ``DATA_DIR/val/<wnid>/*.JPEG`` (the usual image-folder
layout; classes sorted by name, torchvision's order), or ``--config.data.name=imagenet2012`` for
a TFDS-prepared copy (``data_dir`` is then the TFDS data_dir). Decoding and augmentation
(random-resized crop 224 + flip; eval: resize 256 + centre crop 224) run in
``config.data.num_workers`` Grain processes per host. The teacher's top-1/top-5 error on the val
set is reported when a student starts. Devices: every local accelerator (data parallel over all
of them); several hosts: add ``--distributed`` (see README). ``--config.dtype=bfloat16`` computes
in bfloat16 (parameters, optimizer and BN statistics stay float32), for GPUs and TPUs. A small run
on any image folder is one command: ``--config.data.image_size=64 --config.model=resnet-tiny
--config.batch_size=32 --config.num_epochs=2``.

β and device count: at_jax computes each AT term once over the global batch, whatever the number
of devices, so β means the same on 1 GPU or a pod. The authors' multi-GPU code (``--ngpu k``;
their ImageNet command uses ``--ngpu 2``) computes the AT terms on each GPU's share of the batch
and adds the k values, so its effective β is k times the configured 1e3: their ImageNet run
trained with β = 2e3 in at_jax's terms (``--config.loss.at.weight=2000``, on any device count).
Their batch-norm statistics were per GPU (128 images) too; at_jax's are over the global batch.

Recipe (the reference ImageNet code): SGD momentum 0.9, lr 0.1 per 256 images
(``optimizer.lr_batch_size=256``: the run uses lr × batch_size / 256, so ``--config.batch_size``
alone rescales it), weight decay 1e-4, 100 epochs, lr × 0.1 at 30/60/90, batch 256. Paper
(Table 5, top-1/top-5 error %): ResNet-18 30.4/10.8 · AT 29.3/10.0 · ResNet-34 26.1/8.3.
Runtime: not measured here (no GPU was lent to this work).
"""

from at_jax import recipes

METHODS = ("student", "at", "kd", "teacher")
TEACHER_WORKDIR = "runs/torchvision/resnet-34"


def get_config(method: str = "student"):
    if method not in METHODS:
        raise ValueError(
            f"configs/imagenet.py takes a METHOD in {METHODS} (e.g. "
            f"configs/imagenet.py:at), got {method!r}"
        )
    config = recipes.base_config()
    config.model = "resnet-34" if method == "teacher" else "resnet-18"
    config.data.name = "imagefolder"
    config.data.image_size = 224
    config.data.num_workers = 8
    config.data.prefetch = 2
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_epochs = 100
    config.optimizer.lr = 0.1
    config.optimizer.lr_batch_size = 256
    config.optimizer.weight_decay = 1e-4
    config.optimizer.lr_decay_epochs = (30, 60, 90)
    config.optimizer.lr_decay_factor = 0.1
    config.log_every_steps = 500
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 2
    if method == "at":  # F_sum², β = 1e3, on the last two groups (the paper)
        recipes.apply_method(config, "at_fsum2", TEACHER_WORKDIR)
        config.loss.at.pairs = "layer3,layer4"
        config.loss.at.start_epoch = 61
    elif method == "kd":
        recipes.apply_method(config, "kd", TEACHER_WORKDIR)
    return config
