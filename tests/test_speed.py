"""Speed switches, without timing anything: the dtype choice, the micro-batch cache (kept, reused, overridden),
fp32 sampling equal to DDPMPipeline bit for bit in one call (and to float rounding in micro-batches), the bf16
fallbacks on a CPU without it, and no host synchronisation inside a training step."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from conftest import make_micro_unet
from diffusers import DDPMPipeline

import ddpmkit
from ddpmkit import runs, tuning
from ddpmkit.cli import build_parser
from ddpmkit.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "autotune.json"


@pytest.fixture
def timings(monkeypatch):
    """The tuner's clock replaced: micro-batch 16 and channels-last are the fastest; each timed call is counted.
    fp32 as on a CPU without native bf16, so the same calls are measured on every CPU (an AVX-512 bf16 one too)."""
    monkeypatch.setattr(tuning, "native_bf16", lambda device: False)
    calls = []

    def fake_forward(unet, dtype, channels_last, batch, models, graphs=False):
        images_per_s = {8: 80.0, 16: 200.0, 32: 120.0}.get(batch, 50.0) * (1.3 if channels_last else 1.0)
        return lambda: batch / images_per_s  # "running" it gives the seconds it would take

    def fake_timed(run, device):
        calls.append(run)
        return run(), 1.0  # (seconds, the share of its threads' time: the machine to itself)

    monkeypatch.setattr(tuning, "_forward", fake_forward)
    monkeypatch.setattr(tuning, "_timed", fake_timed)
    return calls


def test_a_measurement_slowed_by_other_work_is_not_kept_and_its_disturbed_calls_do_not_count(
        cache, timings, monkeypatch, caplog):
    """A training run beside the tuner once made it keep 8: 5, 16: 9, 32: 370 img/s for good. A call during which the
    process had under BUSY_SHARE of its threads' time was slowed by other work: it does not count, and a setting with
    no other call makes the whole measurement one for this run only (not written, measured again next time)."""
    unet = make_micro_unet().eval()
    share = {"value": 0.5}
    monkeypatch.setattr(tuning, "_timed", lambda run, device: (run(), share["value"]))
    with caplog.at_level(logging.WARNING, logger="ddpmkit"):
        busy = tuning.choose(unet, num_images=32)
    assert (busy.channels_last, busy.batch_size) == (True, 16)  # the rates it had, for this run
    assert "busy with other work" in caplog.text and "had 50% of its threads' time" in caplog.text
    assert not cache.exists()
    share["value"] = 1.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ddpmkit"):
        assert tuning.choose(unet, num_images=32) == busy
    assert cache.exists() and "busy" not in caplog.text
    # a disturbed call (here one that looks 10x faster) is left out of its setting's best: the rates are the clock's
    cache.unlink()
    rounds = iter(range(1000))

    def one_bad_round(run, device):
        seconds = run()
        return (seconds / 10, 0.2) if next(rounds) % 7 == 0 else (seconds, 1.0)

    monkeypatch.setattr(tuning, "_timed", one_bad_round)
    assert tuning.choose(unet, num_images=32) == busy
    rates = [{k: round(v) for k, v in e["images_per_s"].items()} for e in json.loads(cache.read_text()).values()]
    assert rates == [{"contiguous": 200, "channels_last": 260}, {"8": 104, "16": 260, "32": 156}]


def test_timed_calls_report_the_share_of_their_threads_time():
    seconds, share = tuning._timed(lambda: sum(i * i for i in range(200_000)), torch.device("cpu"))
    assert seconds > 0 and 0 < share <= 1.5  # one busy Python thread of torch's threads
    seconds, share = tuning._timed(lambda: tuning.time.sleep(0.05), torch.device("cpu"))
    assert seconds >= 0.05 and share < 0.2  # waiting is not running


@pytest.mark.parametrize("batch_size", [1, 3, 4, None])
def test_fp32_sampling_is_ddpm_pipeline_bit_for_bit_in_one_call_and_to_float_rounding_in_micro_batches(
        plain_pipeline, batch_size):
    reference = DDPMPipeline.from_pretrained(plain_pipeline)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(batch_size=4, generator=torch.Generator().manual_seed(3), num_inference_steps=30,
                       output_type="np").images
    ours = ddpmkit.sample(str(plain_pipeline), scheduler="ddpm", steps=30, num_images=4, seed=3, dtype="fp32",
                          batch_size=batch_size, progress=False).images
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    if batch_size in (4, None):  # one UNet call per step (4 images: nothing to measure), as DDPMPipeline makes it
        assert np.array_equal(ours, theirs)
    else:  # the convolutions may round differently at another batch size (~5e-7): the same images
        assert np.abs(ours - theirs).max() < 1e-5


def test_auto_dtype_is_fp32_without_native_bf16_and_bf16_only_where_measured_faster(monkeypatch, caplog):
    unet = make_micro_unet().eval()
    monkeypatch.setattr(tuning, "native_bf16", lambda device: False)
    choice = tuning.choose(unet, num_images=2)
    assert choice.dtype == torch.float32 and "no native bf16" in choice.why
    monkeypatch.setattr(tuning, "native_bf16", lambda device: True)
    for bf16_speed, expected in ((180.0, torch.bfloat16), (102.0, torch.float32)):
        monkeypatch.setattr(tuning, "_cached_measurements",
                            lambda unet, what, settings, s=bf16_speed: {"fp32": 100.0, "bf16": s})
        choice = tuning.choose(unet, num_images=2)
        assert choice.dtype == expected and f"{bf16_speed / 100:.2f}x fp32" in choice.why
    # the choice is logged by sample()
    monkeypatch.setattr(tuning, "native_bf16", lambda device: False)
    pipe = DDPMPipeline(unet=unet, scheduler=ddpmkit.models.new_noise_scheduler())
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        ddpmkit.sample(pipe, scheduler="ddim", steps=2, num_images=2, seed=0, progress=False)
    assert "UNet calls: fp32" in caplog.text and "no native bf16" in caplog.text
    with pytest.raises(UserError, match="--dtype must be one of"):
        tuning.choose(unet, 2, dtype="fp8")


def test_bf16_on_a_cpu_without_it_warns_and_leaves_the_callers_weights_alone(monkeypatch, caplog):
    monkeypatch.setattr(tuning, "native_bf16", lambda device: False)
    unet = make_micro_unet().eval()
    pipe = DDPMPipeline(unet=unet, scheduler=ddpmkit.models.new_noise_scheduler())
    with caplog.at_level(logging.WARNING, logger="ddpmkit"):
        low = ddpmkit.sample(pipe, scheduler="ddim", steps=4, num_images=2, seed=0, dtype="bf16", progress=False)
    assert "emulated" in caplog.text
    full = ddpmkit.sample(pipe, scheduler="ddim", steps=4, num_images=2, seed=0, dtype="fp32", progress=False)
    assert low.images.dtype == torch.float32 and unet.dtype == torch.float32
    assert 0 < (low.images - full.images).abs().max() < 0.1  # bf16 rounding, not a different image


def test_micro_batch_is_measured_once_kept_on_disk_and_overridden_by_batch_size(cache, timings):
    unet = make_micro_unet().eval()
    first = tuning.choose(unet, num_images=32)
    assert (first.channels_last, first.batch_size) == (True, 16)
    measured = len(timings)
    assert measured > 0 and cache.exists()
    entries = json.loads(cache.read_text())
    assert {e["what"] for e in entries.values()} == {"format torch.float32", "batch torch.float32 channels-last"}
    assert tuning.choose(unet, num_images=32) == first and len(timings) == measured  # read back, nothing timed
    given = tuning.choose(unet, num_images=32, batch_size=8, channels_last=False)
    assert (given.batch_size, given.channels_last) == (8, False) and len(timings) == measured
    # fp32 by name: DDPMPipeline's arithmetic (contiguous, all at once), nothing measured
    exact = tuning.choose(unet, num_images=32, dtype="fp32")
    assert (exact.channels_last, exact.batch_size) == (False, 32) and len(timings) == measured
    # contiguous by choice: its own batch measurement, kept under its own key
    assert tuning.choose(unet, num_images=32, channels_last=False).batch_size == 16
    assert len(json.loads(cache.read_text())) == 3
    # another architecture is measured on its own
    tuning.choose(make_micro_unet(layers_per_block=2).eval(), num_images=32)
    assert len(json.loads(cache.read_text())) == 5
    # an unreadable cache file is measured again, not an error
    cache.write_text("{not json")
    assert tuning.choose(unet, num_images=32) == first


def test_sample_calls_the_unet_in_micro_batches_and_the_images_do_not_depend_on_them(plain_pipeline):
    pipe = ddpmkit.load_pipeline(plain_pipeline)
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        three = ddpmkit.sample(pipe, scheduler="dpm++", steps=5, num_images=7, seed=1, batch_size=3, dtype="fp32",
                               progress=False)
    finally:
        hook.remove()
    assert rows == [3, 3, 1] * 5
    seven = ddpmkit.sample(pipe, scheduler="dpm++", steps=5, num_images=7, seed=1, batch_size=7, dtype="fp32",
                           progress=False)
    assert (three.images - seven.images).abs().max() < 1e-4  # float rounding of the batch size only
    assert all(p.is_contiguous() for p in pipe.unet.parameters())  # channels-last is undone after sampling
    ddpmkit.sample(pipe, scheduler="ddim", steps=2, num_images=2, seed=1, channels_last=True, progress=False)
    assert all(p.is_contiguous() for p in pipe.unet.parameters())


def test_fixed_dtype_is_a_constant_while_sampling_and_diffusers_property_again_after(plain_pipeline):
    pipe = ddpmkit.load_pipeline(plain_pipeline)
    unet, cls = pipe.unet, type(pipe.unet)
    seen = []
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append((type(module), module.dtype)))
    try:
        ddpmkit.sample(pipe, scheduler="ddpm", steps=2, num_images=2, seed=0, dtype="fp32", progress=False)
    finally:
        hook.remove()
    assert seen and all(c is not cls and issubclass(c, cls) and d == torch.float32 for c, d in seen)
    assert type(unet) is cls and isinstance(cls.dtype, property)  # restored after sampling
    with pytest.raises(RuntimeError, match="boom"):
        with tuning.fixed_dtype(unet):
            assert type(unet) is not cls and unet.dtype == torch.float32
            with tuning.fixed_dtype(unet):  # nested: left as it is
                pass
            assert type(unet) is not cls
            raise RuntimeError("boom")
    assert type(unet) is cls  # restored on an exception too
    unet.to(torch.bfloat16)
    assert unet.dtype == torch.bfloat16  # diffusers' property again, not the fixed value
    plain = torch.nn.Linear(2, 2)  # no dtype property: left alone
    with tuning.fixed_dtype(plain):
        assert type(plain) is torch.nn.Linear


def test_train_bf16_on_a_cpu_without_it_warns_and_trains_in_fp32(tmp_path, image_folder, monkeypatch, caplog):
    from ddpmkit import train_parts
    from ddpmkit.trainer import Trainer

    monkeypatch.setattr(train_parts, "native_bf16", lambda device: False)
    config = ddpmkit.TrainConfig(dataset=str(image_folder), preset="micro", image_size=8, batch_size=4, max_steps=1,
                                 device="cpu", mixed_precision="bf16", output_dir=str(tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="ddpmkit"):
        trainer = Trainer(config.validate())
    assert "training in fp32" in caplog.text and trainer.accelerator.mixed_precision == "no"


def test_sample_cli_takes_dtype_and_channels_last():
    args = build_parser().parse_args(["sample", "--model", "m", "--dtype", "bf16", "--no-channels_last"])
    assert (args.dtype, args.channels_last) == ("bf16", False)
    assert build_parser().parse_args(["sample", "--model", "m"]).dtype == "auto"
    with pytest.raises(UserError, match="--dtype"):
        build_parser().parse_args(["sample", "--model", "m", "--dtype", "fp8"])


def test_a_second_training_in_the_same_process_may_use_another_precision(tmp_path, image_folder):
    """accelerate keeps the first Accelerator's precision for the whole process and refuses another (found on a GPU,
    where the speed benchmark trains in fp32 and then in bf16): the trainer starts each run with its own."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ddpmkit.trainer import Trainer

    AcceleratorState._reset_state()  # whatever an earlier test left
    Accelerator(mixed_precision="bf16", cpu=True)  # an earlier run in this process, in another precision
    config = ddpmkit.TrainConfig(dataset=str(image_folder), preset="micro", image_size=8, batch_size=4, max_steps=1,
                                 device="cpu", output_dir=str(tmp_path / "run"))
    assert Trainer(config.validate()).accelerator.mixed_precision == "no"


def test_the_loss_is_read_from_the_device_once_per_log_every_steps_and_every_step_is_still_logged(
        tmp_path, image_folder, monkeypatch):
    """No host synchronisation inside a training step (on a GPU it stalls the queue every step): the losses stay on
    the device and are read in one transfer every --log_every steps and at the last one; loss.jsonl has each step."""
    from ddpmkit.trainer import Trainer

    config = ddpmkit.TrainConfig(dataset=str(image_folder), preset="micro", image_size=8, batch_size=4, max_steps=25,
                                 log_every=10, device="cpu", output_dir=str(tmp_path / "run"), num_sample_images=1,
                                 sample_steps=1)
    trainer = Trainer(config.validate())
    reads, syncs, in_step = [], [], [False]
    read, run_step = trainer.losses.read, trainer.run_step

    def counted_read(*args):
        reads.append(trainer.global_step)
        return read(*args)

    def marked_step(batch):
        in_step[0] = True
        try:
            return run_step(batch)
        finally:
            in_step[0] = False

    for name in ("item", "tolist", "__bool__", "__float__", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code  # the trainer's own reads: torch's AdamW reads its CPU step counter
            if in_step[0] and "ddpmkit" in caller.co_filename and "tests" not in caller.co_filename:
                syncs.append(f"{_name} in {caller.co_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    trainer.losses.read, trainer.run_step = counted_read, marked_step
    trainer.run()
    monkeypatch.undo()
    assert reads == [10, 20, 25]
    assert syncs == [], f"a training step read a value back to the host: {sorted(set(syncs))}"
    records = runs.read_loss_log(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 26))
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in records)
    with pytest.raises(UserError, match="--log_every"):
        ddpmkit.TrainConfig(log_every=0).validate()


def test_compile_runs_full_batches_compiled_and_a_shorter_last_batch_eagerly(tmp_path, image_folder, monkeypatch):
    """--compile: torch.compile (replaced here: a real CPU compile takes minutes; benchmarks/speed.py measures it)
    wraps the training forward only; an epoch's shorter last batch runs on the same weights eagerly; the saved
    pipeline is the plain UNet."""
    from ddpmkit.trainer import Trainer

    calls = []

    def fake_compile(module, **kwargs):
        def compiled(*args, **kw):
            calls.append(args[0].shape[0])
            return module(*args, **kw)

        assert kwargs.get("dynamic") is False
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    n = len(list(image_folder.iterdir()))
    config = ddpmkit.TrainConfig(dataset=str(image_folder), preset="micro", image_size=8, batch_size=n - 1,
                                 max_steps=2, compile=True, device="cpu", output_dir=str(tmp_path / "run"),
                                 num_sample_images=1, sample_steps=1)
    out = Trainer(config.validate()).run()
    assert calls == [n - 1], "the full batch compiled, the 1-image last batch eager"
    assert DDPMPipeline.from_pretrained(out).unet.config.sample_size == 8

    monkeypatch.setattr("ddpmkit.config._cxx_compiler", lambda: None)
    monkeypatch.setattr("ddpmkit.config.torch_cuda_available", lambda: False)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        ddpmkit.TrainConfig(compile=True, device="cpu").validate()


def test_the_tuners_probe_is_a_sampling_call_with_its_casts(monkeypatch):
    """What the tuner times is what `model_fn` runs: a float32 x cast to the dtype and format, the forward, the
    output cast back to float32 (on a GPU the casts alone turned a measured bf16 gain into a loss for a small model)."""
    unet = make_micro_unet()
    seen = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append((self.dtype, args[0] if args else kwargs.get("dtype")))
        return original(self, *args, **kwargs)

    run = tuning._forward(unet, torch.bfloat16, True, 2, {})
    monkeypatch.setattr(torch.Tensor, "to", spy)
    out = run()
    monkeypatch.undo()
    assert out.dtype == torch.float32 and out.shape == (2, 3, 8, 8)
    assert (torch.float32, torch.bfloat16) in seen and (torch.bfloat16, torch.float32) in seen
    assert next(unet.parameters()).dtype == torch.float32, "the probe runs on a copy"


def test_an_analytic_model_keeps_its_own_arithmetic_on_a_cpu_with_native_bf16(monkeypatch):
    """An exact denoiser (no convolutions) is never cast to bf16 nor timed, even where bf16 is native (AVX-512)."""
    from ddpmkit.oracle import ExactScoreModel, default_mixture

    monkeypatch.setattr(tuning, "native_bf16", lambda device: True)
    monkeypatch.setattr(tuning, "_cached_measurements", lambda *a, **k: pytest.fail("an analytic model was timed"))
    model = ExactScoreModel(default_mixture(), ddpmkit.models.new_noise_scheduler().alphas_cumprod)
    choice = tuning.choose(model, num_images=32)
    assert choice.dtype == torch.float32 and "analytic model" in choice.why and choice.batch_size == 32
    assert tuning.choose(model, num_images=32, dtype="bf16").dtype == torch.bfloat16  # asked for by name: as asked


def test_sampling_in_bf16_casts_a_copy_without_diffusers_float32_modules_warning(monkeypatch):
    """UNet2DModel declares no float32 modules, yet diffusers' `to(dtype)` warned on every cast ("There are modules
    in UNet2DModel that should be kept in float32: []"): twice per `sample()` in bf16 on a CPU with native bf16. The
    copy is cast all the same, and the caller's weights stay float32."""
    from diffusers.models import modeling_utils

    warned = []
    monkeypatch.setattr(modeling_utils.logger, "warning", lambda msg, *a, **k: warned.append(msg))
    unet = make_micro_unet()
    with tuning.unet_for_sampling(unet, torch.bfloat16, channels_last=False) as model:
        assert next(model.parameters()).dtype == torch.bfloat16
    tuning._forward(unet, torch.bfloat16, False, 2, {})
    assert not warned, warned
    assert next(unet.parameters()).dtype == torch.float32
