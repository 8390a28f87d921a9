"""`ddpmkit eval` / `ddpmkit.evaluate`: FID, KID and precision/recall on the real FID Inception, checked against
an independent numpy/scipy computation, their behaviour on known cases, the feature cache, the floor, class-
conditioned models, and every input mistake as one line with exit code 2."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import make_micro_unet, save_plain_pipeline
from PIL import Image

from ddpmkit.runs import write_meta
from ddpmkit import evaluation
from ddpmkit.cli import main
from ddpmkit.errors import UserError
from ddpmkit.evaluation import (EvalResult, FeatureCache, ImageSet, InceptionFeatures, evaluate, fid_from_features,
                                kid_from_features, precision_recall)
from ddpmkit.images import to_uint8_nchw
from ddpmkit.sampling import SamplerSettings


# ----------------------------------------------------------------------------- helpers
def shapes(n: int, kind: str, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n uint8 images (n, 3, size, size): a random-coloured disc or square on a random light background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(150, 256, 3)
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        r = rng.integers(size // 8, size // 3)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r if kind == "disc" else \
            (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        out[i][mask] = rng.integers(0, 150, 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def save_folder(images: torch.Tensor, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(a).save(folder / f"{i:04d}.png")
    return folder


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (pytorch-fid's): means, covariances, scipy.linalg.sqrtm of the product."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class PixelFeatures:
    """A cheap stand-in for the Inception (a fixed random projection of 8x8 pixels) that counts its images."""

    def __init__(self, dims: int = 16):
        self.identity = {"network": "pixels-test", "sha256": "0" * 64, "resize": "area8", "dims": dims}
        self.projection = torch.randn(3 * 64, dims, generator=torch.Generator().manual_seed(0))
        self.calls: list[int] = []

    def __call__(self, images, progress=True, desc="features"):
        self.calls.append(images.shape[0])
        x = torch.nn.functional.interpolate(images.float().expand(-1, 3, -1, -1), size=(8, 8), mode="area")
        return (x.flatten(1) / 255 @ self.projection).numpy().astype(np.float32)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures(device="cpu", batch_size=50)


@pytest.fixture(scope="module")
def shape_features(inception):
    """Inception features of 100 discs and 100 squares (computed once for the module)."""
    discs, squares = shapes(100, "disc", seed=1), shapes(100, "square", seed=2)
    return discs, squares, inception(discs, progress=False), inception(squares, progress=False)


def test_cpu_feature_batch_is_small_and_gives_the_same_features_as_batch_50(inception):
    """On a CPU the Inception runs 10 images a forward (faster there: benchmarks/feature_batch.py); the features must
    not depend on the batch: 12 images at the default batch against the same at batch 50 (one forward)."""
    default = InceptionFeatures(device="cpu")
    assert default.batch_size == 10 and inception.batch_size == 50
    images = shapes(12, "disc", seed=3)
    np.testing.assert_allclose(default(images, progress=False), inception(images, progress=False), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the metrics themselves
def clean_fid_features(images: torch.Tensor) -> np.ndarray:
    """Features as clean-fid makes them in its "clean" mode, written from its source (GaParmar/clean-fid,
    cleanfid/resize.py `make_resizer("PIL", False, "bicubic", (299, 299))` and the TF Inception's (x - 128) / 128),
    on the same TorchScript network loaded on its own: nothing of ddpmkit's extraction is used."""
    def resize_single_channel(x_np):
        img = Image.fromarray(x_np.astype(np.float32), mode="F")
        img = img.resize((299, 299), resample=Image.BICUBIC)
        return np.asarray(img).clip(0, 255).reshape(299, 299, 1)

    net = torch.jit.load(str(evaluation.inception_path()), map_location="cpu").eval()
    batch = []
    for x in images.permute(0, 2, 3, 1).numpy():  # clean-fid resizes HWC uint8 arrays
        x = np.concatenate([resize_single_channel(x[:, :, idx]) for idx in range(3)], axis=2).astype(np.float32)
        batch.append(torch.from_numpy(x).permute(2, 0, 1))
    out = []
    with torch.no_grad():
        for i in range(0, len(batch), 50):
            out.append(net((torch.stack(batch[i:i + 50]) - 128) / 128).reshape(-1, 2048))
    return torch.cat(out).numpy()


@pytest.mark.long  # 200 more Inception passes and scipy.linalg.sqrtm of a 2048 x 2048 matrix: 1-3 minutes on 2 cores
def test_fid_equals_an_independent_clean_fid_computation(shape_features):
    """ddpmkit's FID of discs vs squares (its resize, network call and Frechet distance) against clean-fid's clean mode
    rebuilt from its source with scipy's sqrtm (pytorch-fid's formula): within 1%. torch's antialiased bicubic,
    ddpmkit's earlier resize, stays reachable and is cached apart."""
    disc_images, square_images, discs, squares = shape_features
    reference = scipy_fid(clean_fid_features(disc_images), clean_fid_features(square_images))
    ours = fid_from_features(discs, squares)
    assert ours > 1.0  # two different shape sets are far apart
    assert abs(ours - reference) <= 0.01 * reference, (ours, reference)
    assert abs(fid_from_features(discs, squares) - scipy_fid(discs, squares)) <= 1e-3 * reference  # the distance alone
    # ddpmkit's earlier resize (torch's antialiased bicubic) stays reachable and is cached apart. It is Keys' cubic
    # with a = -0.5 as PIL's (torch's antialias path), computed differently: the features differ by float rounding
    old = InceptionFeatures(device="cpu", resize="torch-bicubic")
    assert old.identity["resize"] != InceptionFeatures(device="cpu").identity["resize"]
    assert 0 < np.abs(old(disc_images[:4], progress=False) - discs[:4]).max() < 1e-3


@pytest.mark.long  # the real Inception on 200 images (about a minute on 2 cores): make test-long
def test_identical_sets_give_zero_and_noise_a_monotone_larger_fid(shape_features, inception):
    images, _, features, _ = shape_features
    assert fid_from_features(features, features) < 1e-3
    # KID of a set against itself: ~0 next to the KID of two different sets (its random subsets of the one set
    # share images, which tilts the unbiased estimator slightly below 0)
    kid_mean, _ = kid_from_features(features, features, subset_size=50)
    assert abs(kid_mean) < 0.05 * kid_from_features(features, shape_features[3], subset_size=50)[0]
    fids = []
    images, features = images[:40], features[:40]
    for sigma in (0.1, 0.2, 0.4):  # Gaussian noise in [-1, 1] units
        noisy = images.float() / 127.5 - 1 + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        fids.append(fid_from_features(features, inception(to_uint8_nchw(noisy), progress=False)))
    assert fids[0] > 5.0, fids  # clearly larger than the ~0 of the identical set
    assert fids[0] < fids[1] < fids[2], fids


@pytest.mark.long  # the real Inception on 200 images (about a minute on 2 cores): make test-long
def test_kid_of_two_disjoint_halves_is_zero_within_two_std(shape_features):
    _, _, discs, _ = shape_features
    mean, std = kid_from_features(discs[:50], discs[50:], num_subsets=100, subset_size=40)
    assert std > 0
    assert abs(mean) <= 2 * std, (mean, std)
    other_mean, _ = kid_from_features(discs[:50], shape_features[3][:50], subset_size=40)
    assert other_mean > 10 * max(std, abs(mean))  # discs vs squares: far from zero


def mixture(n: int, modes: list[int], dims: int = 4, seed: int = 0) -> np.ndarray:
    """n points of a mixture of 10 well separated unit Gaussians, drawn from `modes` only."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(0, 10, (10, dims))
    picks = rng.choice(modes, n)
    return centres[picks] + rng.normal(0, 1, (n, dims))


def test_precision_recall_self_and_half_the_modes():
    real = mixture(1000, list(range(10)), seed=1)
    assert precision_recall(real, real) == (1.0, 1.0)
    same = precision_recall(real, mixture(1000, list(range(10)), seed=3))  # a new sample of the same data
    assert min(same) > 0.88, same
    half = mixture(1000, list(range(5)), seed=2)  # only modes 0-4: faithful but half the coverage
    precision, recall = precision_recall(real, half)
    assert precision > 0.88, precision
    assert 0.4 < recall < 0.55, recall
    precision2, recall2 = precision_recall(half, real)  # the other way round swaps the two
    assert 0.4 < precision2 < 0.55 and recall2 > 0.88, (precision2, recall2)


# ----------------------------------------------------------------------------- evaluate(): sides, cache, floor
def test_evaluate_tensor_against_folder_uses_the_cache_and_invalidates_it(tmp_path, caplog):
    folder = save_folder(shapes(24, "disc", size=16, seed=3), tmp_path / "data")
    features = PixelFeatures()
    fake = shapes(20, "square", size=16, seed=4)
    same = dict(dataset=str(folder), cache_dir=tmp_path / "cache", features=features, progress=False,
                kid_subset_size=10)
    first = evaluate(images=fake, num_images=20, **same)
    assert features.calls == [20, 20] and first.settings["reference_cache"] == "computed"
    again = evaluate(images=fake, num_images=20, **same)
    assert features.calls == [20, 20, 20]  # only the generated side: the reference came from the cache
    assert again.settings["reference_cache"] == "reused" and again.fid == pytest.approx(first.fid, rel=1e-12)
    # another count (the folder's first 16 of the tensor's 20 images -> 16 reference images) recomputes
    other_count = evaluate(images=fake[:16], **same)
    assert features.calls[-2:] == [16, 16] and other_count.settings["reference_cache"] == "computed"
    # another size recomputes too
    other_size = evaluate(images=fake, num_images=20, image_size=8, **same)
    assert features.calls[-2:] == [20, 20] and other_size.settings["reference_cache"] == "computed"
    # a changed dataset (one image replaced) recomputes: the reference of the first call is not reused
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(sorted(folder.glob("*.png"))[0])
    changed = evaluate(images=fake, num_images=20, **same)
    assert features.calls[-2:] == [20, 20] and changed.settings["reference_cache"] == "computed"
    assert changed.fid != pytest.approx(first.fid, rel=1e-9)  # the new reference's figure, not the cached one's
    # a corrupt cache file is recomputed with a warning, never trusted
    for path in (tmp_path / "cache" / "eval").glob("features-*.npz"):
        path.write_bytes(path.read_bytes()[:100])
    caplog.set_level(logging.WARNING)
    redo = evaluate(images=fake, num_images=20, **same)
    assert features.calls[-2:] == [20, 20] and "corrupt" in caplog.text
    assert redo.settings["reference_cache"] == "computed"


def test_cache_entry_with_flipped_bytes_is_not_trusted(tmp_path):
    cache = FeatureCache(tmp_path)
    image_set = ImageSet(shapes(4, "disc", size=8), describe={"dataset": "x", "image_size": 8})
    identity = PixelFeatures().identity
    feats = np.arange(4 * 16, dtype=np.float32).reshape(4, 16)
    path = cache.save(image_set, identity, feats)
    assert np.array_equal(cache.load(image_set, identity), feats)
    with np.load(path) as blob:
        tampered = blob["features"].copy()
        meta = blob["meta"]
    tampered[0, 0] += 1
    np.savez(path, features=tampered, meta=meta)
    assert cache.load(image_set, identity) is None


def test_floor_is_disjoint_recorded_and_printed_beside_a_later_figure(tmp_path):
    folder = save_folder(shapes(40, "disc", size=16, seed=5), tmp_path / "data")
    features = PixelFeatures()
    a = evaluation.dataset_images(str(folder), 16, count=None, split_fraction=0.5, part="a")
    b = evaluation.dataset_images(str(folder), 16, count=None, split_fraction=0.5, part="b")
    rows = lambda s: {bytes(x.numpy()) for x in s.images}  # noqa: E731
    assert len(a) == len(b) == 20 and not rows(a) & rows(b)  # disjoint by construction
    floor = evaluate(vs_dataset=str(folder), dataset=str(folder), split_fraction=0.5, num_images=20, image_size=16,
                     cache_dir=tmp_path / "cache", features=features, progress=False, kid_subset_size=10)
    assert floor.num_generated == floor.num_reference == 20 and floor.settings["is_floor"]
    later = evaluate(images=shapes(20, "square", size=16), dataset=str(folder), cache_dir=tmp_path / "cache",
                     features=features, progress=False, kid_subset_size=10)
    assert later.floor is not None and later.floor["fid"] == pytest.approx(floor.fid)
    assert "floor" in later.lines()[0] and f"{floor.fid:.2f}" in later.lines()[0]
    other_count = evaluate(images=shapes(10, "square", size=16), dataset=str(folder), cache_dir=tmp_path / "cache",
                           features=features, progress=False, kid_subset_size=5)
    assert other_count.floor is None and "not known" in other_count.lines()[0]
    measured = evaluate(images=shapes(10, "square", size=16), dataset=str(folder), cache_dir=tmp_path / "cache",
                        features=features, progress=False, kid_subset_size=5, floor=True)
    assert measured.floor is not None and measured.floor["count"] == 10
    small = save_folder(shapes(6, "disc", size=16, seed=6), tmp_path / "six")  # halves of 3: too few for a floor
    no_floor = evaluate(images=shapes(4, "square", size=16), dataset=str(small), cache_dir=tmp_path / "cache",
                        features=features, progress=False, kid_subset_size=2, floor=True)
    assert no_floor.floor is None and no_floor.num_reference == 4 and "not known" in no_floor.lines()[0]


def test_shipped_floors_are_added_by_one_function_and_printed_beside_a_figure(tmp_path, monkeypatch):
    from ddpmkit.evaluation import cache

    folder = save_folder(shapes(20, "disc", size=16, seed=5), tmp_path / "data")
    features = PixelFeatures()
    shipped = tmp_path / "eval_floors.json"
    shipped.write_text(json.dumps({"other|train|32px|3ch|10|x|y": {"fid": 1.0}}))
    key = evaluation.floor_key(str(folder), 16, 3, 10, "train", features.identity)
    entry = evaluation.floor_entry(evaluation.Metrics(9.5, 0.001, 0.0005, 0.8, 0.7), 10, 0.5, "2026-01-01")
    assert evaluation.write_shipped_floors({key: entry}, shipped) == shipped
    assert json.loads(shipped.read_text()) == {"other|train|32px|3ch|10|x|y": {"fid": 1.0}, key: entry}
    monkeypatch.setattr(cache, "FLOORS_FILE", shipped)
    result = evaluate(images=shapes(10, "square", size=16), dataset=str(folder), cache_dir=tmp_path / "cache",
                      features=features, progress=False, kid_subset_size=5)
    assert result.floor == entry and "(floor 9.50: two disjoint samples" in result.lines()[0]


def test_model_evaluation_records_what_reproduces_it(tmp_path):
    pipe = save_plain_pipeline(tmp_path / "pipe", sample_size=8)
    folder = save_folder(shapes(12, "disc", size=8), tmp_path / "data")
    features = PixelFeatures()
    sampler = SamplerSettings(scheduler="ddim", steps=3, batch_size=5)
    result = evaluate(str(pipe), dataset=str(folder), num_images=12, sampler=sampler, seed=7,
                      cache_dir=tmp_path / "cache", features=features, progress=False, kid_subset_size=6)
    model = result.settings["model"]
    assert (model["scheduler"], model["steps"], model["seed"], model["batch_size"], model["nfe"]) == ("ddim", 3, 7, 5, 3)
    assert len(model["weights_sha256"]) == 64 and model["name"] == str(pipe)
    assert result.settings["reference"]["count"] == 12 and result.settings["features"] == features.identity
    assert np.isfinite([result.fid, result.kid_mean, result.precision, result.recall]).all()
    again = evaluate(str(pipe), dataset=str(folder), num_images=12, sampler=sampler, seed=7,
                     cache_dir=tmp_path / "cache", features=features, progress=False, kid_subset_size=6)
    assert again.fid == result.fid  # same seed, same images, same figure
    saved = json.loads(result.save(tmp_path / "r.json").read_text())
    assert saved["fid"] == result.fid and saved["settings"]["model"]["weights_sha256"] == model["weights_sha256"]


def test_per_class_figures_of_a_class_conditioned_model(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = make_micro_unet(8, num_class_embeds=3)  # classes "discs", "squares" and the null class
    folder = tmp_path / "cc"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    write_meta(folder, {"class_names": ["discs", "squares"], "null_class": 2})
    data = tmp_path / "labelled"
    save_folder(shapes(10, "disc", size=8), data / "discs")
    save_folder(shapes(6, "square", size=8), data / "squares")
    ddim = SamplerSettings(scheduler="ddim", steps=2)
    result = evaluate(str(folder), dataset=str(data), label_column="label", per_class=True, sampler=ddim,
                      cache_dir=tmp_path / "cache", features=PixelFeatures(), progress=False, kid_subset_size=5)
    assert set(result.per_class) == {"discs", "squares"}
    assert (result.per_class["discs"]["num_reference"], result.per_class["squares"]["num_reference"]) == (10, 6)
    # FID needs as many images a side as the features have dimensions (192 here), KID 10: discs get a KID, squares
    # (6 a side) nothing
    discs, squares = result.per_class["discs"], result.per_class["squares"]
    assert discs["num_generated"] == 10 and discs["fid"] is None and discs["kid_mean"] is not None
    assert squares["fid"] is None and squares["kid_mean"] is None
    assert any(line.startswith("class      discs: KID") for line in result.lines())
    one = evaluate(str(folder), dataset=str(data), label_column="label", class_label="squares", sampler=ddim,
                   cache_dir=tmp_path / "cache", features=PixelFeatures(), progress=False, kid_subset_size=5)
    assert one.num_reference == 6 and one.num_generated == 6 and one.settings["model"]["class_labels"] == [1]


# ----------------------------------------------------------------------------- the command
def test_eval_command_on_the_real_network_prints_one_line_per_figure(tmp_path, capsys):
    pipe = save_plain_pipeline(tmp_path / "pipe", sample_size=8)
    folder = save_folder(shapes(8, "disc", size=8), tmp_path / "data")
    out = tmp_path / "results.json"
    code = main(["-q", "eval", "--model", str(pipe), "--dataset", str(folder), "--num_images", "8", "--scheduler",
                 "ddim", "--steps", "2", "--cache_dir", str(tmp_path / "cache"), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["FID", "KID", "precision", "recall", "images", "time"]
    assert "8 evaluated, 8 reference" in lines[4]
    assert "sampling" not in captured.err and "features" not in captured.err  # -q: no progress bars
    saved = json.loads(out.read_text())
    assert saved["settings"]["features"]["file"] == "default_1.pt" and saved["num_generated"] == 8
    assert saved["settings"]["features"]["resize"] == evaluation.RESIZE_METHOD


@pytest.mark.parametrize("argv, expected", [
    (["--images", "EMPTY", "--dataset", "DATA"], "no images in folder"),
    (["--model", "/no/such/model", "--dataset", "DATA"], "does not exist"),
    (["--images", "DATA", "--dataset", "DATA", "--num_images", "1"], "--num_images must be at least 4"),
    # 3 passed FID's check and failed precision/recall's after sampling and features: now before anything runs
    (["--model", "PIPE", "--dataset", "DATA", "--num_images", "3"], "--num_images must be at least 4"),
    (["--images", "DATA", "--dataset", "ONE"], "has 3 images: FID, precision and recall need at least 4"),
    (["--images", "ONE", "--dataset", "DATA"], "need at least 4 images on each side (got 3 to evaluate)"),
    (["--vs_dataset", "DATA", "--dataset", "DATA"], "--split_fraction"),
    (["--vs_dataset", "DATA", "--dataset", "DATA", "--split_fraction", "1.5"], "between 0 and 1"),
    (["--images", "DATA", "--dataset", "DATA", "--out", "r.txt"], "must end in .json"),
    (["--images", "DATA", "--dataset", "DATA", "--per_class"], "need --model"),
    (["--images", "PIPE", "--dataset", "DATA"], "is a pipeline folder, not a folder of images: use --model"),
    (["--model", "PIPE", "--dataset", "DATA", "--per_class"], "class-conditioned"),
    (["--model", "PIPE", "--dataset", "DATA", "--steps", "0"], "at least 1"),
    (["--model", "PIPE", "--images", "DATA", "--dataset", "DATA"], "not allowed with"),
    (["--images", "DATA", "--vs_dataset", "DATA", "--dataset", "DATA"], "not allowed with"),
])
def test_eval_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    (tmp_path / "empty").mkdir()
    save_folder(shapes(6, "disc", size=8), tmp_path / "data")
    save_folder(shapes(3, "disc", size=8), tmp_path / "one")  # one short of the 4 that precision/recall need
    save_plain_pipeline(tmp_path / "pipe", sample_size=8)
    names = {"EMPTY": tmp_path / "empty", "DATA": tmp_path / "data", "ONE": tmp_path / "one", "PIPE": tmp_path / "pipe"}
    argv = [str(names.get(a, a)) for a in argv]
    code = main(["-q", "eval", *argv, "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err and expected in err, err


def test_missing_extra_is_one_line(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == evaluation.FEATURE_PACKAGE else real(name, *a))
    save_folder(shapes(4, "disc", size=8), tmp_path / "data")
    code = main(["eval", "--images", str(tmp_path / "data"), "--dataset", str(tmp_path / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'ddpmkit[eval]'" in err


def test_eval_result_lines_name_every_figure():
    floor = {"fid": 17.2, "kid_mean": 0.00003, "kid_std": 0.0001, "precision": 0.875, "recall": 0.866, "count": 100}
    per_class = {"flags": {"fid": 40.5, "kid_mean": 0.0123, "kid_std": 0.0011, "num_generated": 60,
                           "num_reference": 60},
                 "rare": {"fid": None, "kid_mean": None, "kid_std": None, "num_generated": 1, "num_reference": 1}}
    reference = {"reference": {"dataset": "emoji", "image_size": 32}}
    result = EvalResult(12.3456, 0.01, 0.002, 0.7, 0.6, 100, 100, 3.0, floor=floor, per_class=per_class,
                        settings=reference, timings={"features": 2.0, "metrics": 0.5})
    assert result.lines() == [
        "FID        12.346   (floor 17.20: two disjoint samples of emoji at 100 images)",
        "KID        0.01000 ± 0.00200   (floor 0.00003)",
        "precision  0.700   (floor 0.875)",
        "recall     0.600   (floor 0.866)",
        "images     100 evaluated, 100 reference (emoji, 32x32)",
        "class      flags: FID 40.50, KID 0.0123 ± 0.0011 (60 vs 60 images)",
        "class      rare: too few images for a figure (1 vs 1)",
        "time       3.0 s (features 2.0 s, metrics 0.5 s)"]
    # no floor: the figures alone, and the FID line says why there is none
    unknown = EvalResult(12.3456, 0.01, 0.002, 0.7, 0.6, 100, 100, 3.0, settings=reference, timings={"features": 2.0})
    assert unknown.lines()[:4] == [
        "FID        12.346   (floor: not known for this dataset, size and count; measure it with --floor)",
        "KID        0.01000 ± 0.00200", "precision  0.700", "recall     0.600"]
    is_floor = EvalResult(17.2, 0.0, 0.0, 0.9, 0.9, 100, 100, 1.0, settings={**reference, "is_floor": True})
    assert is_floor.lines()[0] == ("FID        17.200   (this is the floor: two disjoint samples of emoji; recorded "
                                   "for later runs at 100 images)")
    one_class = EvalResult(50.0, 0.1, 0.01, 0.5, 0.5, 6, 6, 1.0, settings={
        "reference": {"dataset": "emoji", "image_size": 32, "class": "flags"}, "model": {"class_labels": [1]}})
    assert one_class.lines()[0] == "FID        50.000   (one class: no floor)"
    with pytest.raises(UserError, match="at least 4 images"):
        evaluate(images=torch.zeros(3, 3, 8, 8, dtype=torch.uint8), dataset="emoji", features=PixelFeatures())


def test_images_folder_skips_a_decompression_bomb_and_a_truncated_file_in_one_line(tmp_path, capsys, caplog):
    """An --images folder is read by the opener training uses: bad files (here sorted first, so that the size
    probe meets them first) are skipped and named in one line; a folder of nothing else is one error line."""
    from test_bad_images import _png_bomb

    folder = tmp_path / "images"
    save_folder(shapes(8, "square", size=16, seed=6), folder / "z")
    _png_bomb(folder / "a_bomb.png", 12_000)  # 144 Mpx: over Pillow's limit, where Pillow itself only warns
    _png_bomb(folder / "b_bomb_huge.png", 20_000)  # 400 Mpx: where Pillow raises DecompressionBombError
    png = (folder / "z" / "0000.png").read_bytes()
    (folder / "c_truncated.png").write_bytes(png[:len(png) // 2])
    (folder / "d_text.png").write_text("this is not a picture\n")
    data = save_folder(shapes(12, "disc", size=16), tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="ddpmkit"):
        result = evaluate(images=str(folder), dataset=str(data), cache_dir=tmp_path / "cache",
                          features=PixelFeatures(), progress=False, kid_subset_size=4)
    assert result.num_generated == 8 and result.settings["images"]["skipped"] == 4
    assert result.settings["images"]["image_size"] == 16  # the first usable image's size, not a bomb's
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "skipped 4 of 12 images" in warnings[0], warnings

    for good in (folder / "z").iterdir():
        good.unlink()
    code = main(["-q", "eval", "--images", str(folder), "--dataset", str(data), "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err and "no readable image" in err, err
