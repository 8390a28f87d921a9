"""Class-conditioned training and classifier-free guidance on a two-class toy set (red squares vs blue circles)."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, ImageData, load_fashion_mnist, load_image_data
from ddpmkit.errors import UserError
from ddpmkit import runs
from ddpmkit.guidance import ColorLoss, Guide, LossGuidance
from ddpmkit.images import make_grid
from ddpmkit.models import class_names, load_pipeline, resolve_class_label
from ddpmkit.sampling import sample
from ddpmkit.trainer import train

NAMES = ["red square", "blue circle"]
UNET = dict(  # no attention: the fastest UNet that learns "colour follows the label" in a few hundred steps
    layers_per_block=1,
    block_out_channels=[16, 32],
    down_block_types=["DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D"],
    norm_num_groups=8,
)



def two_class_toy(n: int = 64, size: int = 8, seed: int = 0) -> ImageData:
    """Even indices: a red square; odd: a blue disc; random size and position on a dark background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for i in range(n):
        img = np.full((size, size, 3), 40, np.uint8)
        r = rng.integers(2, 4)
        cy, cx = rng.integers(r, size - r + 1, 2)
        if i % 2 == 0:
            img[cy - r:cy + r, cx - r:cx + r] = (230, 30, 30)
        else:
            img[(yy - cy + 0.5) ** 2 + (xx - cx + 0.5) ** 2 <= r * r] = (30, 30, 230)
        images.append(img.transpose(2, 0, 1))
        labels.append(i % 2)
    return ImageData(torch.from_numpy(np.stack(images)), torch.tensor(labels), NAMES, "toy")


def predicted_class(images: torch.Tensor) -> torch.Tensor:
    """0 (red) where the mean red channel beats the mean blue channel, else 1 (blue)."""
    mean = images.mean(dim=(2, 3))
    return (mean[:, 2] > mean[:, 0]).long()


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cond")
    (folder / "unet.json").write_text(json.dumps(UNET))
    return train(data=two_class_toy(), unet_config=str(folder / "unet.json"), image_size=8, class_column="label",
                 cond_drop_prob=0.2, max_steps=300, batch_size=32, lr=3e-3, output_dir=str(folder / "run"),
                 num_sample_images=4, sample_steps=5, seed=0, device="cpu")


def test_saved_model_is_plain_diffusers_with_class_names(toy_model):
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(toy_model / "unet")
    assert unet.config.num_class_embeds == 3  # two classes and the null class
    assert class_names(toy_model) == NAMES
    assert runs.read_meta(toy_model)["null_class"] == 2


def test_cfg_above_one_gives_the_right_class(toy_model):
    pipe = load_pipeline(toy_model)
    for label in (0, 1):
        out = sample(pipe, "ddim", steps=20, num_images=16, seed=1, class_labels=label, cfg_scale=3.0, progress=False)
        share = (predicted_class(out.images) == label).float().mean().item()
        assert share >= 0.75, (NAMES[label], share)


def test_python_class_labels_by_name_as_the_cli_takes_them(toy_model):
    """sample(class_labels=["blue circle", ...]) was a ValueError from torch ('too many dimensions str')."""
    by_index = sample(str(toy_model), "ddim", steps=3, num_images=2, seed=0, class_labels=[1, 0], progress=False)
    for model in (str(toy_model), load_pipeline(toy_model)):  # a folder, or a pipeline loaded from one
        by_name = sample(model, "ddim", steps=3, num_images=2, seed=0, class_labels=["blue-circle", "Red square"],
                         progress=False)
        assert torch.equal(by_name.images, by_index.images)
    one = sample(str(toy_model), "ddim", steps=3, num_images=2, seed=0, class_labels="blue circle", progress=False)
    assert torch.equal(one.images, sample(str(toy_model), "ddim", steps=3, num_images=2, seed=0, class_labels=1,
                                          progress=False).images)
    with pytest.raises(UserError, match="unknown --class_label 'owl': use one of red square, blue circle"):
        sample(str(toy_model), "ddim", steps=3, num_images=2, seed=0, class_labels=["owl", 0], progress=False)


def test_cfg_zero_equals_unconditional_sampling(toy_model):
    pipe = load_pipeline(toy_model)
    unconditional = sample(pipe, "ddpm", steps=10, num_images=4, seed=2, progress=False)  # null class
    for label in (0, 1):
        zero = sample(pipe, "ddpm", steps=10, num_images=4, seed=2, class_labels=label, cfg_scale=0.0, progress=False)
        assert torch.equal(zero.images, unconditional.images)


def test_cfg_is_one_batched_unet_call_per_step(toy_model):
    pipe = load_pipeline(toy_model)
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: batches.append(args[0].shape[0]),
                                               with_kwargs=True)
    try:
        out = sample(pipe, "dpm++", steps=6, num_images=3, seed=0, class_labels=[0, 1, 0], cfg_scale=2.5,
                     progress=False, dtype="fp32", batch_size=3)  # nothing measured; 3 images = 6 UNet rows
    finally:
        hook.remove()
    assert batches == [6] * 6 and out.nfe == 6  # cond and uncond halves share each call


def test_loss_guidance_with_cfg(toy_model):
    pipe = load_pipeline(toy_model)
    plain = sample(pipe, "ddim", steps=10, num_images=4, seed=3, class_labels=0, cfg_scale=3.0, progress=False)
    guidance = LossGuidance(Guide(ColorLoss("#1E1EE6"), 20.0), method="full")  # pull the red class toward blue
    guided = sample(pipe, "ddim", steps=10, num_images=4, seed=3, class_labels=0, cfg_scale=3.0, guidance=guidance,
                    progress=False)
    blue_minus_red = lambda x: float((x[:, 2] - x[:, 0]).mean())  # noqa: E731
    assert blue_minus_red(guided.images) > blue_minus_red(plain.images) + 0.2


def test_resolve_class_label():
    assert resolve_class_label("1", NAMES, 2) == 1
    assert resolve_class_label("Blue Circle", NAMES, 2) == 1
    assert resolve_class_label("blue-circle", NAMES, 2) == 1
    assert resolve_class_label("ankle-boot", FASHION_MNIST_CLASSES, 10) == 9
    assert resolve_class_label("t-shirt/top", FASHION_MNIST_CLASSES, 10) == 0
    with pytest.raises(UserError, match="red square, blue circle"):
        resolve_class_label("green", NAMES, 2)
    with pytest.raises(UserError, match="out of range"):
        resolve_class_label(5, NAMES, 2)
    with pytest.raises(UserError, match="no class names"):
        resolve_class_label("green", None, 2)


def test_cli_class_label_by_name_and_one_row_per_class(toy_model, tmp_path, plain_pipeline, capsys):
    common = ["-q", "sample", "--model", str(toy_model), "--scheduler", "ddim", "--steps", "5", "--scale", "1"]
    out = tmp_path / "blue.png"
    assert main([*common, "--class_label", "blue circle", "--cfg_scale", "3", "--num_images", "4",
                 "--out", str(out)]) == 0
    assert out.exists()
    out = tmp_path / "rows.png"
    assert main([*common, "--num_images", "3", "--out", str(out)]) == 0  # 3 per class, one row each
    row = make_grid(torch.zeros(3, 3, 8, 8), nrow=3)
    assert Image.open(out).height == 2 * row.height
    capsys.readouterr()
    for bad in ([*common, "--class_label", "green", "--out", str(tmp_path / "x.png")],
                ["sample", "--model", str(plain_pipeline), "--cfg_scale", "3", "--out", str(tmp_path / "x.png")],
                ["sample", "--model", str(plain_pipeline), "--class_label", "0", "--out", str(tmp_path / "x.png")]):
        assert main(bad) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ddpmkit: error:") and "\n" not in err, err


# --------------------------------------------------------------------------- Fashion-MNIST (the course's exercise data)
def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 7], np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    data = load_fashion_mnist(28, 1, split="test", folder=tmp_path)
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels.tolist() == [9, 0, 3, 3, 7] and data.class_names == FASHION_MNIST_CLASSES
    rgb = load_fashion_mnist(32, 3, split="test", max_images=2, folder=tmp_path)
    assert rgb.images.shape == (2, 3, 32, 32) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])
    with pytest.raises(UserError, match="splits train and test"):
        load_fashion_mnist(28, 1, split="validation", folder=tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_debian_package():
    data = load_image_data("fashion_mnist", 28, 1, max_images=10)
    assert data.images.shape == (10, 1, 28, 28)
    assert data.labels.tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the first training labels of Fashion-MNIST
    assert data.class_names[9] == "Ankle boot"
