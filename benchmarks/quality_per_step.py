"""FID and KID against model calls (NFE) for each sampler on a trained model: the real-model table of docs/samplers.md.

Every row is `ddpmkit.evaluate` of the same model with the same image count and seed (per class for a
class-conditioned model), one sampler setting per row; the model calls are counted on the UNet's forward, and the
exact-score figures of the same setting (benchmarks/samplers_table.py) stand beside the FID. A setting the issue
does not pin down (solver order, spacing) is the scheduler's default, recorded with the row.

    make quality-table                                                   # the bundled emoji32, 1000 images per row
    python benchmarks/quality_per_step.py --rows ddpm-1000,auto          # some rows only (no docs or shipped file)
    python benchmarks/quality_per_step.py --model runs/emoji32 --num_images 250 --device cuda

Sampling and evaluating can run on different machines (a GPU machine without the Inception weights samples,
another evaluates): `--samples DIR --sample_only` samples every row and keeps its images and labels in DIR; the
same command without --sample_only then evaluates each row from DIR instead of sampling it again.

Resumable: each row's result is kept under runs/quality_per_step/ (a folder per model hash, count and seed, a JSON
per setting) and skipped when present, so the same command continues a stopped run. ddpm-1000 is the slow row
(1000 model calls per image): on a CPU run the table in the background, or on a GPU. The UNet runs in fp32 at a
fixed micro-batch (nothing is timed, so every forward counted is a sampling call; no reduced-precision effect).

Writes benchmarks/results/quality_per_step.{json,md}, the plot docs/quality_per_step.png (FID vs NFE, log x, with
ddpm-1000 and the eval floor as lines), the generated block of docs/samplers.md and, for a full run of the default
model, src/ddpmkit/quality_per_step.json (what 'ddpmkit schedulers' prints beside each scheduler).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpmkit.config import DEFAULT_MODEL  # noqa: E402
from ddpmkit.data import slug  # noqa: E402
from ddpmkit.evaluation import (dataset_images, evaluate, model_image_size, sample_for_evaluation,  # noqa: E402
                                weights_sha256)
from ddpmkit.models import load_pipeline, trained_on  # noqa: E402
from ddpmkit.sampling import SamplerSettings  # noqa: E402
from ddpmkit.schedulers import QUALITY_FILE, resolve, settings_label  # noqa: E402

# row id -> (scheduler, steps, options): the rows of issue 11. None / options left out: the scheduler's defaults.
ROWS = {
    "ddpm-1000": ("ddpm", 1000, {}),
    "ddim-10": ("ddim", 10, {}),
    "ddim-20": ("ddim", 20, {}),
    "ddim-50": ("ddim", 50, {}),
    "ddim-100": ("ddim", 100, {}),
    "dpm++-karras-10": ("dpm++", 10, {"karras": True}),
    "dpm++-karras-20": ("dpm++", 20, {"karras": True}),
    "unipc-10": ("unipc", 10, {}),
    "unipc-20": ("unipc", 20, {}),
    "deis": ("deis", None, {}),
    "auto": ("auto", None, {}),
    "euler-30": ("euler", 30, {}),
    "heun-karras-30": ("heun", 30, {"karras": True}),
    # beyond issue 11's rows: the one stochastic sampler whose defaults (Karras, 40 steps, 79 calls) also match
    # ddpm-1000 on the exact-score model. On the GPU-trained emoji32 every deterministic row above stays 20%+ above
    # ddpm-1000's FID, so it is the candidate for `auto`.
    "dpm++sde": ("dpm++sde", None, {}),
}
REFERENCE = "ddpm-1000"
AUTO_TOLERANCE = 0.10  # issue 11: auto must be within 10% of ddpm-1000's FID on the real model
RESULTS = ROOT / "benchmarks" / "results"
EXACT_SCORE = RESULTS / "samplers_table.json"
DOC_START, DOC_END = "<!-- quality-per-step:start -->", "<!-- quality-per-step:end -->"
log = logging.getLogger("quality_per_step")


def setting_key(scheduler: str, steps: int, options: dict) -> str:
    """A file name for a setting: 'dpmpp-karras-order-3-25'."""
    return slug(settings_label(scheduler, options, steps).replace("++", "pp"))


class CallCounter:
    """Counts the images the UNet's forward sees (a forward pre-hook): / num_images = model calls per image."""

    def __init__(self, unet):
        self.rows = 0
        self.calls = 0
        self.handle = unet.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.rows += sample.shape[0]
        self.calls += 1

    def reset(self) -> None:
        self.rows = self.calls = 0

    def close(self) -> None:
        self.handle.remove()


def sampler_settings(scheduler: str, steps: int, options: dict, args) -> SamplerSettings:
    """A row's sampler: the UNet in fp32 at the --batch_size micro-batch (nothing is timed; no reduced precision)."""
    return SamplerSettings(scheduler=scheduler, steps=steps, karras=options.get("karras"),
                           timestep_spacing=options.get("timestep_spacing"), solver_order=options.get("solver_order"),
                           dtype="fp32", batch_size=args.batch_size)


def measure_row(pipe, counter: CallCounter, scheduler: str, steps: int, options: dict, args, dataset: str,
                per_class: bool) -> dict:
    """One setting: sample num_images, evaluate against the dataset, count the model calls."""
    counter.reset()
    start = time.perf_counter()
    result = evaluate(pipe, dataset=dataset, num_images=args.num_images, sampler=sampler_settings(scheduler, steps,
                      options, args), seed=args.seed, per_class=per_class, label_column=args.label_column,
                      cache_dir=args.cache_dir, floor=True, device=args.device, progress=not args.quiet)
    nfe = counter.rows / result.num_generated  # a CFG pair would count two: this table samples without CFG
    return {"scheduler": scheduler, "steps": steps, "options": options, "label": settings_label(scheduler, options),
            "nfe": int(nfe) if nfe.is_integer() else nfe, "unet_forwards": counter.calls,
            "fid": result.fid, "kid_mean": result.kid_mean, "kid_std": result.kid_std, "precision": result.precision,
            "recall": result.recall, "floor": result.floor, "per_class": result.per_class,
            "seconds": round(time.perf_counter() - start, 1), "eval": result.to_dict()}


def sample_row(pipe, counter: CallCounter, scheduler: str, steps: int, options: dict, args, dataset: str,
               per_class: bool) -> dict:
    """One setting's images without evaluating them: what `evaluate` samples for the row (the same reference
    labels, seed and sampler), for --sample_only."""
    counter.reset()
    start = time.perf_counter()
    image_size, channels = model_image_size(pipe)
    reference = dataset_images(dataset, image_size, channels, args.num_images, label_column=args.label_column)
    generated, _, settings = sample_for_evaluation(pipe, reference, len(reference),
                                                   sampler_settings(scheduler, steps, options, args), args.seed,
                                                   per_class=per_class, device=args.device, progress=not args.quiet)
    return {"images": generated.images, "labels": generated.labels, "settings": settings,
            "nfe": counter.rows / len(generated), "unet_forwards": counter.calls,
            "sampling_seconds": round(time.perf_counter() - start, 1), "weights_sha256": weights_sha256(pipe.unet),
            "device": machine(pipe)}


def evaluate_samples(saved: dict, scheduler: str, steps: int, options: dict, args, dataset: str) -> dict:
    """One setting's row from images sampled earlier (--samples): the same reference, so the same FID as sampling
    here would give for those images; no per-class figures (the table does not show them)."""
    start = time.perf_counter()
    result = evaluate(images=saved["images"], dataset=dataset, num_images=args.num_images,
                      label_column=args.label_column, cache_dir=args.cache_dir, floor=True, device=args.device,
                      progress=not args.quiet)
    nfe = saved["nfe"]
    evaluation = result.to_dict()
    evaluation["settings"]["model"] = {"weights_sha256": saved["weights_sha256"], **saved["settings"],
                                       "sampled_on": saved["device"]}
    return {"scheduler": scheduler, "steps": steps, "options": options, "label": settings_label(scheduler, options),
            "nfe": int(nfe) if float(nfe).is_integer() else nfe, "unet_forwards": saved["unet_forwards"],
            "fid": result.fid, "kid_mean": result.kid_mean, "kid_std": result.kid_std, "precision": result.precision,
            "recall": result.recall, "floor": result.floor, "per_class": {},
            "seconds": round(saved["sampling_seconds"] + time.perf_counter() - start, 1),
            "sampled_on": saved["device"], "eval": evaluation}


def table_label(scheduler: str, options: dict) -> str:
    """The exact-score table's name for a setting: diffusers' plain values (no Karras, order 2) are not named."""
    named = {k: v for k, v in options.items() if not (k == "karras" and not v) and not (k == "solver_order" and v == 2)}
    return settings_label(scheduler, named)


def exact_score_lookup() -> dict:
    """label + steps -> (linear row, cosine row) of the exact-score table, when it is there."""
    if not EXACT_SCORE.is_file():
        return {}
    table = json.loads(EXACT_SCORE.read_text())
    found: dict = {("ddpm", 1000): {s: {**row, "pass": True} for s, row in table["baseline"].items()}}
    for row in table["rows"]:
        if "error" not in row and row["kind"] in ("grid", "auto", "defaults"):
            found.setdefault((row["label"], row["steps"]), {})[row["schedule"]] = row
    return found


def exact_cell(pair: dict | None) -> str:
    if not pair or len(pair) < 2:
        return "not measured"
    lin, cos = pair["linear"], pair["squaredcos_cap_v2"]
    verdict = "matches" if lin.get("pass") and cos.get("pass") else "misses"
    return f"{lin['spread']:.2f} / {cos['spread']:.2f} ({verdict})"


def markdown(result: dict) -> str:
    rows, ref = result["rows"], result["reference_fid"]
    floor = result["floor_fid"]
    lines = [f"Model {result['model']} (weights {result['weights_sha256'][:12]}), {result['num_images']} images per row"
             f"{' (per class)' if result['per_class'] else ''} against {result['dataset']}, seed {result['seed']}, "
             f"fp32; {result['device']}, torch {result['torch']}; eval floor at this count: "
             + (f"FID {floor:.2f}" if floor is not None else "not known") + ". Regenerate with `make quality-table`.",
             "", "| row | setting | NFE | FID | KID | FID / ddpm-1000 | exact-score spread lin / cos |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = f"{row['fid'] / ref:.2f}" if ref else "-"
        lines.append(f"| {row['row']} | {row['label']}, {row['steps']} steps | {row['nfe']:g} | {row['fid']:.2f} | "
                     f"{row['kid_mean']:.4f} ± {row['kid_std']:.4f} | {ratio} | {row['exact_score']} |")
    auto = next((r for r in rows if r["row"] == "auto"), None)
    if auto and ref:
        within = auto["fid"] <= (1 + AUTO_TOLERANCE) * ref
        lines += ["", f"auto ({auto['label']}, {auto['steps']} steps): FID {auto['fid']:.2f} vs ddpm-1000's {ref:.2f} "
                  f"({auto['fid'] / ref:.2f}x): {'within' if within else 'NOT within'} {AUTO_TOLERANCE:.0%}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    """FID against NFE (log x), one labelled point per row; ddpm-1000 and the eval floor as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    by_scheduler: dict[str, list[dict]] = {}
    for row in result["rows"]:
        by_scheduler.setdefault(row["label"] if row["row"] != "auto" else "auto: " + row["label"], []).append(row)
    for name, rows in by_scheduler.items():
        rows = sorted(rows, key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in rows], [r["fid"] for r in rows], marker="o", linewidth=1, label=name)
    if result["reference_fid"] is not None:
        ax.axhline(result["reference_fid"], color="black", linestyle="--", linewidth=1, label="ddpm, 1000 steps")
    if result["floor_fid"] is not None:
        ax.axhline(result["floor_fid"], color="grey", linestyle=":", linewidth=1,
                   label=f"eval floor ({result['num_images']} images)")
    ax.set_xscale("log")
    ax.set(title=f"FID vs model calls: {result['model']}, {result['num_images']} images", xlabel="model calls per "
           "image (NFE, log scale)", ylabel="FID (lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: no point hidden under it
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def update_docs(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else f"{DOC_START}\n{DOC_END}\n"
    if DOC_START not in text:
        text += f"\n{DOC_START}\n{DOC_END}\n"
    pattern = re.compile(re.escape(DOC_START) + ".*?" + re.escape(DOC_END), re.S)
    path.write_text(pattern.sub(lambda _: f"{DOC_START}\n{block}{DOC_END}", text))


def shipped(result: dict) -> dict:
    """What 'ddpmkit schedulers' reads: the figures per row, without the per-class and eval details."""
    keep = ("row", "scheduler", "steps", "options", "label", "nfe", "fid", "kid_mean", "kid_std")
    return {key: result[key] for key in ("model", "weights_sha256", "num_images", "seed", "dataset", "measured",
                                         "reference_fid", "floor_fid")} | {
        "rows": [{k: row[k] for k in keep} for row in result["rows"]]}


def machine(pipe) -> str:
    """Where the UNet runs: 'cuda:0 (NVIDIA H100 80GB HBM3)', 'cpu (x86_64)'."""
    device = pipe.unet.device
    return f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()})"


def where(pipe, rows: list[dict]) -> str:
    """The machine the rows ran on; with --samples, also the one that sampled them."""
    here = machine(pipe)
    sampled = sorted({row.get("sampled_on") or here for row in rows})
    return f"sampled on {' and '.join(sampled)}, evaluated on {here}" if sampled != [here] else here


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name, pipeline folder or Hub id "
                        f"(default: {DEFAULT_MODEL})")
    parser.add_argument("--dataset", default=None, help="the reference data (default: the one the model was trained "
                        "on, from its ddpmkit.json)")
    parser.add_argument("--label_column", default=None, help="class column of the dataset, for a class-conditioned "
                        "model (as for 'ddpmkit eval')")
    parser.add_argument("--num_images", type=int, default=1000, help="images per row (default: 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", default=None, help="comma-separated row ids to run (default: all): "
                        + ", ".join(ROWS))
    parser.add_argument("--batch_size", type=int, default=None, help="images per UNet call (default: 64 on a CPU, "
                        "512 on a GPU); the images do not depend on it")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: GPU when there is one)")
    parser.add_argument("--cache_dir", default=None, help="eval feature cache and floors (as for 'ddpmkit eval')")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "quality_per_step"),
                        help="where each row's result is kept (default: runs/quality_per_step)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for quality_per_step.json and .md")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "quality_per_step.png"), help="the plot")
    parser.add_argument("--docs", default=str(ROOT / "docs" / "samplers.md"), help="docs page to update ('' for none)")
    parser.add_argument("--no_ship", action="store_true", help=f"do not write {QUALITY_FILE.name} into the package")
    parser.add_argument("--samples", default=None, help="folder for each row's generated images: rows found there "
                        "are evaluated from it instead of sampled")
    parser.add_argument("--sample_only", action="store_true", help="with --samples: sample the rows not yet there "
                        "and stop (no Inception needed: for a GPU machine whose results are evaluated elsewhere)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.sample_only and not args.samples:
        parser.error("--sample_only needs --samples DIR (where the images go)")
    unknown = set((args.rows or "").split(",")) - set(ROWS) - {""}
    if unknown:
        parser.error(f"unknown row(s) {', '.join(sorted(unknown))}: use {', '.join(ROWS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    wanted = args.rows.split(",") if args.rows else list(ROWS)
    pipe = load_pipeline(args.model, device=args.device)
    dataset = args.dataset or trained_on(pipe.config._name_or_path)
    if dataset is None:
        raise SystemExit("give --dataset: the model has no ddpmkit.json naming the data it was trained on")
    per_class = bool(pipe.unet.config.num_class_embeds)
    sha = weights_sha256(pipe.unet)
    name = lambda text: slug(Path(str(text)).name)  # noqa: E731
    folder = Path(args.runs) / f"{name(args.model)}-{sha[:12]}-{name(dataset)}-n{args.num_images}-seed{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    exact = exact_score_lookup()
    counter = CallCounter(pipe.unet)
    rows = []
    samples = Path(args.samples) if args.samples else None
    try:
        for row_id in wanted:
            scheduler, steps, options = resolve(ROWS[row_id][0], ROWS[row_id][1], **ROWS[row_id][2])
            path = folder / f"{setting_key(scheduler, steps, options)}.json"
            saved_path = samples / f"{setting_key(scheduler, steps, options)}.pt" if samples else None
            if args.sample_only:
                if not saved_path.is_file():
                    log.info("%s: %s, %d steps: sampling ...", row_id, settings_label(scheduler, options), steps)
                    saved = sample_row(pipe, counter, scheduler, steps, options, args, dataset, per_class)
                    saved_path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(saved, saved_path.with_suffix(".tmp"))
                    saved_path.with_suffix(".tmp").replace(saved_path)
                    log.info("%s: %d images, %g model calls per image, %.1f s", row_id, len(saved["images"]),
                             saved["nfe"], saved["sampling_seconds"])
                continue
            if path.is_file():  # done before (or by another row with the same settings, e.g. deis and auto)
                measured = json.loads(path.read_text())
                log.info("%s: %s, %d steps: kept from %s", row_id, measured["label"], steps, path)
            else:
                log.info("%s: %s, %d steps ...", row_id, settings_label(scheduler, options), steps)
                if saved_path is not None and saved_path.is_file():
                    saved = torch.load(saved_path, weights_only=True)
                    if saved["weights_sha256"] != sha:
                        raise SystemExit(f"{saved_path} was sampled from other weights ({saved['weights_sha256'][:12]}"
                                         f", not {sha[:12]}): give the --samples folder of this model")
                    measured = evaluate_samples(saved, scheduler, steps, options, args, dataset)
                else:
                    measured = measure_row(pipe, counter, scheduler, steps, options, args, dataset, per_class)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(measured, indent=1) + "\n")
                tmp.replace(path)  # complete or absent: a kill mid-row leaves no result
            log.info("%s: FID %.2f, %g model calls per image, %.0f s", row_id, measured["fid"], measured["nfe"],
                     measured["seconds"])
            pair = exact.get((table_label(scheduler, options), steps))
            rows.append({"row": row_id, **{k: v for k, v in measured.items() if k != "eval"},
                         "exact_score": exact_cell(pair)})
    finally:
        counter.close()
    if args.sample_only:
        log.info("sampled every row into %s: evaluate them with the same command without --sample_only", samples)
        return 0
    by_id = {row["row"]: row for row in rows}
    floors = [row["floor"]["fid"] for row in rows if row.get("floor")]
    result = {"model": str(args.model), "weights_sha256": sha, "dataset": dataset, "num_images": args.num_images,
              "seed": args.seed, "per_class": per_class, "partial": set(wanted) != set(ROWS),
              "device": where(pipe, rows),
              "torch": torch.__version__, "measured": datetime.date.today().isoformat(),
              "reference_fid": by_id[REFERENCE]["fid"] if REFERENCE in by_id else None,
              "floor_fid": floors[0] if floors else None, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_per_step.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out / "quality_per_step.md").write_text(table)
    log.info("wrote %s, %s and %s", out / "quality_per_step.json", out / "quality_per_step.md",
             plot(result, Path(args.plot)))
    if not result["partial"]:
        if args.docs:
            update_docs(Path(args.docs), table)
        if not args.no_ship:
            QUALITY_FILE.write_text(json.dumps(shipped(result), indent=1) + "\n")
            log.info("wrote %s ('ddpmkit schedulers' prints it)", QUALITY_FILE)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
