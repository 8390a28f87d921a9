"""CLIP guidance through `ddpmkit serve`'s Studio, with a tiny random CLIP placed in a Hugging Face cache of its own
under the default CLIP's name: the control turns on, a prompt changes the images, and the command the app shows
makes the same images with `ddpmkit sample`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_plain_pipeline
from PIL import Image
from test_guidance import tiny_clip

from ddpmkit.guidance import DEFAULT_CLIP_MODEL

STUDIO_SCRIPT = """
import json, sys
import torch
from ddpmkit.serve import Request, Studio

studio = Studio(sys.argv[1], None, output_dir=sys.argv[2])
print(json.dumps({"reason": studio.clip_reason}))
if studio.clip_reason is None:
    common = dict(model=studio.default_model, scheduler="ddim", steps=6, num_images=2, seed=3)
    plain = studio.run(Request(**common))
    guided = studio.run(Request(**common, clip_prompt="a red rose", clip_scale=60))
    print(json.dumps({"changed": float((guided.images - plain.images).abs().max()), "command": guided.command,
                      "grid": str(guided.grid)}))
"""


def fake_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding the tiny CLIP as DEFAULT_CLIP_MODEL, as 'hf download' lays it out."""
    commit = "0" * 40
    repo = root / f"models--{DEFAULT_CLIP_MODEL.replace('/', '--')}"
    tiny_clip(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


def env_with(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TQDM_DISABLE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def run_studio(model: Path, out: Path, env: dict) -> list[dict]:
    run = subprocess.run([sys.executable, "-c", STUDIO_SCRIPT, str(model), str(out)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


@pytest.mark.long  # left out of make test for its time (make test-long, CI)
def test_clip_prompt_in_the_app_guides_and_its_command_reproduces_it(tmp_path):
    model = save_plain_pipeline(tmp_path / "plain16", sample_size=16)
    env = env_with(fake_hub_cache(tmp_path / "hub"))
    first, result = run_studio(model, tmp_path / "studio", env)
    assert first["reason"] is None  # the weights are found in the cache: the prompt box is on
    assert result["changed"] > 0.01  # the prompt moved the images
    command = result["command"]
    assert "--guide 'clip:a red rose:60'" in command and "--out samples.png" in command
    work = tmp_path / "again"
    work.mkdir()
    run = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = np.asarray(Image.open(work / "samples.png"))
    app = np.asarray(Image.open(result["grid"]))
    assert ours.shape == app.shape and np.array_equal(ours, app)  # bit for bit
