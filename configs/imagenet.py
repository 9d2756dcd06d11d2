"""ImageNet (ILSVRC-2012), streamed: a ResNet-18 trained from scratch (the paper's Table 5 student).

    python -m at_jax.main --config configs/imagenet.py --workdir runs/imagenet/resnet-18 \
        --config.data.data_dir=/data/imagenet

Data: ``DATA_DIR/train/<wnid>/*.JPEG`` and ``DATA_DIR/val/<wnid>/*.JPEG`` (the usual image-folder
layout; classes sorted by name), or ``--config.data.name=imagenet2012`` for a TFDS-prepared copy
(``data_dir`` is then the TFDS data_dir). Decoding and augmentation (random-resized crop 224 +
flip; eval: resize 256 + centre crop 224) run in ``config.data.num_workers`` Grain processes per
host. Multi-host: add ``--distributed`` (see README). A small run on any image folder is one
command: ``--config.data.image_size=64 --config.model=resnet-tiny --config.batch_size=32
--config.num_epochs=2``.

Recipe (the reference ImageNet code): SGD momentum 0.9, lr 0.1 per 256 images (scale it with
``batch_size``), weight decay 1e-4, 100 epochs, lr × 0.1 at 30/60/90, batch 256. The teacher
(ResNet-34) and AT/KD variants come with the Tables 4/5 recipes. Paper (Table 5): ResNet-18
30.4 / 10.8 top-1/top-5 error. Runtime: not measured here (no GPU was lent to this work).
"""

from at_jax import recipes


def get_config():
    config = recipes.base_config()
    config.model = "resnet-18"
    config.data.name = "imagefolder"
    config.data.image_size = 224
    config.data.num_workers = 8
    config.data.prefetch = 2
    config.batch_size = 256
    config.eval_batch_size = 500
    config.num_epochs = 100
    config.optimizer.lr = 0.1
    config.optimizer.weight_decay = 1e-4
    config.optimizer.lr_decay_epochs = (30, 60, 90)
    config.optimizer.lr_decay_factor = 0.1
    config.log_every_steps = 500
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 2
    return config
