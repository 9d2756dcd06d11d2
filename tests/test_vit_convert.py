"""MAE/timm ViT checkpoints as teachers (python -m at_jax.convert --timm): the converted run's
logits and attention equal a PyTorch ViT's, at the checkpoint's image size and at another one
(the position embedding resized as MAE's interpolate_pos_embed: PyTorch's bicubic), and a
head-less MAE pre-training checkpoint is an attention teacher."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from test_vit import TorchViT, torch

from at_jax import convert, teacher as teacher_lib
from at_jax.models import forward
from at_jax.models.vit_convert import bicubic_matrix, interpolate_pos_embed

F = torch.nn.functional
WIDTH, DEPTH, HEADS = 192, 12, 3  # vit-tiny/7: 28×28 images make a 4×4 grid


def timm_names(module, global_pool):
    """TorchViT's state_dict under MAE's/timm's keys, with MAE's decoder keys added."""
    renames = [
        (".qkv.", ".attn.qkv."),
        (".proj.", ".attn.proj."),
        (".fc1.", ".mlp.fc1."),
        (".fc2.", ".mlp.fc2."),
    ]
    out = {}
    for key, value in module.state_dict().items():
        if key.startswith("patch_embed."):
            key = "patch_embed.proj." + key[len("patch_embed.") :]
        for old, new in renames if key.startswith("blocks.") else []:
            key = key.replace(old, new)
        if global_pool and key.startswith("norm."):
            key = "fc_norm." + key[len("norm.") :]
        out[key] = value
    out["decoder_embed.weight"], out["mask_token"] = torch.zeros(8, 16), torch.zeros(1, 1, 8)
    return out


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    module = TorchViT(7, WIDTH, DEPTH, HEADS, 10, global_pool=True).eval()
    with torch.no_grad():  # visible position and class-token entries (torch's are zeros)
        module.pos_embed.normal_(0, 0.5), module.cls_token.normal_(0, 0.5)
    return module


def torch_outputs(module, images):
    with torch.no_grad():
        logits, attention = module(torch.tensor(images).permute(0, 3, 1, 2))
    return logits.numpy(), [a.numpy() for a in attention]


def resized_pos_embed(pos_embed, side):
    patches = pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)


def test_bicubic_resize_is_pytorchs():
    grid = np.random.default_rng(1).normal(size=(1, 1 + 16, 6)).astype(np.float32)
    for side in (2, 3, 7, 9):
        ours = interpolate_pos_embed(grid, (side, side))
        theirs = resized_pos_embed(torch.tensor(grid), side).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(bicubic_matrix(5, 9).sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_array_equal(interpolate_pos_embed(grid, (4, 4)), grid)


def load(workdir, image_size, classes=10):
    model, variables, config = teacher_lib.load_run_variables(
        str(workdir), classes, (image_size, image_size, 1)
    )
    return model, variables, config


def test_a_converted_mae_vit_is_the_pytorch_vit_at_its_size_and_another(tmp_path, reference):
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": timm_names(reference, global_pool=True), "epoch": 3}, path)
    images = np.random.default_rng(0).normal(size=(2, 42, 42, 1)).astype(np.float32)
    for size in (28, 42):  # 42: a 6×6 grid, the position embedding resized from 4×4
        workdir = tmp_path / f"vit-{size}"
        argv = [
            "--mae",
            str(path),
            "--model",
            "vit-tiny/7",
            "--workdir",
            str(workdir),
            "--dataset",
            "fashion_mnist",
            "--image_size",
            str(size),
        ]
        assert convert.main(argv) == 0
        model, variables, config = load(workdir, size)
        assert model.global_pool and config.model_overrides.global_pool
        x = images[:, :size, :size]
        logits, acts, _ = forward(model, variables, jnp.asarray(x))
        torch_vit = reference
        if size != 28:
            torch_vit = TorchViT(7, WIDTH, DEPTH, HEADS, 10, global_pool=True).eval()
            torch_vit.load_state_dict(reference.state_dict())
            torch_vit.pos_embed = torch.nn.Parameter(resized_pos_embed(reference.pos_embed, 6))
        t_logits, t_attention = torch_outputs(torch_vit, x)
        np.testing.assert_allclose(logits, t_logits, atol=1e-4, rtol=1e-4)
        for i in (0, DEPTH - 1):
            np.testing.assert_allclose(
                acts[f"block{i}.attention_logits"], t_attention[i], atol=1e-4
            )
        saved = json.loads((workdir / "config.json").read_text())
        assert saved["converted_from"]["format"] == "timm"
        assert saved["converted_from"]["head"] == "converted"


def test_a_headless_mae_checkpoint_is_an_attention_teacher(tmp_path, reference):
    state = {
        k: v
        for k, v in timm_names(reference, global_pool=False).items()
        if not k.startswith("head.")
    }
    np.savez(tmp_path / "mae_pretrain.npz", **{k: v.numpy() for k, v in state.items()})
    workdir = tmp_path / "mae"
    argv = [
        "--timm",
        str(tmp_path / "mae_pretrain.npz"),
        "--model",
        "vit-tiny/7",
        "--workdir",
        str(workdir),
        "--dataset",
        "fashion_mnist",
        "--image_size",
        "28",
    ]
    assert convert.main(argv) == 0
    model, variables, _ = load(workdir, 28)
    assert not model.global_pool
    x = np.random.default_rng(2).normal(size=(2, 28, 28, 1)).astype(np.float32)
    logits, acts, _ = forward(model, variables, jnp.asarray(x))
    np.testing.assert_array_equal(logits, 0.0)  # a zero classifier
    _, t_attention = torch_outputs(reference, x)
    np.testing.assert_allclose(acts["block5.attention_logits"], t_attention[5], atol=1e-4)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["converted_from"]["head"] == "none (zeros)"


def test_conversion_refuses_weights_that_are_not_the_model(tmp_path, reference, capsys):
    state = timm_names(reference, global_pool=False)
    with pytest.raises(convert.ConversionError, match="width 192, depth 12, patch 7"):
        convert.to_vit_variables(state, "vit-small/7", 28, 10)
    with pytest.raises(convert.ConversionError, match="multiples of 7"):
        convert.to_vit_variables(state, "vit-tiny/7", 30, 10)
    with pytest.raises(convert.ConversionError, match="must be vit-SIZE/P"):
        convert.to_vit_variables(state, "resnet-18", 28, 10)
    with pytest.raises(convert.ConversionError, match="unexpected key 'blocks.0.ls1.gamma'"):
        convert.to_vit_variables({**state, "blocks.0.ls1.gamma": torch.zeros(3)}, "vit-tiny/7")
    with pytest.raises(convert.ConversionError, match="no patch_embed.proj.weight"):
        convert.to_vit_variables({"fc.weight": torch.zeros(3, 3)}, "vit-tiny/7")
    headless = {k: v for k, v in state.items() if not k.startswith("head.")}
    with pytest.raises(convert.ConversionError, match="no head .*pass --num_classes"):
        convert.to_vit_variables(headless, "vit-tiny/7", 28)
