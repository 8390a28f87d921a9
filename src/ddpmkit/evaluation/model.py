"""The model layer on top of the core: sample a model for evaluation, and `evaluate` (what `ddpmkit eval` runs).

`evaluate` takes exactly one of: a model (`model=`: sampled with `ddpmkit.sample`), images already made
(`images=`: a folder or a tensor), or a second dataset (`vs_dataset=`). It draws the reference from `dataset`,
hands the two image sets to `compare`, and puts the floor beside the figures when it is known.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpmkit import __version__
from ddpmkit.data import slug
from ddpmkit.devices import resolve_device
from ddpmkit.errors import UserError
from ddpmkit.evaluation.cache import FeatureCache, Floors, floor_entry, floor_key
from ddpmkit.evaluation.compare import compare, measure_floor
from ddpmkit.evaluation.features import FeatureExtractor, InceptionFeatures
from ddpmkit.evaluation.imagesets import ImageSet, dataset_images, open_images
from ddpmkit.evaluation.metrics import MIN_IMAGES, PR_K, fid_from_features, kid_from_features
from ddpmkit.evaluation.nearest import check_nearest, look_for_copies
from ddpmkit.evaluation.result import EvalResult
from ddpmkit.images import bars_enabled, to_uint8_nchw
from ddpmkit.models import class_names, load_pipeline, pipeline_name, resolve_class_label
from ddpmkit.models import resolve_pipeline
from ddpmkit.sampling import SamplerSettings, sample

DEFAULT_NUM_IMAGES = 2000
# a class's KID needs this many images a side: subsets of 5 or more, so that its spread over the subsets says
# something (below it, the subsets are the same few pairs drawn again)
PER_CLASS_KID_MIN = 10


def weights_sha256(unet) -> str:
    """A hash of the UNet's weights (names, dtypes, shapes and bytes), whatever file format they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def model_image_size(pipe, image_size: int | None = None) -> tuple[int, int]:
    """(size, channels) the reference is loaded at for a model: `image_size` when given, else the UNet's."""
    size = pipe.unet.config.sample_size
    return _check_size(image_size or (size if isinstance(size, int) else size[0])), pipe.unet.config.in_channels


def _check_size(image_size: int) -> int:
    if image_size < 2:
        raise UserError(f"--image_size must be at least 2 (got {image_size})")
    return image_size


# --------------------------------------------------------------------------- class labels
def _generated_labels(pipe, model_name, reference: ImageSet, per_class: bool, class_label) -> list[int] | None:
    """Labels to sample with: those of the reference images (per class), one class, or None (unconditional)."""
    num_classes = (pipe.unet.config.num_class_embeds or 1) - 1
    if num_classes < 1:
        if per_class or class_label is not None:
            raise UserError("--per_class and --class_label need a class-conditioned model (train one with "
                            "'ddpmkit train --class_column label')")
        return None
    names = class_names(model_name) if model_name else None
    if class_label is not None:
        return [resolve_class_label(class_label, names, num_classes)]
    if not per_class:
        return None
    if reference.labels is None:
        raise UserError(f"--per_class needs class labels in the dataset {reference.describe.get('dataset')}: "
                        "give --label_column")
    model_names = names or [str(i) for i in range(num_classes)]
    data_names = reference.class_names or [str(i) for i in range(int(reference.labels.max()) + 1)]
    mapping = {}
    for i, name in enumerate(data_names):
        matches = [j for j, m in enumerate(model_names) if slug(m) == slug(name)]
        if not matches:
            raise UserError(f"the dataset's class {name!r} is not one of the model's classes "
                            f"({', '.join(model_names)}): evaluate against the dataset the model was trained on")
        mapping[i] = matches[0]
    return [mapping[int(label)] for label in reference.labels]


def _restrict_to_class(reference: ImageSet, model_label: int, model_name) -> ImageSet:
    """The reference images of the model's class `model_label` (matched to the dataset's classes by name)."""
    if reference.labels is None:
        raise UserError(f"--class_label needs class labels in the dataset {reference.describe.get('dataset')} to "
                        "compare with that class's images: give --label_column")
    names = class_names(model_name) if model_name else None
    data_names = reference.class_names or []
    wanted = model_label
    if names and data_names:
        wanted_name = slug(names[model_label])
        matches = [i for i, n in enumerate(data_names) if slug(n) == wanted_name]
        if not matches:
            raise UserError(f"the model's class {names[model_label]!r} is not in the dataset's classes")
        wanted = matches[0]
    keep = reference.labels == wanted
    if int(keep.sum()) < MIN_IMAGES:
        raise UserError(f"the dataset has {int(keep.sum())} image(s) of that class: FID, precision and recall need "
                        f"at least {MIN_IMAGES} (pick another class or a larger dataset)")
    describe = {**reference.describe, "class": names[model_label] if names else model_label,
                "count": int(keep.sum())}
    return ImageSet(reference.images[keep], reference.labels[keep], reference.class_names, describe)


def per_class_figures(reference: ImageSet, ref_features: np.ndarray, gen_features: np.ndarray,
                      kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, dict]:
    """FID and KID of each class's generated images against that class's reference images, where they mean something.

    FID only when both sides have at least as many images as the features have dimensions (2,048 for the Inception):
    below that the covariance estimate is singular and FID's bias outweighs most differences between models (two
    halves of the same emoji data score 108 at 150 images, 52 at 500 and 17 at 2,000: eval_floors.json). KID is
    unbiased at any count: it is given with its spread from PER_CLASS_KID_MIN images a side; below that, no figure.
    Each entry says which bars applied (`fid_min_images`, `kid_min_images`).

    The generated image i was sampled with the class of reference image i (`sample_for_evaluation` per class),
    so one mask selects a class on both sides."""
    out = {}
    names = reference.class_names or []
    fid_min = ref_features.shape[1]
    for label in sorted(set(reference.labels.tolist())):
        mask = (reference.labels == label).numpy()
        r, g = ref_features[mask], gen_features[mask]
        name = names[label] if label < len(names) else str(label)
        entry = {"num_generated": int(g.shape[0]), "num_reference": int(r.shape[0]), "fid": None,
                 "kid_mean": None, "kid_std": None, "fid_min_images": fid_min, "kid_min_images": PER_CLASS_KID_MIN}
        fewest = min(r.shape[0], g.shape[0])
        if fewest >= fid_min:
            entry["fid"] = fid_from_features(r, g)
        if fewest >= PER_CLASS_KID_MIN:
            entry["kid_mean"], entry["kid_std"] = kid_from_features(r, g, kid_subsets, kid_subset_size)
        out[name] = entry
    return out


# --------------------------------------------------------------------------- sampling
def sample_for_evaluation(pipe, reference: ImageSet, count: int, sampler: SamplerSettings | None = None,
                          seed: int = 0, *, per_class: bool = False, class_label: str | int | None = None,
                          cfg_scale: float = 1.0, device=None, progress: bool = True,
                          model_name: str | None = None) -> tuple[ImageSet, ImageSet, dict]:
    """What `evaluate` samples from a model to compare with `reference`: `count` images with the reference's
    labels (per class), one class's label, or none. Returns the images, the reference they are compared with
    (that class's images only, for `class_label`) and the sampling settings. `model_name` finds the class
    names (default: where the pipeline was loaded from)."""
    sampler = sampler or SamplerSettings()
    model_name = model_name or pipeline_name(pipe)
    labels = _generated_labels(pipe, model_name, reference, per_class, class_label)
    if class_label is not None:  # one class: compared with that class's images only
        reference = _restrict_to_class(reference, labels[0], model_name)
        count = min(count, len(reference))
        labels = labels * count
    generated, settings = _sample_images(pipe, count, sampler, seed, labels, cfg_scale, device, progress)
    return generated, reference, settings


def _sample_images(pipe, count: int, sampler: SamplerSettings, seed: int, labels: list[int] | None,
                   cfg_scale: float, device, progress: bool) -> tuple[ImageSet, dict]:
    """`count` images from `ddpmkit.sample` with one progress bar over the steps; the images do not depend on
    the sampler's micro-batch (`batch_size`)."""
    bar = tqdm(desc="sampling", unit="step", leave=False, disable=not bars_enabled(progress))

    def on_step(info: dict) -> None:
        if bar.total is None:
            bar.total = info["num_steps"]  # the scheduler steps all images at once; batch_size splits the UNet calls
            bar.refresh()
        bar.update(1)

    with bar:
        out = sample(pipe, **sampler.kwargs(), num_images=count, seed=seed, class_labels=labels, cfg_scale=cfg_scale,
                     device=device, callback=on_step, progress=False)
    label_tensor = torch.as_tensor(labels) if labels is not None else None
    settings = {"scheduler": sampler.scheduler, "steps": sampler.steps, "sampler": out.settings, "nfe": out.nfe,
                "guide_calls": out.guide_calls,
                "seed": seed, "batch_size": sampler.batch_size, "dtype": sampler.dtype, "num_images": count,
                "cfg_scale": cfg_scale, "class_labels": sorted(set(labels)) if labels is not None else None,
                "scheduler_config": dict(pipe.scheduler.config)}
    return ImageSet(to_uint8_nchw(out.images), label_tensor, None, {"generated": count}), settings


# --------------------------------------------------------------------------- evaluate
def evaluate(model=None, *, images: str | os.PathLike | torch.Tensor | None = None, dataset: str = "emoji",
             vs_dataset: str | None = None, num_images: int | None = None, sampler: SamplerSettings | None = None,
             seed: int = 0, class_label: str | int | None = None, cfg_scale: float = 1.0, per_class: bool = False,
             split: str = "train", split_fraction: float | None = None, image_size: int | None = None,
             image_column: str | None = None, label_column: str | None = None, cache_dir: str | Path | None = None,
             data_cache_dir: str | None = None, floor: bool = False, features: FeatureExtractor | None = None,
             kid_subsets: int = 100, kid_subset_size: int = 1000, k: int = PR_K, device: str | None = None,
             resize: str = "clean", progress: bool = True, nearest: int = 0,
             nearest_grid: str | Path | None = None) -> EvalResult:
    """FID, KID, precision and recall of generated images (or any image set) against `dataset`.

    Exactly one of: `model`, a pipeline (object, folder, Hub id or bundled name) to sample `num_images` images
    from with `ddpmkit.sample` and `sampler` (default: `SamplerSettings()`, the 'auto' scheduler; what ran is
    recorded in `settings["model"]`); `images`, a folder of images or a tensor (uint8, or float in [-1, 1]);
    `vs_dataset`, a second dataset. The same dataset with `split_fraction` gives the floor (two disjoint samples
    of the same data), which is then recorded for later runs at that count. `nearest` K > 0: each generated
    image's K nearest training images and the share of copies (`evaluation.nearest`; the grid to `nearest_grid`).
    """
    started = time.perf_counter()
    check_nearest(nearest, vs_dataset)
    _check_arguments(model, images, vs_dataset, dataset, num_images, split_fraction, per_class, class_label,
                     kid_subsets, kid_subset_size)
    feature_device = resolve_device(device)  # a device that is not there stops here, before anything is loaded
    extractor = features or InceptionFeatures(device=feature_device, resize=resize)
    cache, timings = FeatureCache(cache_dir), {}
    settings = _settings(extractor.identity, kid_subsets, kid_subset_size, k)
    select = dict(split=split, image_column=image_column, label_column=label_column, data_cache_dir=data_cache_dir)
    sampling = dict(sampler=sampler, seed=seed, per_class=per_class, class_label=class_label, cfg_scale=cfg_scale,
                    device=device, progress=progress)
    reference, generated = _sides(model, images, vs_dataset, dataset, num_images, image_size, split_fraction, select,
                                  sampling, settings, timings)

    comparison = compare(reference, generated, extractor, cache, cache_generated=vs_dataset is not None,
                         kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, k=k, progress=progress)
    settings["reference_cache"] = comparison.reference_cache
    timings.update(comparison.timings)
    by_class = {}
    if per_class and model is not None:
        t0 = time.perf_counter()
        by_class = per_class_figures(reference, comparison.reference_features, comparison.generated_features,
                                     kid_subsets, kid_subset_size)
        timings["metrics"] += time.perf_counter() - t0

    own_floor = vs_dataset is not None and vs_dataset == dataset  # this run measured it: same source, disjoint parts
    metrics_options = dict(kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, k=k, progress=progress)
    known = _floor(dataset, reference, generated, comparison, extractor, cache, Floors(cache_dir), settings, select,
                   metrics_options, record=own_floor, split_fraction=split_fraction,
                   lookup=vs_dataset is None and class_label is None, measure=floor)
    copies = _nearest(nearest, nearest_grid, generated, comparison, dataset, extractor, cache, settings, timings,
                      progress, select) if nearest else None
    m = comparison.metrics
    return EvalResult(m.fid, m.kid_mean, m.kid_std, m.precision, m.recall, len(generated), len(reference),
                      time.perf_counter() - started, known, by_class, settings, timings, copies)


def _floor(dataset, reference, generated, comparison, extractor, cache, floors, settings, select, metrics_options, *,
           record: bool, split_fraction, lookup: bool, measure: bool) -> dict | None:
    """The floor at this dataset, size and count. `record` (this run compared two disjoint parts of the dataset,
    split at `split_fraction`): this run's figures are the floor, recorded for later runs. `lookup` (a model or
    images against the whole dataset): the one recorded, or, with `measure`, measured now and recorded. Else None
    (one class, or another dataset)."""
    size, channels = reference.describe["image_size"], reference.describe["channels"]
    key = floor_key(dataset, size, channels, min(len(reference), len(generated)), select["split"], extractor.identity)
    if record:
        floors.put(key, floor_entry(comparison.metrics, len(generated), split_fraction, settings["date"]))
        settings["is_floor"] = True
        return None
    if not lookup:
        return None
    known = floors.get(key)
    if known is None and measure:
        known = measure_floor(dataset, size, channels, len(reference), extractor, cache, settings["date"],
                              **metrics_options, **select)
        if known is not None:
            floors.put(key, known)
    return known


def _nearest(k, grid, generated, comparison, dataset, extractor, cache, settings, timings, progress, select) -> dict:
    """--nearest K: the training images nearest each generated image (evaluation.nearest), timed."""
    t0 = time.perf_counter()
    model_name = settings.get("model", {}).get("name")
    found = look_for_copies(k, generated, comparison.generated_features, dataset, model_name, extractor, cache, grid,
                            progress, **select)
    timings["nearest"] = time.perf_counter() - t0
    return found


def _check_arguments(model, images, vs_dataset, dataset, num_images, split_fraction, per_class, class_label,
                     kid_subsets, kid_subset_size) -> None:
    if num_images is not None and num_images < MIN_IMAGES:
        raise UserError(f"--num_images must be at least {MIN_IMAGES}: FID needs a covariance, precision and recall "
                        f"each image's 3 nearest neighbours (got {num_images})")
    if kid_subsets < 1 or kid_subset_size < 2:
        raise UserError("KID needs at least 1 subset of at least 2 images")
    if sum(side is not None for side in (model, images, vs_dataset)) != 1:
        raise UserError("evaluate: give a model, images (a folder or a tensor), or --vs_dataset (exactly one)")
    if images is not None and (per_class or class_label is not None):
        raise UserError("--per_class and --class_label need --model (a class-conditioned one), not --images")
    if split_fraction is not None and (vs_dataset is None or vs_dataset != dataset):
        raise UserError("--split_fraction splits one dataset in two disjoint parts: use it with --vs_dataset "
                        "equal to --dataset (that gives the floor)")
    if vs_dataset is not None and vs_dataset == dataset and split_fraction is None:
        raise UserError(f"--vs_dataset {vs_dataset} is the same as --dataset: add --split_fraction 0.5 to compare "
                        "two disjoint halves (the floor)")


def _sides(model, images, vs_dataset, dataset, num_images, image_size, split_fraction, select, sampling, settings,
           timings) -> tuple[ImageSet, ImageSet]:
    """The reference (`num_images` dataset images by a seeded permutation; the first part of it for a floor) and
    the other side: a model's samples, images already made, or a second dataset (for a floor: the rest)."""
    if model is not None:
        pipe, name = _open_model(model, sampling["device"])
        image_size, channels = model_image_size(pipe, image_size)
    elif images is not None:
        generated = open_images(images, image_size, num_images)
        settings["images"] = generated.describe
        image_size, channels = _check_size(image_size or generated.describe["image_size"]), generated.images.shape[1]
    else:
        image_size, channels = _check_size(image_size or 32), 3
    t0 = time.perf_counter()
    count = num_images or (len(generated) if images is not None else DEFAULT_NUM_IMAGES)
    reference = dataset_images(dataset, image_size, channels, count, split_fraction=split_fraction, part="a",
                               **select)
    timings["reference images"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    count = min(count, len(reference))
    if vs_dataset is not None:
        generated = dataset_images(vs_dataset, image_size, channels, count, split_fraction=split_fraction, part="b",
                                   **select)
        settings["vs_dataset"] = generated.describe
        timings["second dataset"] = time.perf_counter() - t0
    elif model is not None:
        generated, reference, sampled = sample_for_evaluation(pipe, reference, count, model_name=name, **sampling)
        settings["model"] = {"name": name, "weights_sha256": weights_sha256(pipe.unet), **sampled}
        timings["sampling"] = time.perf_counter() - t0
    settings["reference"] = reference.describe
    return reference, generated


def _open_model(model, device) -> tuple[Any, str | None]:
    """The pipeline to sample and the name it is recorded under (as given, for a folder, Hub id or bundled name)."""
    if isinstance(model, (str, os.PathLike)):
        return load_pipeline(str(model), device=device), str(model)
    pipe = resolve_pipeline(model)
    return pipe, pipeline_name(pipe)


def _settings(identity: dict, kid_subsets: int, kid_subset_size: int, k: int) -> dict[str, Any]:
    """The start of what reproduces the figures: the feature network, the metric settings, version and date."""
    return {"features": identity, "kid": {"subsets": kid_subsets, "subset_size": kid_subset_size},
            "precision_recall_k": k, "ddpmkit_version": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
