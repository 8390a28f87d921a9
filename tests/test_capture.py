"""CUDA graphs (`ddpmkit.capture`) without a GPU: the captured training step and the replayed sampling calls run on
the CPU with `RecordedGraphs`, a stand-in for torch.cuda's graphs that has their two properties that matter here:
a replay runs the ATen calls the capture recorded, with the same tensors and the same Python numbers (a learning
rate passed as a float would stay the capture's), and a host read inside a capture fails. With it: the captured step
gives the eager step's losses and weights (to the fused AdamW's rounding) with the learning-rate schedule, the EMA
warm-up and label drops; it resumes bit for bit; --skip_nonfinite skips; weights given new memory are captured again;
sampling replays one graph per shape and gives the eager images bit for bit. The CPU's own step is unchanged. The real
torch.compile step on the CPU against the eager one is a `long` test (its compile takes minutes)."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from conftest import make_micro_unet
from diffusers import DDPMPipeline
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ddpmkit
from ddpmkit import capture, runs, tuning
from ddpmkit.config import TrainConfig
from ddpmkit.data import ImageData, ShuffledBatches
from ddpmkit.errors import UserError
from ddpmkit.trainer import Trainer

aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.equal, aten.masked_select}


class _Recorder(TorchDispatchMode):
    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_READS:
            raise RuntimeError(f"{func} reads a value back to the host inside a capture (a CUDA graph cannot)")
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class RecordedGraph:
    """Capture runs the work once and records each ATen call; a replay runs the calls again on the same tensors,
    writing each result into the tensor the capture produced. The replay right after the capture is skipped (a CUDA
    capture runs nothing, so its first replay is the work the capture did here)."""

    def __init__(self):
        self.calls, self.fresh, self.replays = [], True, 0

    @torch.no_grad()
    def replay(self):
        self.replays += 1
        if self.fresh:
            self.fresh = False
            return
        for func, args, kwargs, out in self.calls:
            result = func(*args, **kwargs)
            for old, new in zip(tree_flatten(out)[0], tree_flatten(result)[0]):
                if isinstance(old, torch.Tensor) and old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr():
                    old.copy_(new)


class RecordedGraphs:
    """`capture.CudaGraphs`' members, on the CPU."""

    capturable = False  # torch's AdamW(capturable=True) is for accelerators; the fused CPU kernel keeps its step in a tensor

    def __init__(self):
        self.graphs: list[RecordedGraph] = []

    def new_graph(self):
        self.graphs.append(RecordedGraph())
        return self.graphs[-1]

    def capture(self, graph, generators=(), pool=None):
        return _Recorder(graph.calls)

    def side_stream(self):
        return contextlib.nullcontext()


@pytest.fixture
def graphs(monkeypatch) -> RecordedGraphs:
    """The CPU captured as a GPU would be (the seam `capture.cuda_graphs`)."""
    backend = RecordedGraphs()
    monkeypatch.setattr(capture, "cuda_graphs", lambda device: backend)
    return backend


def _data(n: int = 12) -> ImageData:
    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
                     labels=torch.arange(n) % 3, class_names=["a", "b", "c"])


def _config(tmp_path, name: str, **overrides) -> TrainConfig:
    """EMA with its warm-up, a warm-up + cosine learning rate, clipping, label drops: each changes every step, so a
    number baked into a graph shows."""
    base = dict(preset="micro", image_size=8, batch_size=4, max_steps=10, device="cpu", seed=0, use_ema=True,
                lr=2e-3, lr_scheduler="cosine", lr_warmup_steps=3, class_column="label", max_grad_norm=0.5,
                num_sample_images=2, sample_steps=2, output_dir=str(tmp_path / name))
    return TrainConfig(**{**base, **overrides}).validate()


def _train(config: TrainConfig, data: ImageData | None = None) -> Trainer:
    trainer = Trainer(config, data=data or _data())
    trainer.run()
    return trainer


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.unet.parameters()]


def _losses(config: TrainConfig) -> list:
    return [r["loss"] for r in runs.read_loss_log(config.output_dir)]


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the stand-in is a CUDA graph
def test_the_stand_in_replays_python_numbers_as_captured_and_refuses_host_reads(graphs):
    x, out, scale = torch.ones(3), torch.zeros(3), [2.0]
    step = capture.Replayed(lambda: out.copy_(x * scale[0]), graphs, warmup=1)
    step()  # warm-up: eager
    step()  # captured
    x.fill_(3.0)
    scale[0] = 10.0  # a Python number: the graph keeps the capture's 2.0
    step()
    assert out.tolist() == [6.0, 6.0, 6.0] and graphs.graphs[0].replays == 2
    reads = capture.Replayed(lambda: x.sum().item(), graphs, warmup=0)
    with pytest.raises(RuntimeError, match="reads a value back to the host"):
        reads()


# ----------------------------------------------------------------------------- the captured training step
def test_the_captured_step_gives_the_eager_steps_losses_and_weights(tmp_path, graphs, caplog):
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        captured = _train(_config(tmp_path, "captured", compile=True))
    assert "captured in CUDA graphs after 3 eager steps" in caplog.text and "no image is left out" in caplog.text
    forward_backward, update = graphs.graphs[:2]
    assert (forward_backward.replays, update.replays) == (7, 7), "steps 4-10 replayed"
    assert len(update.calls) < 40 < len(forward_backward.calls), "clip, fused AdamW and EMA: a few fused calls"
    assert captured.optimizer.optimizer.param_groups[0]["fused"] is True

    eager = _train(_config(tmp_path, "eager"))
    assert eager.captured is None and eager.optimizer.optimizer.param_groups[0]["fused"] is None
    mine, theirs = _losses(captured.config), _losses(eager.config)
    assert len(mine) == 10 and max(abs(a - b) for a, b in zip(mine, theirs)) < 1e-5
    # a learning rate baked into the graph moves the weights by ~1e-3 here; the fused AdamW's rounding by ~1e-5
    assert _max_difference(_weights(captured), _weights(eager)) < 2e-4
    assert _max_difference(captured.ema.shadow_params, eager.ema.shadow_params) < 2e-4
    assert captured.ema.optimization_step == eager.ema.optimization_step == 10
    assert captured.lr_scheduler.get_last_lr() == eager.lr_scheduler.get_last_lr()


def test_a_captured_run_resumes_bit_for_bit(tmp_path, graphs):
    whole = _train(_config(tmp_path, "whole", compile=True, checkpointing_steps=5))
    checkpoint = runs.checkpoints_dir(tmp_path / "whole") / runs.checkpoint_name(5)
    resumed = _train(_config(tmp_path, "resumed", compile=True, resume_from_checkpoint=str(checkpoint)))
    assert resumed.global_step == 10 and graphs.graphs[-2].replays == 2, "steps 6-8 eager, 9-10 replayed"
    assert all(torch.equal(a, b) for a, b in zip(_weights(whole), _weights(resumed)))
    assert all(torch.equal(a, b) for a, b in zip(whole.ema.shadow_params, resumed.ema.shadow_params))
    assert _losses(whole.config)[5:] == _losses(resumed.config), "steps 6-10, in a new folder"


def test_skip_nonfinite_skips_a_replayed_step(tmp_path, graphs, monkeypatch):
    original, calls = ShuffledBatches.batch, []

    def poisoned(self, indices):  # NaN images at step 6, after the capture (step 4)
        calls.append(1)
        batch = original(self, indices)
        return {**batch, "images": batch["images"] * float("nan")} if len(calls) == 6 else batch

    monkeypatch.setattr(ShuffledBatches, "batch", poisoned)
    seen = {}
    run_step = capture.CapturedStep.run_step

    def watched(self, batch):
        if self.trainer.global_step in (5, 6):
            seen[self.trainer.global_step] = [p.detach().clone() for p in self.params]
        return run_step(self, batch)

    monkeypatch.setattr(capture.CapturedStep, "run_step", watched)
    trainer = _train(_config(tmp_path, "skip", compile=True, skip_nonfinite=1))
    records = runs.read_loss_log(tmp_path / "skip")
    assert [r["step"] for r in records if r.get("skipped")] == [6] and len(records) == 10
    assert all(torch.equal(a, b) for a, b in zip(seen[5], seen[6])), "the skipped step left the weights"
    assert all(torch.isfinite(p).all() for p in trainer.unet.parameters())
    calls.clear()
    with pytest.raises(UserError, match="the loss became nan at step 6"):
        _train(_config(tmp_path, "stop", compile=True))


def test_weights_given_new_memory_are_captured_again(tmp_path, graphs, monkeypatch):
    """Sampling during training may switch the weights to channels-last and back (new memory): the graphs, which
    read the old memory, are captured again."""
    run_step = capture.CapturedStep.run_step

    def switching(self, batch):
        if self.trainer.global_step == 6:
            self.trainer.unet.to(memory_format=torch.channels_last)
            self.trainer.unet.to(memory_format=torch.contiguous_format)
        return run_step(self, batch)

    monkeypatch.setattr(capture.CapturedStep, "run_step", switching)
    captured = _train(_config(tmp_path, "moved", compile=True))
    assert [g.replays for g in graphs.graphs[:4]] == [3, 3, 4, 4], "captured at step 4, again at step 7"
    eager = _train(_config(tmp_path, "eager"))
    assert _max_difference(_weights(captured), _weights(eager)) < 2e-4


def test_static_batches_leave_out_the_short_last_batch_and_say_so(tmp_path, graphs, caplog):
    data = _data(10)
    full = ShuffledBatches(data, 4, seed=3)
    static = ShuffledBatches(data, 4, seed=3, drop_last=True)
    assert (len(full), full.dropped) == (3, 0) and (len(static), static.dropped) == (2, 2)
    a, b = iter(full), iter(static)
    first = [next(a) for _ in range(6)]  # two epochs of 4 + 4 + 2
    second = [next(b) for _ in range(4)]  # two epochs of 4 + 4
    assert [x["images"].shape[0] for x in second] == [4] * 4
    for got, expected in zip(second, first[:2] + first[3:5]):  # the same order, without the short batches
        assert torch.equal(got["labels"], expected["labels"])
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        trainer = Trainer(_config(tmp_path, "drop", compile=True), data=data)
    assert trainer.batches.drop_last and "each epoch's last 2 image(s) are left out" in caplog.text


def test_the_cpu_keeps_its_eager_step_and_a_step_that_cannot_be_captured_says_why(tmp_path, caplog):
    assert capture.cuda_graphs("cpu") is None and capture.cuda_graphs("cuda") is not None
    trainer = Trainer(_config(tmp_path, "cpu"), data=_data())
    assert trainer.captured is None and not trainer.batches.drop_last
    assert trainer.optimizer.optimizer.param_groups[0]["fused"] is None, "the CPU's AdamW as before"

    class Accelerator:  # as on a GPU
        device, num_processes = torch.device("cuda"), 1

    config = _config(tmp_path, "x", compile=True)
    assert isinstance(capture.training_graphs(config, Accelerator()), capture.CudaGraphs)
    with caplog.at_level(logging.INFO, logger="ddpmkit"):
        for change, why in ((dict(grad_accumulation_steps=2), "--grad_accumulation_steps"),
                            (dict(mixed_precision="fp16"), "fp16")):
            assert capture.training_graphs(TrainConfig(**{**config.to_dict(), **change}), Accelerator()) is None
            assert why in caplog.text
        Accelerator.num_processes = 2
        assert capture.training_graphs(config, Accelerator()) is None and "several processes" in caplog.text
    assert capture.training_graphs(_config(tmp_path, "y"), Accelerator()) is None, "no --compile: eager"
    with pytest.raises(UserError, match="--compile_kernels .*add --compile"):
        _config(tmp_path, "z", compile_kernels=True)


# ----------------------------------------------------------------------------- the sampling calls
def test_sampling_replays_one_graph_per_shape_and_gives_the_eager_images(graphs, monkeypatch):
    unet = make_micro_unet(8, num_class_embeds=3).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=ddpmkit.models.new_noise_scheduler())
    guide = DDPMPipeline(unet=make_micro_unet(8, num_class_embeds=3, seed=1).eval(), scheduler=pipe.scheduler)
    cfg = dict(scheduler="dpm++", steps=5, num_images=7, seed=1, batch_size=3, dtype="fp32", progress=False,
               class_labels=[0, 1, 0, 1, 0, 1, 0], cfg_scale=3.0)
    autoguided = dict(cfg, cfg_scale=1.0, autoguide=guide, autoguide_scale=2.0)
    eager = [ddpmkit.sample(pipe, **cfg).images, ddpmkit.sample(pipe, **autoguided).images]
    assert graphs.graphs == [], "dtype fp32: DDPMPipeline's eager calls"
    monkeypatch.setattr(tuning, "_resolve_graphs", lambda *args: (True, "; CUDA graphs (the test's)"))
    assert torch.equal(ddpmkit.sample(pipe, **cfg).images, eager[0])
    # 14 rows (a CFG pair per image) in micro-batches of 6, 6 and 2: two shapes, each called once eagerly, then
    # captured and replayed (5 steps: 10 calls of 6 rows and 5 of 2)
    assert sorted(g.replays for g in graphs.graphs) == [4, 9]
    assert torch.equal(ddpmkit.sample(pipe, **autoguided).images, eager[1])
    assert len(graphs.graphs) == 2 + 4, "autoguidance: the main UNet's two shapes (6 and 1 images) and the guide's"


def test_a_graphed_unet_runs_eagerly_with_gradients_and_is_the_unet_otherwise(graphs):
    unet = make_micro_unet(8).eval()
    graphed = capture.GraphedUNet(unet, graphs)
    assert graphed.config is unet.config and graphed.dtype == torch.float32
    x = torch.randn(2, 3, 8, 8)
    with torch.enable_grad():
        assert torch.equal(graphed(x, 10).sample, unet(x, 10).sample) and graphs.graphs == []
    with torch.inference_mode():
        outputs = [graphed(x * i, 10 * i).sample for i in (1, 2, 3)]  # eager, captured, replayed
        assert all(torch.equal(o, unet(x * i, 10 * i).sample) for o, i in zip(outputs, (1, 2, 3)))
    assert outputs[1].data_ptr() != outputs[2].data_ptr(), "each call's output is its own"


def test_the_tuner_measures_graphs_against_eager_calls_only_on_a_gpu(graphs, monkeypatch):
    unet = make_micro_unet(8).eval()
    monkeypatch.setattr(tuning, "_cached_measurements", lambda unet, what, settings: {
        name: 200.0 if setting[3] else 100.0 for name, setting in settings.items()})  # graphs: 2x
    choice = tuning.choose(unet, num_images=32)
    assert choice.graphs and "CUDA graphs measured 2.00x eager calls" in choice.why
    assert "CUDA graphs" in choice.describe()
    assert not tuning.choose(unet, num_images=32, dtype="fp32").graphs, "fp32 by name: eager, as DDPMPipeline"
    monkeypatch.setattr(capture, "cuda_graphs", lambda device: None)  # the CPU
    assert not tuning.choose(unet, num_images=32).graphs
    with pytest.raises(UserError, match="CUDA graphs need a CUDA GPU"):
        tuning.choose(unet, num_images=32, graphs=True)


# ----------------------------------------------------------------------------- torch.compile on the CPU
@pytest.mark.long  # inductor compiles the micro UNet's forward and backward: minutes on a 2-core CPU
def test_the_compiled_step_gives_the_eager_steps_losses_on_the_cpu(tmp_path):
    eager = _train(_config(tmp_path, "eager", max_steps=4))
    compiled = _train(_config(tmp_path, "compiled", max_steps=4, compile=True))
    assert compiled.compiled is not None and compiled.captured is None
    mine, theirs = _losses(compiled.config), _losses(eager.config)
    assert len(mine) == 4 and max(abs(a - b) / b for a, b in zip(mine, theirs)) < 1e-4
    assert _max_difference(_weights(compiled), _weights(eager)) < 1e-4
