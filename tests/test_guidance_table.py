"""benchmarks/guidance_table.py's table: one line per row against plain at the same sampler, and rows measured on
another machine named under it (the table mixes rows measured on an AVX2 CPU in fp32 and an AVX-512 one in bf16)."""
from __future__ import annotations

from conftest import load_benchmark


def row(row_id, what, scheduler, fid, guide_calls=0, machine=None):
    r = {"row": row_id, "what": what, "settings": {"scheduler": scheduler}, "fid": fid, "kid_mean": 0.02,
         "kid_std": 0.001, "precision": 0.3, "recall": 0.4, "nfe": 79, "guide_calls": guide_calls,
         "floor": {"fid": 31.88}}
    return {**r, "machine": machine} if machine else r


def test_rows_against_plain_at_their_sampler_and_the_machines_named(tmp_path):
    table = load_benchmark("guidance_table")
    results = {"num_images": 1000, "cpu": "AMD EPYC", "date": "2026-12-03T00:00:00+00:00", "rows": {
        "plain-sde": row("plain-sde", "plain", "dpm++sde", 90.0),
        "ag2-sde": row("ag2-sde", "autoguidance 2", "dpm++sde", 67.5, 79),
        "ag2.5-sde": row("ag2.5-sde", "autoguidance 2.5", "dpm++sde", 72.0, 79, machine="CPU B, native bf16"),
        "plain-deis": row("plain-deis", "plain", "deis", 120.0)}}
    table.write_markdown(results, tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "floor at this count: FID 31.88. AMD EPYC, 2026-12-03" in text
    assert "| ag2-sde | autoguidance 2 | dpm++sde | 79 + 79 | 67.5 | 0.75 |" in text
    assert "| ag2.5-sde | autoguidance 2.5 | dpm++sde | 79 + 79 | 72.0 | 0.80 |" in text
    assert "| plain-deis | plain | deis | 79 | 120.0 | 1.00 |" in text
    assert text.rstrip().endswith("(the others: the head's): CPU B, native bf16: ag2.5-sde")
