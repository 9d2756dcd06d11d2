"""Transfer learning, the paper's Table 4: ImageNet-pretrained ResNets fine-tuned on CUB or Scenes.

    configs/transfer.py:METHOD,DATASET   METHOD: teacher | student | kd | at;  DATASET: cub | scenes

First convert torchvision's ImageNet weights (once; see ``python -m at_jax.convert --help``):

    python -m at_jax.convert --torchvision resnet34-b627a593.pth --model resnet-34 \
        --workdir runs/torchvision/resnet-34
    python -m at_jax.convert --torchvision resnet18-f37072fd.pth --model resnet-18 \
        --workdir runs/torchvision/resnet-18

then, for CUB (Scenes: ``,scenes``, its folder and ``runs/transfer/scenes/...``):

    python -m at_jax.main --config configs/transfer.py:teacher,cub \
        --workdir runs/transfer/cub/teacher --config.data.data_dir=/data/CUB_200_2011
    python -m at_jax.main --config configs/transfer.py:student,cub \
        --workdir runs/transfer/cub/student --config.data.data_dir=/data/CUB_200_2011
    python -m at_jax.main --config configs/transfer.py:at,cub \
        --workdir runs/transfer/cub/at --config.data.data_dir=/data/CUB_200_2011
    python -m at_jax.main --config configs/transfer.py:kd,cub \
        --workdir runs/transfer/cub/kd --config.data.data_dir=/data/CUB_200_2011

Methods: ``teacher`` is ResNet-34 fine-tuned from ImageNet; ``student`` ResNet-18 fine-tuned from
ImageNet; ``at`` the same student with attention transfer (F_sum², β = 1e3, on the last two
groups ``layer3,layer4``, as the paper) from the fine-tuned teacher; ``kd`` the same student with
knowledge distillation (T = 4, α = 0.9, today's form) from that teacher. Students read their
teacher from ``runs/transfer/DATASET/teacher`` (``--config.teacher.workdir``) and their ImageNet
weights from ``runs/torchvision/resnet-18`` (``--config.init_from``).

Data (``data.data_dir``): CUB — the ``CUB_200_2011`` folder as distributed (images/, images.txt,
train_test_split.txt, bounding_boxes.txt, ...): training crops the bird's bounding box, rescales
the short side to 256 and takes a random 224 crop (+ flip), evaluation the centre of the box's
short-side-256 resize. Scenes (MIT Indoor-67) — the folder with Images/<class>/ and the official
TrainImages.txt / TestImages.txt. Or ``--config.data.name=caltech_birds2011`` for TFDS's copy.
Devices: one GPU is plenty (the batch is split over every local accelerator; ``--distributed``
for several hosts, see README); ``--config.dtype=bfloat16`` computes in bfloat16.

As the paper: batch norm frozen (running statistics used and kept, scale/offset not trained) and
the first group of residual blocks frozen. Chosen here, where the paper gives no value (each is a
key): the stem before that group (``conv1``, ``bn1``) is frozen too (``freeze.modules``); SGD
momentum 0.9, batch 64, lr 0.01 (the new classifier included), weight decay 1e-4, 40 epochs,
lr × 0.1 at 20 and 30. Paper (Table 4, top-1 error %): CUB — student 28.5, KD 27, AT 27, teacher
26.5; Scenes — student 28.2, KD 28.1, AT 27.1, teacher 26. Runtime: not measured (no GPU was
lent to this work); ~6k (CUB) / ~5.4k (Scenes) training images, 94 / 84 steps per epoch.
"""

from at_jax import recipes

METHODS = ("teacher", "student", "kd", "at")
DATASETS = ("cub", "scenes")
TORCHVISION = "runs/torchvision/{model}"
TEACHER_WORKDIR = "runs/transfer/{dataset}/teacher"


def get_config(arg: str = "student,cub"):
    parts = [p.strip() for p in arg.split(",")]
    if len(parts) != 2 or parts[0] not in METHODS or parts[1] not in DATASETS:
        raise ValueError(
            f"configs/transfer.py takes METHOD,DATASET with METHOD in {METHODS} and "
            f"DATASET in {DATASETS} (e.g. configs/transfer.py:at,cub), got {arg!r}"
        )
    method, dataset = parts
    config = recipes.base_config()
    config.model = "resnet-34" if method == "teacher" else "resnet-18"
    config.init_from = TORCHVISION.format(model=config.model)
    config.freeze.batch_norm = True
    config.freeze.modules = ("conv1", "bn1", "layer1")

    config.data.name = dataset
    config.data.image_size = 224
    config.data.num_workers = 8
    config.batch_size = 64
    config.eval_batch_size = 100
    config.num_epochs = 40
    config.optimizer.lr = 0.01
    config.optimizer.weight_decay = 1e-4
    config.optimizer.lr_decay_epochs = (20, 30)
    config.optimizer.lr_decay_factor = 0.1
    config.keep_checkpoints = 2

    if method == "at":  # F_sum², β = 1e3, on the last two groups (the paper)
        recipes.apply_method(config, "at_fsum2", TEACHER_WORKDIR.format(dataset=dataset))
        config.loss.at.pairs = "layer3,layer4"
    elif method == "kd":
        recipes.apply_method(config, "kd", TEACHER_WORKDIR.format(dataset=dataset))
    return config
