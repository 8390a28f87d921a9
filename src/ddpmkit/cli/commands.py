"""One function per subcommand: check what only the command line can get wrong, call the library, print or log
what it made. A mistake raises `UserError` (one line, exit 2)."""
from __future__ import annotations

import logging
from pathlib import Path

from ddpmkit.cli.arguments import config_from_args
from ddpmkit.config import DEFAULT_MODEL, TrainConfig, check_seed
from ddpmkit.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cmd_train(args) -> int:
    from ddpmkit.trainer import train

    config = config_from_args(TrainConfig, args)
    path = train(config)
    logging.getLogger("ddpmkit").info("done: %s (sample it with: ddpmkit sample --model %s)", path, path)
    return 0


def _at_least(args, low: int, *names: str) -> None:
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
    _check_writable(out)
    return path


def _check_writable(out: str, flag: str = "--out") -> None:
    """The folder of the file `out` exists (it is made) and can be written, before the work that writes it."""
    from ddpmkit.runs import check_writable

    check_writable(Path(out).expanduser().parent, flag, given=out)


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
    from ddpmkit.devices import resolve_device
    from ddpmkit.guidance import build_guidance, write_guidance_log
    from ddpmkit.images import labelled_rows, save_grid, save_individual, save_trajectory
    from ddpmkit.models import load_pipeline, sampling_labels
    from ddpmkit.model_guidance import model_guidance
    from ddpmkit.sampling import sample
    from ddpmkit.schedulers import settings_label

    log = logging.getLogger("ddpmkit")
    out = _check_out(args.out)
    _at_least(args, 1, "steps", "num_images", "batch_size", "scale", "guidance_every", "n_cuts")
    _at_least(args, 0, "trajectory")  # --seed: checked by sample()
    device = resolve_device(args.device)
    guidance = build_guidance(args.guide, args.loss, args.guidance_method, args.guidance_every,
                              args.guidance_schedule, args.clip_model, args.n_cuts, args.seed)
    pipe = load_pipeline(args.model, device=device)
    cfg_scale = 1.0 if args.cfg_scale is None else args.cfg_scale
    class_rows, labels = sampling_labels(args.model, pipe.unet.config.num_class_embeds, args.class_label,
                                         cfg_scale, args.num_images)
    num_images = len(labels) if class_rows else (args.num_images or 16)
    guided, note = model_guidance(args.model, args.cfg_scale, args.autoguide, args.autoguide_scale,
                                  args.guidance_interval)
    if note:
        log.info(note)
    common = dict(num_images=num_images, batch_size=args.batch_size, seed=args.seed, guidance=guidance,
                  class_labels=labels, cfg_scale=cfg_scale, **guided, dtype=args.dtype,
                  channels_last=args.channels_last)
    options = dict(eta=args.eta, karras=args.karras, timestep_spacing=args.timestep_spacing,
                   solver_order=args.solver_order)
    if args.compare:
        return _sample_compare(args, pipe, out, common, options)
    result = sample(pipe, scheduler=args.scheduler, steps=args.steps, trajectory_every=args.trajectory, **common,
                    **options)
    if class_rows:
        labelled_rows(list(result.images.split(len(labels) // len(class_rows))), class_rows, out, scale=args.scale)
    else:
        save_grid(result.images, out, scale=args.scale)
    ran = result.settings
    second = f" + {result.guide_calls} of the {'guide' if guided['autoguide'] else 'unconditional half'}" \
        if result.guide_calls else ""
    log.info("wrote %s (%d images, %s, %d UNet calls per image%s)", out, num_images,
             settings_label(ran["scheduler"], ran, ran["steps"]), result.nfe, second)
    if guidance is not None:
        path = out.with_name(out.stem + "_guidance.json")
        spec = {"guide": args.guide, "loss": args.loss, "method": args.guidance_method, "every": args.guidance_every,
                "schedule": args.guidance_schedule}
        first_last = write_guidance_log(path, result.guidance_losses, spec)
        if first_last:
            log.info("guidance loss (mean per image) %.4f at the first guided step, %.4f at the last; per step in %s",
                     *first_last, path)
    if args.save_individual:
        folder = out.with_suffix("")
        save_individual(result.images, folder)
        log.info("wrote %d images to %s/", num_images, folder)
    if args.trajectory:
        path = out.with_name(out.stem + "_trajectory.png")
        save_trajectory(result.trajectory, path)
        log.info("wrote %s", path)
    return 0


def _sample_compare(args, pipe, out: Path, common: dict, options: dict) -> int:
    """--compare: one row per scheduler at the same seed (each at its defaults; the sampler flags apply to the row
    of --scheduler only)."""
    from ddpmkit.images import labelled_rows
    from ddpmkit.sampling import sample
    from ddpmkit.schedulers import settings_label

    log = logging.getLogger("ddpmkit")
    rows, row_labels = [], []
    for name, steps in parse_compare(args.compare):
        result = sample(pipe, scheduler=name, steps=steps, **common, **(options if name == args.scheduler else {}))
        rows.append(result.images)
        calls = f"{result.nfe} + {result.guide_calls}" if result.guide_calls else str(result.nfe)  # + CFG's / guide's
        row_labels.append(f"{settings_label(name, result.settings, result.settings['steps'])} ({calls} calls)")
        log.info("%s", row_labels[-1])
    labelled_rows(rows, row_labels, out, scale=args.scale)
    log.info("wrote %s", out)
    return 0


def cmd_eval(args) -> int:
    from ddpmkit.evaluation import evaluate
    from ddpmkit.evaluation.metrics import MIN_IMAGES
    from ddpmkit.models import trained_on
    from ddpmkit.model_guidance import model_guidance
    from ddpmkit.sampling import SamplerSettings

    _at_least(args, 1, "steps", "batch_size")
    _at_least(args, 2, "image_size")  # 0 is not read as "not given"
    _at_least(args, MIN_IMAGES, "num_images")  # FID's covariance, precision/recall's 3 nearest neighbours
    check_seed(args.seed)
    if args.out and not args.out.endswith(".json"):
        raise UserError(f"--out {args.out} must end in .json")
    if args.out:
        _check_writable(args.out)
    if args.sigma_rel is not None and args.model is None:
        raise UserError("--sigma_rel needs --model RUN: the folder of a run trained with --posthoc_ema")
    if args.model is None and args.images is None and args.vs_dataset is None:
        args.model = DEFAULT_MODEL
    if args.dataset is None:
        args.dataset = trained_on(args.model) if args.model else None
        if args.dataset is None:
            raise UserError("give --dataset: the reference images to compare with (e.g. --dataset emoji)")
    guided, note = model_guidance(args.model, args.cfg_scale, args.autoguide, args.autoguide_scale,
                                  args.guidance_interval)
    if note:
        logging.getLogger("ddpmkit").info(note)
    sampler = SamplerSettings(scheduler=args.scheduler, steps=args.steps, karras=args.karras,
                              timestep_spacing=args.timestep_spacing, solver_order=args.solver_order, dtype=args.dtype,
                              batch_size=args.batch_size, **guided)
    measure = evaluate
    if args.sigma_rel is not None:  # one evaluation per EMA length, reconstructed from the run's snapshots
        from functools import partial

        from ddpmkit.phema import sweep

        measure = partial(sweep, sigma_rels=args.sigma_rel)
    result = measure(args.model, images=args.images, vs_dataset=args.vs_dataset, dataset=args.dataset,
                     num_images=args.num_images, sampler=sampler, seed=args.seed, class_label=args.class_label,
                     cfg_scale=1.0 if args.cfg_scale is None else args.cfg_scale, per_class=args.per_class,
                     split=args.split,
                     split_fraction=args.split_fraction, image_size=args.image_size, image_column=args.image_column,
                     label_column=args.label_column, cache_dir=args.cache_dir, floor=args.floor, device=args.device,
                     resize=args.resize, progress=not args.quiet, **_nearest_options(args))
    for line in result.lines():
        print(line)
    if args.out:
        logging.getLogger("ddpmkit").info("wrote %s", result.save(args.out))
    return 0


def _nearest_options(args) -> dict:
    """--nearest K and where its grid goes (--nearest_grid, else beside --out, else nearest.png); {} without it."""
    if not args.nearest:
        return {}
    if args.sigma_rel is not None:
        raise UserError("--nearest looks for copies in one model at a time: drop --sigma_rel, or save that EMA with "
                        "'ddpmkit ema' and evaluate its folder")
    grid = args.nearest_grid or (str(Path(args.out).with_name(Path(args.out).stem + "_nearest.png")) if args.out
                                 else "nearest.png")
    if Path(grid).suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--nearest_grid {grid} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    _check_writable(grid, "--nearest_grid" if args.nearest_grid else "--out")
    return {"nearest": args.nearest, "nearest_grid": grid}


def cmd_ema(args) -> int:
    from ddpmkit.phema import describe, save_ema_pipeline

    _check_writable(args.out)  # the folder it is made in
    path, info = save_ema_pipeline(args.run, args.sigma_rel, args.out, step=args.step)
    logging.getLogger("ddpmkit").info("wrote %s: %s; sample it with: ddpmkit sample --model %s", path,
                                      describe(info), path)
    return 0


def cmd_doctor(args) -> int:
    from ddpmkit.doctor import doctor

    checks = [name.strip() for name in args.checks.split(",") if name.strip()]
    if args.target is None:  # before training: the train flags are the config
        overrides = config_from_args(TrainConfig, args).to_dict()
    else:  # the flags given with another value than their default go over the saved config
        defaults = TrainConfig().to_dict()
        overrides = {k: v for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    report = doctor(args.target, checks=checks, report_dir=args.report_dir, scheduler=args.scheduler, **overrides)
    for line in report.lines():
        print(line)
    return 1 if report.problems else 0


def cmd_models(args) -> int:
    from ddpmkit.models import list_models

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


def cmd_serve(args) -> int:
    from ddpmkit.serve import serve

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be from 1 to 65535 (got {args.port})")
    return serve(model=args.model, models_dir=args.models_dir, host=args.host, port=args.port, share=args.share,
                 device=args.device)


def cmd_schedulers(args) -> int:
    from ddpmkit.schedulers import AUTO, REGISTRY, figures_lines, is_available, resolve, settings_words

    name, steps, options = resolve(AUTO)
    print(f"{AUTO:<9} {name}, {settings_words(steps, options)}: the default of 'ddpmkit sample' and 'ddpmkit eval'")
    for line in figures_lines(AUTO):
        print(f"{'':<9} {line}")
    for name, spec in REGISTRY.items():
        _, steps, options = resolve(name)
        note = "" if is_available(name) else "  [not installed]"
        print(f"{name:<9} {settings_words(steps, options)}{note}")
        print(f"{'':<9} {spec.description}")
        for line in figures_lines(name):
            print(f"{'':<9} {line}")
    return 0


def cmd_schedule(args) -> int:
    from ddpmkit.plots import plot_schedule

    _at_least(args, 1, "image_size")
    check_seed(args.seed)
    paths = plot_schedule(model=args.model, beta_schedule=args.beta_schedule, dataset=args.dataset,
                          image_size=args.image_size, out=_check_out(args.out), seed=args.seed)
    for path in paths:
        logging.getLogger("ddpmkit").info("wrote %s", path)
    return 0
