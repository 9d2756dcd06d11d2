"""RepDistiller's CIFAR models (at_jax.models.cifar) against PyTorch modules of the reference
layout written here from its models/resnet.py, vgg.py and wrn.py (b84f547): the parameter count
of every named model, and the same logits and sown features, eval mode, weights mapped by name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_fidelity import torch

from at_jax.convert import ConversionError, convert, to_variables
from at_jax.models import forward, get_model
from at_jax.models.cifar import CIFAR_RESNETS, VGG_CONFIGS

nn = torch.nn
F = torch.nn.functional


class TorchBasic(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        pre = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(pre), pre


class TorchCifarResNet(nn.Module):
    """The reference's CIFAR ResNet with basic blocks: conv-BN-ReLU stem, three stages."""

    def __init__(self, depth, widths, classes=100):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for k, planes in enumerate(widths[1:], start=1):
            blocks = []
            for i in range(n):
                blocks.append(TorchBasic(cin, planes, 2 if k > 1 and i == 0 else 1))
                cin = planes
            setattr(self, f"layer{k}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for k in (1, 2, 3):
            for block in getattr(self, f"layer{k}"):
                x, pre = block(x)
            feats[f"layer{k}"], feats[f"layer{k}.preact"] = x, pre
        x = x.mean((2, 3))
        feats["features"] = x
        return self.fc(x), feats


class TorchVGG(nn.Module):
    """The reference's VGG with BN: blocks of (conv with bias, BN, ReLU) without the last ReLU,
    max-pools after blocks 0-2 (and 3 for 64-pixel inputs), global average pooling."""

    def __init__(self, config, classes=100):
        super().__init__()
        cin = 3
        for b, widths in enumerate(config):
            layers = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                cin = w
            setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, classes)

    def forward(self, x):
        h = x.shape[2]
        x = F.relu(self.block0(x))
        feats = {"stem": x}
        x = F.max_pool2d(x, 2)
        for b in (1, 2, 3, 4):
            x = getattr(self, f"block{b}")(x)
            feats[f"block{b}.preact"] = x
            x = F.relu(x)
            feats[f"block{b}"] = x
            if b < 3 or (b == 3 and h == 64):
                x = F.max_pool2d(x, 2)
        x = x.mean((2, 3))
        feats["features"] = x
        return self.classifier(x), feats


class TorchWRNBlock(nn.Module):
    """RepDistiller's wrn.py BasicBlock (pre-activation; the shortcut reads relu(bn1(x)))."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.convShortcut is None else self.convShortcut(o))


class TorchNetworkBlock(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.layer = nn.Sequential(*blocks)


class TorchWRN(nn.Module):
    """RepDistiller's WRN (its models/wrn.py), under its module names."""

    def __init__(self, depth, k, classes=100):
        super().__init__()
        n, widths = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cin = 16
        for g in range(3):
            blocks = []
            for i in range(n):
                blocks.append(TorchWRNBlock(cin, widths[g + 1], (1, 2, 2)[g] if i == 0 else 1))
                cin = widths[g + 1]
            setattr(self, f"block{g + 1}", TorchNetworkBlock(blocks))
        self.bn1 = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.conv1(x)
        feats = {"stem": x}
        for g in range(3):
            x = getattr(self, f"block{g + 1}").layer(x)
            feats[f"group{g}"] = x
        x = F.relu(self.bn1(x)).mean((2, 3))
        feats["features"] = x
        return self.fc(x), feats


def torch_model(name):
    if name in CIFAR_RESNETS:
        return TorchCifarResNet(*CIFAR_RESNETS[name])
    if name in VGG_CONFIGS:
        return TorchVGG(VGG_CONFIGS[name])
    depth, k = (int(p) for p in name.split("_")[1:])
    return TorchWRN(depth, k)


NAMES = [*CIFAR_RESNETS, *VGG_CONFIGS, "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


def test_every_reference_model_has_the_references_parameter_count():
    for name in NAMES:
        model = get_model(name, num_classes=100)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        ours = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
        assert ours == sum(p.numel() for p in torch_model(name).parameters()), name


def randomize(module, seed):
    """Random weights and running statistics (eval mode uses them), as a trained network's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            noise = torch.rand(value.shape, generator=gen)
            if key.endswith("running_var") or (key.endswith(".weight") and value.ndim == 1):
                value.copy_(0.5 + noise)
            else:
                value.copy_((noise - 0.5) * (0.6 if value.ndim > 1 else 0.2))
    return module.eval()


@pytest.mark.parametrize("name", ["resnet8x4", "vgg8", "wrn_16_2"])
def test_logits_and_features_equal_the_reference_layout(name):
    """One of each family, 32×32 (and VGG at 64×64, where its fourth pool runs): the reference's
    state dict, converted as ``python -m at_jax.convert --repdistiller`` does, gives the same
    logits and every sown feature point."""
    reference = randomize(torch_model(name), 0)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    variables, classes = to_variables(state_dict, name, 32, "repdistiller")
    assert classes == 100
    model = get_model(name, num_classes=100)
    sizes = (32, 64) if name.startswith("vgg") else (32,)
    for size in sizes:
        x = np.random.default_rng(size).standard_normal((2, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            want, feats = reference(torch.tensor(x))
        logits, acts, _ = jax.jit(lambda v, x: forward(model, v, x))(
            variables, jnp.asarray(x.transpose(0, 2, 3, 1))
        )
        close(logits, want.numpy(), "logits")
        for key, value in feats.items():
            value = value.numpy()
            close(acts[key], value.transpose(0, 2, 3, 1) if value.ndim == 4 else value, key)


def close(ours, want, what):
    """Equal to float32 round-off relative to the array's scale (activations reach 1e2 here)."""
    assert ours.shape == want.shape, what
    assert np.abs(np.asarray(ours) - want).max() <= 1e-5 * np.abs(want).max() + 1e-6, what


def test_repdistiller_configs_give_its_recipe_and_find_every_feature_point():
    """configs/cifar100.py:METHOD,TEACHER,STUDENT for every method and same-architecture pair:
    valid, the reference's recipe and weights, its teacher's workdir; AB's pre-activations and
    CRD's vector found on both networks of every pair (shapes only)."""
    from at_jax import recipes
    from at_jax.data import DataSpec
    from at_jax.distill.methods import REPDISTILLER_METHODS
    from at_jax.networks import Networks
    from at_jax.terms import TermData
    from configs import cifar100

    spec = DataSpec(100, (32, 32, 3), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    from experiments.repdistiller_tables import SAME_PAIRS

    for teacher, student in SAME_PAIRS:  # RepDistiller's README, its first table's pairs
        for method in REPDISTILLER_METHODS:
            config = cifar100.get_config(f"{method},{teacher},{student}")
            recipes.validate_config(config)
            assert config.model == (teacher if method == "teacher" else student)
            assert (config.batch_size, config.num_epochs, config.optimizer.lr) == (64, 240, 0.05)
            assert tuple(config.optimizer.lr_decay_epochs) == (150, 180, 210)
        assert cifar100.get_config(f"kd,{teacher},{student}").loss.kd.alpha == 0.9
        t_model = get_model(teacher, num_classes=100)
        t_vars = jax.eval_shape(t_model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        config = cifar100.get_config(f"ab,{teacher},{student}")
        config.loss.crd = cifar100.get_config(f"crd,{teacher},{student}").loss.crd
        config.loss.ab.init_epochs = 0  # (one networks build for both terms)
        net = Networks.from_config(
            config,
            spec,
            teacher_model=t_model,
            teacher_variables=t_vars,
            term_data=TermData(64, np.arange(64) % 100),
        )
        assert {"ab", "crd"} <= set(net.terms)
        assert cifar100.get_config(f"crd,{teacher},{student}").teacher.workdir.endswith(teacher)
    with pytest.raises(ValueError, match="METHOD,TEACHER,STUDENT"):
        cifar100.get_config("crd,wrn_40_2")
    with pytest.raises(ValueError, match="unknown method 'crdd'"):
        cifar100.get_config("crdd,wrn_40_2,wrn_16_2")


def test_zero_padded_crops_have_black_borders_as_torchvisions():
    from at_jax.data.augment import random_crop

    images = jnp.full((64, 4, 4, 1), 200, jnp.uint8)
    crops = np.asarray(random_crop(images, jax.random.key(0), 2, "zeros"))
    reflected = np.asarray(random_crop(images, jax.random.key(0), 2, "reflect"))
    assert (reflected == 200).all() and set(np.unique(crops)) == {0, 200}
    # each crop is the image shifted by its offset, black where it left the frame
    kept = (crops == 200).reshape(64, -1).sum(1)
    assert set(kept) <= {a * b for a in (2, 3, 4) for b in (2, 3, 4)} and 16 in set(kept)
    with pytest.raises(ValueError, match="crop padding mode"):
        random_crop(images, jax.random.key(0), 2, "edge")


def test_convert_cli_reads_a_repdistiller_checkpoint_into_a_teacher_run(tmp_path):
    """Its checkpoint file ({'model': state_dict, 'epoch', ...}) → a run directory that
    load_teacher reads back to the same weights; a mismatched --model is refused in one line."""
    from at_jax.teacher import load_run_variables

    reference = randomize(torch_model("resnet8"), 1)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": reference.state_dict(), "accuracy": 70.0}, path)
    summary = convert(str(path), "resnet8", str(tmp_path / "run"), "cifar100", 32, "repdistiller")
    assert summary["parameters"] == sum(p.numel() for p in reference.parameters())
    model, variables, _ = load_run_variables(str(tmp_path / "run"), 100, (32, 32, 3))
    assert model.num_classes == 100
    want = reference.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"], want)
    with pytest.raises(ConversionError, match="resnet20"):
        convert(str(path), "resnet20", str(tmp_path / "other"), "cifar100", 32, "repdistiller")
