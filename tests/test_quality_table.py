"""benchmarks/quality_per_step.py end to end on a micro class-conditioned model: two rows of 20 images, the real FID
Inception, model calls counted on the UNet, a plot, and a second run that keeps the rows already measured."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark, make_micro_unet
from PIL import Image

from ddpmkit.runs import write_meta


@pytest.fixture
def micro_model(tmp_path) -> tuple[Path, Path]:
    """A class-conditioned micro pipeline (2 classes + the null class) and the labelled folder it 'was trained on'."""
    from diffusers import DDPMPipeline, DDPMScheduler

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name, n in (("discs", 12), ("squares", 12)):
        (data / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / name / f"{i}.png")
    folder = tmp_path / "model"
    DDPMPipeline(unet=make_micro_unet(8, num_class_embeds=3),
                 scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(folder)
    write_meta(folder, {"class_names": ["discs", "squares"], "null_class": 2, "dataset": str(data)})
    return folder, data


@pytest.mark.slow
def test_quality_table_runs_two_rows_and_resumes(micro_model, tmp_path, caplog):
    script = load_benchmark("quality_per_step")
    model, _ = micro_model
    argv = ["--model", str(model), "--label_column", "label", "--num_images", "20", "--rows", "ddim-10,heun-karras-30",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--plot", str(tmp_path / "q.png"),
            "--cache_dir", str(tmp_path / "cache"), "--docs", "", "--no_ship", "--quiet"]
    assert script.main(argv) == 0
    result = json.loads((tmp_path / "out" / "quality_per_step.json").read_text())
    rows = {row["row"]: row for row in result["rows"]}
    assert list(rows) == ["ddim-10", "heun-karras-30"] and result["partial"] and result["per_class"]
    assert rows["ddim-10"]["nfe"] == 10 and rows["heun-karras-30"]["nfe"] == 59  # counted on the UNet: 2N - 1
    assert rows["heun-karras-30"]["options"]["karras"] and rows["heun-karras-30"]["label"].startswith("heun karras")
    for row in rows.values():
        assert np.isfinite(row["fid"]) and set(row["per_class"]) == {"discs", "squares"}
    assert (tmp_path / "q.png").stat().st_size > 10_000
    table = (tmp_path / "out" / "quality_per_step.md").read_text()
    assert "| ddim-10 | ddim, 10 steps | 10 |" in table and "heun-karras-30" in table
    kept = sorted((tmp_path / "runs").rglob("*.json"))
    assert len(kept) == 2
    before = {path: path.stat().st_mtime_ns for path in kept}
    caplog.set_level("INFO")
    assert script.main(argv) == 0  # the same command again: both rows kept, nothing sampled
    assert {path: path.stat().st_mtime_ns for path in kept} == before and caplog.text.count("kept from") == 2
    again = json.loads((tmp_path / "out" / "quality_per_step.json").read_text())
    assert [row["fid"] for row in again["rows"]] == [row["fid"] for row in result["rows"]]


@pytest.mark.slow
@pytest.mark.long  # left out of make test for its time (make test-long, CI)
def test_rows_sampled_on_one_machine_and_evaluated_on_another_give_the_same_figures(micro_model, tmp_path):
    """--samples DIR --sample_only keeps each row's images (no Inception needed: a GPU machine); the same command
    without --sample_only evaluates them against the same reference, so the FID equals sampling and evaluating here."""
    script = load_benchmark("quality_per_step")
    model, _ = micro_model
    common = ["--model", str(model), "--label_column", "label", "--num_images", "20", "--rows", "ddim-10",
              "--cache_dir", str(tmp_path / "cache"), "--docs", "", "--no_ship", "--quiet",
              "--plot", str(tmp_path / "q.png")]
    assert script.main(common + ["--runs", str(tmp_path / "direct"), "--out", str(tmp_path / "direct_out")]) == 0
    samples = tmp_path / "samples"
    assert script.main(common + ["--runs", str(tmp_path / "split"), "--out", str(tmp_path / "split_out"),
                                 "--samples", str(samples), "--sample_only"]) == 0
    assert [p.name for p in samples.iterdir()] == ["ddim-10-steps.pt"] and not (tmp_path / "split_out").exists()
    assert script.main(common + ["--runs", str(tmp_path / "split"), "--out", str(tmp_path / "split_out"),
                                 "--samples", str(samples)]) == 0
    direct, split = (json.loads((tmp_path / d / "quality_per_step.json").read_text())["rows"][0]
                     for d in ("direct_out", "split_out"))
    assert split["fid"] == pytest.approx(direct["fid"], rel=1e-6) and split["nfe"] == direct["nfe"] == 10
    assert split["kid_mean"] == pytest.approx(direct["kid_mean"], rel=1e-6) and split["sampled_on"].startswith("cpu")
