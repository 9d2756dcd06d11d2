"""Attention transfer for Vision Transformers (Li et al., NeurIPS 2024, arXiv 2411.09702):
attention copy and attention distillation from a pre-trained ViT teacher.

    configs/vit_attention.py:METHOD,DATASET
    METHOD: teacher | scratch | copy | distill;  DATASET: imagenet | fashion_mnist

ImageNet, with MAE's ViT-L/16 as the teacher (its pre-training checkpoint, head-less: only its
attention is used; convert it once):

    python -m at_jax.convert --mae mae_pretrain_vit_large.pth --model vit-large/16 \
        --workdir runs/mae/vit-large --dataset imagefolder --num_classes 1000
    python -m at_jax.main --config configs/vit_attention.py:copy,imagenet \
        --workdir runs/vit/imagenet/copy --config.data.data_dir=/data/imagenet
    python -m at_jax.main --config configs/vit_attention.py:distill,imagenet \
        --workdir runs/vit/imagenet/distill --config.data.data_dir=/data/imagenet

Fashion-MNIST (a small ViT and schedule for 2 CPU cores; the teacher is trained here first):

    python -m at_jax.main --config configs/vit_attention.py:teacher,fashion_mnist \
        --workdir runs/vit/fashion_mnist/teacher
    python -m at_jax.main --config configs/vit_attention.py:copy,fashion_mnist \
        --workdir runs/vit/fashion_mnist/copy
    (and scratch, distill; python -m experiments.vit_attention runs them all, seeds paired)

Methods: ``scratch`` — the student from random weights, no teacher term. ``copy`` — the student's
blocks 0..depth−4 use the teacher's attention (``config.attention_copy``; end_layer −3, what the
port runs: its ``--end_layer`` flag is parsed but never reaches the model); evaluation runs the
teacher too. ``distill`` — the student matches the teacher's attention with the ``atd`` term
(weight 3, end_layer −6 as the paper's ViT-L command; ``--config.loss.atd.end_layer=-3`` for
what the port's code computes). ``teacher`` — ImageNet: MAE's fine-tuning of the converted
checkpoint (``config.init_from``; MAE's ViT-L recipe, on the class token, as the pre-training
checkpoint's ``norm`` is kept), Fashion-MNIST: a ViT from scratch. The paper's teacher is the
pre-training checkpoint itself, converted: its zero classifier makes the teacher's test error
that a student run prints meaningless. Students
read their teacher from ``runs/mae/vit-large`` or ``runs/vit/fashion_mnist/teacher``
(``--config.teacher.workdir``).

Recipe (the port's README commands, 64 GPUs × 32 = batch 2048; MAE's ``main_finetune.py``
defaults for the rest): AdamW, lr = blr · batch / 256, linear warm-up then cosine, per step, to
``min_lr``; weight decay without biases, norms, position embedding and class token; label
smoothing 0.1; RandAugment rand-m9-mstd0.5-inc1 (streamed: on the host); mixup 0.8 / CutMix
1.0 (switch 0.5); random erasing 0.25; an EMA of 0.9999 (its
test error is ``test/ema_error``); global pooling (MAE's ``global_pool`` default). Distill:
200 epochs, blr 1e-4, β2 0.95, warm-up 20, wd 0.3, drop path 0.2, no layer decay. Copy: 100
epochs, blr 1e-3, min_lr 2e-3 (sic, the README's), layer decay 0.75, β2 0.999, wd 0.05, no drop
path, warm-up 5 (MAE's default). ``scratch`` trains as ``distill`` without the term.
Fashion-MNIST, in memory, has no RandAugment (it augments on the device). Paper (ImageNet-1k
top-1, ViT-L): copy 85.1, distillation 85.7, MAE fine-tuned 85.6, from scratch 83.0 (its
Table 1); not measured here (no GPU was lent to this work).
"""

from at_jax import recipes

METHODS = ("teacher", "scratch", "copy", "distill")
DATASETS = ("imagenet", "fashion_mnist")
TEACHER_WORKDIRS = {
    "imagenet": "runs/mae/vit-large",
    "fashion_mnist": "runs/vit/fashion_mnist/teacher",
}
MAE_CHECKPOINT_RUN = (
    "runs/mae/vit-large"  # the converted MAE checkpoint that the teacher starts from
)


def _mae_recipe(config, *, epochs, blr, b2, warmup, wd, drop_path, layer_decay, min_lr=1e-6):
    config.num_epochs = epochs
    opt = config.optimizer
    opt.name, opt.lr, opt.lr_batch_size, opt.b2 = "adamw", blr, 256, b2
    opt.schedule, opt.warmup_epochs, opt.cosine_epochs, opt.min_lr = (
        "warmup_cosine",
        warmup,
        epochs,
        min_lr,
    )
    opt.weight_decay, opt.layer_decay = wd, layer_decay
    config.model_overrides.drop_path_rate = drop_path


def _imagenet(config, method):
    config.model = "vit-large/16"
    config.model_overrides = {"global_pool": True}
    config.data.name = "imagefolder"
    config.data.image_size = 224
    config.data.num_workers = 8
    config.batch_size = 2048
    config.eval_batch_size = 500
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2
    config.dtype = "bfloat16"
    config.optimizer.ema_decay = 0.9999
    config.loss.ce.label_smoothing = 0.1
    augment = config.data.augment
    augment.random_erasing, augment.mixup, augment.cutmix = 0.25, 0.8, 1.0
    augment.randaugment = "rand-m9-mstd0.5-inc1"  # MAE's --aa, on the host
    if method == "copy":
        _mae_recipe(
            config,
            epochs=100,
            blr=1e-3,
            b2=0.999,
            warmup=5,
            wd=0.05,
            drop_path=0.0,
            layer_decay=0.75,
            min_lr=2e-3,
        )
    elif method == "teacher":  # MAE's ViT-L fine-tuning of the converted checkpoint
        _mae_recipe(
            config,
            epochs=50,
            blr=1e-3,
            b2=0.999,
            warmup=5,
            wd=0.05,
            drop_path=0.2,
            layer_decay=0.75,
        )
        config.init_from = MAE_CHECKPOINT_RUN
        config.optimizer.layer_decay_form = "mae"
        # the class token (MAE's --cls_token): a pre-training checkpoint has the encoder's norm,
        # not the fc_norm that global pooling would start from scratch
        config.model_overrides.global_pool = False
    else:
        _mae_recipe(
            config, epochs=200, blr=1e-4, b2=0.95, warmup=20, wd=0.3, drop_path=0.2, layer_decay=1.0
        )
    config.loss.atd.end_layer = -6


def _fashion_mnist(config, method):
    config.model = "vit-tiny/7"  # 28×28: a 4×4 grid; a narrower, shallower ViT-Tiny
    config.model_overrides = {"embed_dim": 64, "depth": 6, "num_heads": 4, "global_pool": True}
    config.data.name = "fashion_mnist"
    config.data.augment.crop_pad, config.data.augment.flip = 2, True
    config.data.augment.random_erasing = 0.25
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.loss.ce.label_smoothing = 0.1
    config.optimizer.ema_decay = 0.999
    epochs = 10 if method == "teacher" else 4
    _mae_recipe(
        config,
        epochs=epochs,
        blr=1e-3,
        b2=0.999,
        warmup=1,
        wd=0.05,
        drop_path=0.1 if method == "teacher" else 0.0,
        layer_decay=1.0,
    )
    config.loss.atd.end_layer = -1  # blocks 0..4 of 6


def get_config(arg: str = "copy,fashion_mnist"):
    method, _, dataset = arg.partition(",")
    dataset = dataset or "fashion_mnist"
    if method not in METHODS or dataset not in DATASETS:
        raise ValueError(
            f"configs/vit_attention.py takes METHOD,DATASET with METHOD in {METHODS} and DATASET "
            f"in {DATASETS} (e.g. configs/vit_attention.py:copy,fashion_mnist), got {arg!r}"
        )
    config = recipes.base_config()
    (_imagenet if dataset == "imagenet" else _fashion_mnist)(config, method)
    teacher = TEACHER_WORKDIRS[dataset]
    if method == "copy":
        config.teacher.workdir = teacher
        config.attention_copy.target = "attention"
        config.attention_copy.end_layer = -3 if dataset == "imagenet" else -1
    elif method == "distill":
        config.teacher.workdir = teacher
        config.loss.atd.weight = 3.0
    return config
