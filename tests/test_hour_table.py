"""benchmarks/hour_table.py: the hour runs' comparison tables from `ddpmkit eval --out` JSONs (ratios against plain,
best row last, the time-to-quality table and plot from the mNN-plain / mNN-best rows, a missing row left out)."""
from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


def eval_json(fid, kid=0.1, guide=None, scale=None, name="runs/x", scheduler="deis", steps=15, seed=0,
              interval=None):
    sampler = {"scheduler": scheduler, "steps": steps}
    if guide:
        sampler.update(autoguide=guide, autoguide_scale=scale)
    if interval:
        sampler["guidance_interval"] = interval
    return {"fid": fid, "kid_mean": kid, "kid_std": 0.002, "precision": 0.1, "recall": 0.2,
            "floor": {"fid": 52.3},
            "settings": {"model": {"name": name, "sampler": sampler, "nfe": steps, "seed": seed,
                                   "guide_calls": steps if guide else 0}}}


def test_table_and_curve(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    rows = {"plain": eval_json(200.0, 0.15), "ag": eval_json(125.0, 0.06, guide="runs/x/step_5", scale=2.5),
            "m15-plain": eval_json(300.0), "m15-best": eval_json(240.0), "m60-best": eval_json(125.0),
            "m30-plain": eval_json(250.0)}  # m30 has no best row: left out of the curve
    for name, r in rows.items():
        (out / f"{name}.json").write_text(json.dumps(r))
    (out / "m60-plain.json").symlink_to("plain.json")
    load_benchmark("hour_table").main(str(out), "Title", "note;")
    text = (tmp_path / "cmp.md").read_text()
    assert text.startswith("# Title\n\nnote; `ddpmkit eval")
    assert "floor at 500 images: FID 52.3" in text
    main = [line for line in text.splitlines() if line.startswith("| plain |") or line.startswith("| ag |")]
    assert main[0].startswith("| plain |") and "| 200.0 | 1.00 |" in main[0]  # worst first
    assert "| runs/x/step_5 | 2.5 | deis 15 | 15 + 15 | 125.0 | 1.60 |" in main[1]
    assert "| m15-" not in text and "| m60-" not in text  # the curve rows stay out of the main table
    assert "| 15 | 300.0 | 240.0 | 1.25 |" in text
    assert "| 60 | 200.0 | 125.0 | 1.60 |" in text
    assert "| 30 |" not in text
    assert (tmp_path / "cmp.png").stat().st_size > 1000  # the curve's plot


def test_a_second_curve_at_the_sde_sampler(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    sde = {"scheduler": "dpm++sde", "steps": 40}
    rows = {"m15-plain": eval_json(300.0), "m15-best": eval_json(240.0),
            "m15-plain-sde": eval_json(250.0, **sde), "m15-best-sde": eval_json(125.0, **sde),
            "m60-plain-sde": eval_json(160.0, **sde), "m60-best-sde": eval_json(100.0, **sde)}
    for name, r in rows.items():
        (out / f"{name}.json").write_text(json.dumps(r))
    load_benchmark("hour_table").main(str(out), "Title")
    text = (tmp_path / "cmp.md").read_text()
    deis, sde_part = text.split("at each point (deis 15)")[1].split("at each point (dpm++sde 40)")
    assert "| 15 | 300.0 | 240.0 | 1.25 |" in deis and "| 60 |" not in deis
    assert "| 15 | 250.0 | 125.0 | 2.00 |" in sde_part and "| 60 | 160.0 | 100.0 | 1.60 |" in sde_part
    assert "| m15-" not in text and "| m60-" not in text  # neither curve's rows go in the main table
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_no_curve_without_points(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "plain.json").write_text(json.dumps(eval_json(200.0)))
    (out / "m15-plain.json").write_text(json.dumps(eval_json(300.0)))  # no m15-best: no point
    load_benchmark("hour_table").main(str(out), "Title")
    assert "Time to quality" not in (tmp_path / "cmp.md").read_text()
    assert not (tmp_path / "cmp.png").exists()


def test_no_rows(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no row in"):
        load_benchmark("hour_table").main(str(tmp_path / "empty"), "Title")


def test_ratio_against_plain_at_the_same_sampler_and_seed(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    rows = {"plain": eval_json(200.0), "plain-sde": eval_json(150.0, scheduler="dpm++sde", steps=40),
            "plain-seed1": eval_json(210.0, seed=1),
            "ag": eval_json(125.0, guide="g", scale=2.5),
            "ag-sde": eval_json(100.0, guide="g", scale=2.5, scheduler="dpm++sde", steps=40),
            "ag-seed1": eval_json(140.0, guide="g", scale=2.5, seed=1),
            "ag-interval": eval_json(160.0, guide="g", scale=2.5, interval="sigma in (0.28, 5.42]"),
            "ag-unipc": eval_json(120.0, guide="g", scale=2.5, scheduler="unipc")}  # no plain at unipc
    for name, r in rows.items():
        (out / f"{name}.json").write_text(json.dumps(r))
    load_benchmark("hour_table").main(str(out), "Title")
    lines = {line.split(" | ")[0][2:]: line for line in (tmp_path / "cmp.md").read_text().splitlines()
             if line.startswith("| ")}
    assert "| g | 2.5 | deis 15 | 15 + 15 | 125.0 | 1.60 |" in lines["ag"]
    assert "| g | 2.5 | dpm++sde 40 | 40 + 40 | 100.0 | 1.50 |" in lines["ag-sde"]  # against plain-sde, not plain
    assert "| deis 15, seed 1 | 15 + 15 | 140.0 | 1.50 |" in lines["ag-seed1"]
    assert "| g in sigma in (0.28, 5.42] | 2.5 |" in lines["ag-interval"]
    assert "| 120.0 | - |" in lines["ag-unipc"]
