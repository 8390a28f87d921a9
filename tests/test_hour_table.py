"""benchmarks/hour_table.py: the hour runs' comparison tables from `ddpmkit eval --out` JSONs (ratios against plain,
best row last, the time-to-quality table and plot from the mNN-plain / mNN-best rows, a missing row left out)."""
from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


def eval_json(fid, kid=0.1, guide=None, scale=None, name="runs/x"):
    sampler = {"scheduler": "deis", "steps": 15}
    if guide:
        sampler.update(autoguide=guide, autoguide_scale=scale)
    return {"fid": fid, "kid_mean": kid, "kid_std": 0.002, "precision": 0.1, "recall": 0.2,
            "floor": {"fid": 52.3},
            "settings": {"model": {"name": name, "sampler": sampler, "nfe": 15, "guide_calls": 15 if guide else 0}}}


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
    assert "| runs/x/step_5 | 2.5 | 15 + 15 | 125.0 | 1.60 |" in main[1]
    assert "| m15-" not in text and "| m60-" not in text  # the curve rows stay out of the main table
    assert "| 15 | 300.0 | 240.0 | 1.25 |" in text
    assert "| 60 | 200.0 | 125.0 | 1.60 |" in text
    assert "| 30 |" not in text
    assert (tmp_path / "cmp.png").stat().st_size > 1000  # the curve's plot


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
