"""`ddpmkit eval --nearest K` (evaluation.nearest): a model that returns its training images is flagged in both
spaces, random images and new images from the data are not, mirrored copies are found in pixels, the training set is
the one the model trained on, the rule's edge is strict, duplicates in the data cannot set the bar to 0, and the CLI
writes the grid and the JSON."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_plain_pipeline
from PIL import Image
from test_evaluation import PixelFeatures, save_folder, shapes

from ddpmkit.cli import main
from ddpmkit.evaluation import copy_threshold, evaluate, is_copy, nearest_lines
from ddpmkit.evaluation.nearest import COPY_PERCENTILE, space_neighbours
from ddpmkit.oracle import GaussianMixture, oracle_pipeline
from ddpmkit.runs import write_meta
from ddpmkit.sampling import SamplerSettings, sample


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """40 discs at 8x8 in a folder, and the same images as a tensor (the order the folder is read in)."""
    images = shapes(40, "disc", size=8, seed=3)
    return save_folder(images, tmp_path_factory.mktemp("nearest") / "data"), images


def _evaluate(images, folder: Path, tmp_path: Path, **kw):
    return evaluate(images=images, dataset=str(folder), features=PixelFeatures(), cache_dir=tmp_path / "cache",
                    progress=False, kid_subset_size=8, nearest=kw.pop("nearest", 3), **kw)


def test_training_images_returned_exactly_are_copies_and_random_images_are_not(data, tmp_path):
    folder, images = data
    copied = _evaluate(images[:20], folder, tmp_path, nearest_grid=tmp_path / "copies.png").nearest
    for space in ("inception", "pixels"):
        assert copied[space]["copies"] == 20 and copied[space]["share"] == 1.0
        # each copy's nearest training image is itself, at distance 0 (float rounding of the matrix product)
        assert [row[0] for row in copied[space]["nearest_index"]] == list(range(20))
        assert max(row[0] for row in copied[space]["nearest_distance"]) < 1e-6 * copied[space]["threshold"] + 1e-6
    assert Image.open(tmp_path / "copies.png").size[1] == 16 * (8 + 2 + 2) * 2  # 16 rows of 8x8 images, padded, x2
    noise = torch.randint(0, 256, (20, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    random = _evaluate(noise, folder, tmp_path).nearest
    assert random["inception"]["copies"] == 0 and random["pixels"]["copies"] == 0
    # the random images are far beyond the bar: their median nearest distance is ~3 times the training set's own
    assert random["pixels"]["median_nearest"] > 2 * random["pixels"]["train_median_nearest"]


def test_more_neighbours_than_training_images_shows_them_all_and_says_so(data, tmp_path):
    """--nearest 50 against 40 training images: the 40 there are, named as 40 in the result and its lines (the
    lines said '50 nearest')."""
    folder, images = data
    found = _evaluate(images[:4], folder, tmp_path, nearest=50).nearest
    assert found["k"] == 40 and all(len(row) == 40 for row in found["pixels"]["nearest_index"])
    assert "the 40 nearest of 40 training images" in nearest_lines(found)[0]


def test_new_images_from_the_data_are_copies_about_as_often_as_the_percentile(tmp_path):
    """The bar is calibrated on the data: 400 held-out discs against 400 training discs fall below it ~1% of the time."""
    train = shapes(400, "disc", size=8, seed=10)
    held_out = shapes(400, "disc", size=8, seed=11)
    rows = lambda x: (x.reshape(len(x), -1).double() / 255).numpy()  # noqa: E731
    found = space_neighbours(rows(held_out), rows(train), k=1)
    assert found.copies.mean() <= 0.04  # expected 0.01; a model-free fluke of a few percent at most
    assert found.threshold > 0 and found.threshold == pytest.approx(np.percentile(found.train_nn, COPY_PERCENTILE))


def test_a_memorizing_model_is_flagged(data, tmp_path):
    """The exact denoiser of six training images themselves (a mixture of near-deltas: the ideal memorizer)
    samples copies; --nearest finds them and names the training images they copy. (Its samples are handed over as
    images: `weights_sha256` cannot hash the oracle's 0-dim buffer.)"""
    folder, images = data
    templates = (images[:6].double() / 127.5 - 1)
    pipe = oracle_pipeline(mixture=GaussianMixture(templates, torch.full((6,), 1 / 6, dtype=torch.float64), 0.002),
                           num_train_timesteps=100)
    samples = sample(pipe, scheduler="ddim", steps=20, num_images=12, seed=0, dtype="fp32", progress=False).images
    result = _evaluate(samples, folder, tmp_path, nearest=2)
    pixels = result.nearest["pixels"]
    assert pixels["share"] == 1.0 and {row[0] for row in pixels["nearest_index"]} <= set(range(6))
    assert result.nearest["inception"]["share"] == 1.0
    assert result.nearest["training_set"] == {"dataset": str(folder), "image_size": 8, "channels": 3, "count": 40,
                                              "chosen": "all", "flips": True, "split": "train"}


def test_mirrored_copies_are_found_in_pixels(data, tmp_path):
    folder, images = data
    found = _evaluate(images[:10].flip(-1), folder, tmp_path).nearest["pixels"]
    assert found["copies"] == 10 and all(row[0] for row in found["nearest_flipped"])
    assert [row[0] for row in found["nearest_index"]] == list(range(10))


def test_the_training_set_is_the_one_the_model_trained_on(data, tmp_path):
    """A model trained on the first 5 images (--max_images 5) is searched against those 5, not the folder's 40."""
    folder, images = data
    pipe = save_plain_pipeline(tmp_path / "pipe", sample_size=8)
    write_meta(pipe, {"dataset": str(folder), "train_config": {"dataset": str(folder), "max_images": 5,
                                                               "random_flip": False}})
    result = evaluate(pipe, dataset=str(folder), num_images=6, features=PixelFeatures(), progress=False,
                      cache_dir=tmp_path / "cache", kid_subset_size=3, nearest=1,
                      sampler=SamplerSettings(scheduler="ddim", steps=2))
    t = result.nearest["training_set"]
    assert (t["count"], t["chosen"], t["flips"]) == (5, "the first 5, as trained", False)
    assert max(row[0] for row in result.nearest["pixels"]["nearest_index"]) < 5


def test_the_rule_is_strictly_below_the_percentile_and_duplicates_do_not_set_it():
    train_nn = np.array([0.2, 0.3, 0.4, 0.5, 0.6])
    bar = copy_threshold(train_nn)
    assert bar == pytest.approx(0.2 + 0.01 * 4 * 0.1)  # numpy's linear interpolation at the 1st percentile
    assert is_copy([bar, np.nextafter(bar, 0), 0.0], bar).tolist() == [False, True, True]
    # a training set with an exact duplicate: the duplicates are passed over, so the bar stays above 0
    train = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    found = space_neighbours(np.array([[0.0, 0.0], [1.0, 1.5]]), train, k=2)
    assert found.threshold == pytest.approx(np.percentile([1.0, 1.0, 1.0, 2.0], 1))
    assert found.copies.tolist() == [True, False]
    with pytest.raises(Exception, match="at least 2 training images"):
        copy_threshold(np.array([0.3]))


def test_lines_state_the_rule_and_both_spaces():
    found = {"k": 2, "rule": "RULE", "percentile": 1.0, "grid": "g.png",
             "training_set": {"dataset": "emoji", "count": 16, "chosen": "the first 16, as trained", "flips": True},
             "inception": {"share": 0.75, "copies": 3, "median_nearest": 1.5, "threshold": 4.0,
                           "train_median_nearest": 9.0, "nearest_index": [[0, 1]] * 4},
             "pixels": {"share": 0.5, "copies": 2, "median_nearest": 0.01, "threshold": 0.02,
                        "train_median_nearest": 0.1, "nearest_index": [[0, 1]] * 4}}
    lines = nearest_lines(found)
    assert [line.split()[0] for line in lines] == ["nearest", "copies", "copies", "rule", "grid"]
    assert "the 2 nearest of 16 training images (emoji, the first 16, as trained) and their mirror" in lines[0]
    assert lines[1].startswith("copies     75.0% in Inception (3 of 4)") and "bar 4" in lines[1]
    assert lines[2].startswith("copies     50.0% in pixels (2 of 4)")
    assert "RULE (about 1% of new images" in lines[3]


def test_eval_nearest_on_the_real_network_writes_the_grid_beside_out(data, tmp_path, capsys):
    _, images = data
    folder = save_folder(images[:10], tmp_path / "data")  # 10 training images: 20 images through the Inception
    made = save_folder(images[:5], tmp_path / "made")  # a "model" that returned 5 of them
    out = tmp_path / "results.json"
    code = main(["-q", "eval", "--images", str(made), "--dataset", str(folder), "--nearest", "2", "--out", str(out),
                 "--cache_dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["FID", "KID", "precision", "recall", "images", "nearest", "copies",
                                                   "copies", "rule", "grid", "time"]
    assert "100.0% in Inception (5 of 5)" in lines[6] and "100.0% in pixels (5 of 5)" in lines[7]
    saved = json.loads(out.read_text())["nearest"]
    assert saved["grid"] == str(tmp_path / "results_nearest.png") and Path(saved["grid"]).is_file()
    assert saved["inception"]["copies"] == 5 and saved["rule"].startswith("a generated image is a copy")


@pytest.mark.parametrize("argv, expected", [
    (["--vs_dataset", "DATA", "--split_fraction", "0.5", "--nearest", "2"], "not --vs_dataset"),
    (["--images", "DATA", "--nearest", "-1"], "--nearest must be 0"),
    (["--images", "DATA", "--nearest", "2", "--nearest_grid", "pairs.txt"], "--nearest_grid pairs.txt must end in"),
])
def test_nearest_mistakes_are_one_line_and_exit_2(data, tmp_path, capsys, argv, expected):
    folder, _ = data
    argv = [str(folder) if a == "DATA" else a for a in argv]
    code = main(["-q", "eval", "--dataset", str(folder), *argv, "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
