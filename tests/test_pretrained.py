"""Pretrained pipelines: folders written by plain diffusers load and sample, nothing in a model folder is
executed, Hub ids fail offline with a one-line message; and the Hub side: model card and push."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel

from conftest import make_micro_unet, save_plain_pipeline, write_images
from ddpmkit.runs import LOSS_LOG
from ddpmkit import hub
from ddpmkit.cli import build_parser, config_from_args, main
from ddpmkit.config import TrainConfig
from ddpmkit.errors import UserError
from ddpmkit.images import to_uint8_hwc
from ddpmkit.models import load_pipeline
from ddpmkit.sampling import sample



@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache: no Hub id can resolve."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("safe_serialization, weights_file", [
    (True, "diffusion_pytorch_model.safetensors"),
    (False, "diffusion_pytorch_model.bin"),
])
def test_plain_diffusers_folder_loads_and_samples_like_ddpmpipeline(tmp_path, safe_serialization, weights_file):
    folder = save_plain_pipeline(tmp_path / "pipe", safe_serialization=safe_serialization)
    assert (folder / "unet" / weights_file).exists()
    pipe = load_pipeline(folder)
    original = make_micro_unet(8).state_dict()
    assert all(torch.equal(original[k], v) for k, v in pipe.unet.state_dict().items())
    # the one loop reproduces DDPMPipeline.__call__ for the same seed (DDPM, one batch, float32)
    ours = sample(pipe, scheduler="ddpm", steps=20, num_images=2, seed=0, progress=False)
    reference = DDPMPipeline.from_pretrained(folder)(batch_size=2, num_inference_steps=20, output_type="np",
                                                     generator=torch.Generator("cpu").manual_seed(0)).images
    np.testing.assert_array_equal(to_uint8_hwc(ours.images), (reference * 255).round().astype(np.uint8))


def test_ddim_pipeline_folder_loads_with_its_schedule(tmp_path):
    scheduler = DDIMScheduler(num_train_timesteps=500, beta_schedule="linear", prediction_type="v_prediction")
    DDIMPipeline(unet=make_micro_unet(8), scheduler=scheduler).save_pretrained(tmp_path / "ddim")
    pipe = load_pipeline(tmp_path / "ddim")
    assert pipe.scheduler.config.num_train_timesteps == 500
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(pipe.scheduler.alphas_cumprod, scheduler.alphas_cumprod)
    out = sample(pipe, scheduler="ddim", steps=5, num_images=2, seed=0, progress=False)
    assert out.images.shape == (2, 3, 8, 8) and torch.isfinite(out.images).all()


def test_malicious_pickle_in_bin_weights_does_not_run(tmp_path):
    folder = save_plain_pipeline(tmp_path / "evil", safe_serialization=False)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # what a hostile checkpoint does: call any function while being unpickled
            return (Path.write_text, (marker, "code ran"))

    torch.save({"conv_in.weight": Payload()}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="could not load the pipeline"):
        load_pipeline(folder)
    assert not marker.exists()


def test_model_index_classes_are_never_imported(tmp_path, monkeypatch):
    folder = save_plain_pipeline(tmp_path / "custom")
    marker = tmp_path / "imported"
    (folder / "evil_pipeline.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                             "class EvilPipeline: pass\nclass EvilUNet: pass\n")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(_class_name=["evil_pipeline", "EvilPipeline"], unet=["evil_pipeline", "EvilUNet"])
    (folder / "model_index.json").write_text(json.dumps(index))
    monkeypatch.chdir(folder)  # even with the folder importable from the working directory
    monkeypatch.syspath_prepend(str(folder))
    with pytest.raises(UserError, match="ddpmkit supports unconditional pixel-space pipelines"):
        load_pipeline(folder)  # refused from the JSON alone: nothing named in it is imported
    assert not marker.exists()
    index.update(_class_name="DDPMPipeline", unet=["diffusers", "UNet2DModel"])
    (folder / "model_index.json").write_text(json.dumps(index))
    assert isinstance(load_pipeline(folder).unet, UNet2DModel) and not marker.exists()


AUDITED_LOAD = """
import json, sys
from ddpmkit.errors import UserError
from ddpmkit.models import load_pipeline
events = []
sys.addaudithook(lambda event, args: events.append((event, str(args[0]))) if event in ("open", "import") else None)
results = []
for folder in sys.argv[1:]:
    try:
        load_pipeline(folder)
        results.append("loaded")
    except UserError as err:
        results.append(f"refused: {err}")
print(json.dumps({"results": results, "events": events}))
"""


@pytest.mark.slow  # a fresh process (~10 s of imports)
def test_config_keys_and_types_cannot_import_a_module_or_open_a_path_outside_the_folder(tmp_path):
    """Unexpected keys and values in model_index.json, unet/config.json and scheduler_config.json naming modules
    (in the folder and on sys.path) and paths outside the folder: loading, watched by an audit hook in a fresh
    process, imports none of them and opens nothing outside the folders but Python's own files. One folder is
    otherwise valid (it loads), the other names a pipeline class from a module (it is refused)."""
    import os
    import subprocess
    import sys

    secret = tmp_path / "outside_secret.txt"
    secret.write_text("secret")
    (tmp_path / "evil_mod.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\nclass Evil: pass\n")
    outside = {"_name_or_path": str(secret), "custom_pipeline": "evil_mod", "trust_remote_code": True,
               "auto_map": {"AutoModel": "evil_mod.Evil"}, "config_file": "../outside_secret.txt",
               "weights_name": "../../outside_secret.txt", "_use_default_values": ["../outside_secret.txt"]}

    def edit(path: Path, **changes):
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    folders = []
    for name, index in (("extra_keys", {}), ("hostile_class", {"_class_name": ["evil_mod", "Evil"]})):
        folder = save_plain_pipeline(tmp_path / name)
        (folder / "evil_mod.py").write_text((tmp_path / "evil_mod.py").read_text())
        edit(folder / "model_index.json", scheduler=["evil_mod", "Evil"], **outside, **index)
        edit(folder / "unet" / "config.json", **outside)
        edit(folder / "scheduler" / "scheduler_config.json", _class_name="evil_mod.Evil", **outside)
        folders.append(folder)

    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", AUDITED_LOAD, *map(str, folders)], cwd=folders[0], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["results"][0] == "loaded", report["results"]
    assert report["results"][1].startswith("refused: ") and "ddpmkit supports" in report["results"][1]
    imported = [name for event, name in report["events"] if event == "import"]
    assert not [m for m in imported if "evil" in m], imported
    assert not (tmp_path / "pwned").exists()
    python_files = tuple(str(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix, *sys.path} if p)
    opened = {str(Path(path).resolve()) for event, path in report["events"] if event == "open"}
    inside = tuple(str(f.resolve()) for f in folders)
    outside_folders = [p for p in opened if not p.startswith((*inside, *python_files, "/proc", "/dev", "/sys",
                                                              "/etc/ld.so", "/usr/lib", "/lib"))]
    assert str(secret.resolve()) not in opened and not outside_folders, outside_folders
    assert any(p.startswith(inside[0]) for p in opened), "the hook saw the folder's own files being read"


def test_hub_id_offline_without_cache_is_one_line(empty_hub_cache, tmp_path, capsys):
    with pytest.raises(UserError) as err:
        load_pipeline("google/ddpm-cifar10-32")
    message = str(err.value)
    assert "\n" not in message and "local folder" in message and "HF_HUB_OFFLINE" in message
    code = main(["sample", "--model", "google/ddpm-celebahq-256", "--out", str(tmp_path / "x.png")])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and len(stderr.splitlines()) == 1 and "google/ddpm-celebahq-256" in stderr


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """Online mode (no HF_HUB_OFFLINE), an empty Hugging Face cache, and a Hub host name that does not resolve, as on a
    laptop without network; any request that still goes out fails the test."""
    import socket

    import huggingface_hub.utils._http as hub_http
    from huggingface_hub import constants

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_request(*args, **kwargs):  # past huggingface_hub's offline check, on its way to the network
        raise AssertionError("a request went out to the Hub")

    for variable in hub.PROXY_VARIABLES + ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    import datasets.config

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # datasets' own copies, read when it was first imported
        monkeypatch.setattr(datasets.config, name, False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub.socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(hub_http.httpx2.HTTPTransport, "handle_request", no_request)
    return tmp_path / "hf-cache"


def test_hub_id_without_network_loads_from_the_cache_or_fails_in_one_line_at_once(no_network, tmp_path, capsys):
    """Without network a Hub id reads the cache only (huggingface_hub retried for 30 s, printing ten warnings, and
    then blamed a missing config.json): a cached model loads, a missing one is one line naming the cause."""
    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = no_network / "models--someone--tiny"
    save_plain_pipeline(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    pipe = load_pipeline("someone/tiny")
    original = make_micro_unet(8).state_dict()
    assert all(torch.equal(original[k], v) for k, v in pipe.unet.state_dict().items())
    assert constants.HF_HUB_OFFLINE is False  # online mode is back after the load
    code = main(["sample", "--model", "someone/missing", "--out", str(tmp_path / "x.png")])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert "'someone/missing' is not in the Hugging Face cache and the Hub cannot be reached (huggingface.co does " \
        "not resolve" in stderr and "local folder" in stderr
    assert not (tmp_path / "x.png").exists()


def test_hub_dataset_without_network_reads_the_cache_only(no_network, monkeypatch, tmp_path, capsys):
    import datasets

    seen = []

    def load_dataset(source, split):  # datasets' own offline mode is on while it loads
        seen.append((source, datasets.config.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't reach '{source}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    code = main(["train", "--dataset", "huggan/smithsonian_butterflies_subset", "--max_steps", "1",
                 "--output_dir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err.strip()
    assert seen == [("huggan/smithsonian_butterflies_subset", True)] and datasets.config.HF_HUB_OFFLINE is False
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert "dataset 'huggan/smithsonian_butterflies_subset' is not in the Hugging Face cache and the Hub cannot be " \
        "reached" in stderr and "local image folder" in stderr


def test_clip_without_network_is_one_line_naming_the_cause(no_network):
    from ddpmkit.guidance import load_clip

    with pytest.raises(UserError) as err:
        load_clip("openai/clip-vit-base-patch32")
    assert "no CLIP weights for openai/clip-vit-base-patch32 (the Hub cannot be reached: huggingface.co does not " \
        "resolve" in str(err.value) and "\n" not in str(err.value)


def test_missing_folder_under_a_local_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, capsys):
    """`runs/mine` has the form of a Hub id; when runs/ is here, a typo in it is a missing folder, at once (the Hub
    lookup retried for 40 s online, and its message spoke of the Hub cache)."""
    monkeypatch.chdir(tmp_path)
    save_plain_pipeline(tmp_path / "runs" / "mine")
    code = main(["sample", "--model", "runs/mien", "--out", str(tmp_path / "x.png")])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert "model folder runs/mien does not exist" in stderr and "not read as a Hub id" in stderr


@pytest.mark.parametrize("make, expected", [
    (lambda root: write_images(root / "imgs", n=2) and root / "imgs", "not a diffusion pipeline folder"),
    (lambda root: save_plain_pipeline(root / "p") / "unet" / "config.json", "is a file"),
    (lambda root: root / "no" / "such" / "folder", "does not exist"),
])
def test_model_that_is_not_a_pipeline_folder_is_a_user_error(tmp_path, capsys, make, expected):
    model = make(tmp_path)
    code = main(["sample", "--model", str(model), "--out", str(tmp_path / "x.png")])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and expected in stderr and len(stderr.splitlines()) == 1


# ---------------------------------------------------------------------------- model card
def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_model_card_of_a_finetune_has_metadata_command_and_usage(tmp_path):
    folder = save_plain_pipeline(tmp_path / "pipe")
    write_images(tmp_path / "grid_src", n=1)
    config = TrainConfig(init_from="google/ddpm-cifar10-32", dataset="huggan/smithsonian_butterflies_subset",
                         image_size=32, batch_size=8, num_epochs=3, lr=2e-5, use_ema=True,
                         output_dir=str(tmp_path / "run"), model_save_name="butterflies", hub_model_id="me/butterflies")
    losses = [{"step": i + 1, "loss": 1.0 - 0.01 * i} for i in range(40)]
    hub.write_model_card(folder, config, sample_grid=str(tmp_path / "grid_src" / "img_000.png"), losses=losses)
    card = _card(folder)
    assert card.data.license == "apache-2.0" and card.data.library_name == "diffusers"
    assert set(hub.TAGS) <= set(card.data.tags)
    assert card.data.base_model == "google/ddpm-cifar10-32"
    assert card.data.datasets == ["huggan/smithsonian_butterflies_subset"]
    text = card.text
    assert 'DDPMPipeline.from_pretrained("me/butterflies")' in text
    assert "![samples](img_000.png)" in text and (folder / "img_000.png").exists()  # grid copied beside the card
    assert "| lr | 2e-05 |" in text and "| use_ema | True |" in text and "| steps trained | 40 |" in text
    assert "0.6550 (mean of the last 10 steps; the first 10 steps: 0.9550)" in text
    # the command in the card is a working command that gives back the same configuration
    command = next(line for line in text.splitlines() if line.startswith("ddpmkit finetune"))
    assert "--start_model google/ddpm-cifar10-32" in command
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert config_from_args(TrainConfig, args) == config


def test_model_card_from_scratch_has_no_base_model(tmp_path):
    folder = save_plain_pipeline(tmp_path / "pipe")
    config = TrainConfig(dataset="emoji", image_size=16, max_steps=10, output_dir=str(folder))
    hub.write_model_card(folder, config)
    card = _card(folder)
    assert card.data.base_model is None and card.data.datasets is None
    command = next(line for line in card.text.splitlines() if line.startswith("ddpmkit train"))
    assert config_from_args(TrainConfig, build_parser().parse_args(shlex.split(command)[1:])) == config
    assert "![samples]" not in card.text


# ---------------------------------------------------------------------------- push
@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A run folder that is also the pipeline folder, with what training leaves beside the pipeline."""
    folder = save_plain_pipeline(tmp_path / "run")
    hub.write_model_card(folder, TrainConfig(output_dir=str(folder)))
    for extra in ("checkpoints/step_0000010/optimizer.bin", "logs/ddpmkit/events.out.tfevents.1",
                  "step_10/model_index.json", "step_10/unet/config.json", "wandb/latest-run/run.wandb",
                  "samples/step_000010.png", LOSS_LOG):
        (folder / extra).parent.mkdir(parents=True, exist_ok=True)
        (folder / extra).write_text("x")
    return folder


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def online(monkeypatch):
    """Online mode with the Hub's host name resolving (the Hub's API calls themselves are replaced by each test)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)


def test_push_without_token_is_one_line_and_keeps_the_folder(run_folder, online, monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = _files(run_folder)
    with pytest.raises(UserError) as err:
        hub.push_to_hub(run_folder, "me/model")
    message = str(err.value)
    assert "\n" not in message and "hf auth login" in message and f"hf upload me/model {run_folder}" in message
    assert _files(run_folder) == before


def test_push_offline_or_without_network_is_one_line(run_folder, monkeypatch, no_network):
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        hub.push_to_hub(run_folder, "me/model", token="hf_x")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match=r"cannot push to the Hub: it cannot be reached \(huggingface.co does not "
                       r"resolve: Name or service not known\); the pipeline is kept in"):
        hub.push_to_hub(run_folder, "me/model", token="hf_x")

    def unreachable(self, *args, **kwargs):  # the name resolves but the connection fails
        import httpx2

        raise httpx2.ConnectError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    with pytest.raises(UserError, match=r"could not push to me/model \(\[Errno 101\] Network is unreachable"):
        hub.push_to_hub(run_folder, "me/model", token="hf_x")
    assert (run_folder / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_push_creates_the_repo_and_uploads_the_pipeline_without_training_state(run_folder, online, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs, self.token))
        uploaded = set(filter_repo_objects(sorted(_files(Path(kwargs["folder_path"]))),
                                           ignore_patterns=kwargs["ignore_patterns"]))
        calls.append(("uploaded", uploaded))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = hub.push_to_hub(run_folder, "me/model", private=True, token="hf_test")
    assert url == "https://huggingface.co/me/model"
    (_, repo, create_kwargs, token), (_, repo2, upload_kwargs, _), (_, uploaded) = calls
    assert repo == repo2 == "me/model" and token == "hf_test"
    assert create_kwargs["exist_ok"] and create_kwargs["private"]
    assert Path(upload_kwargs["folder_path"]) == run_folder
    assert uploaded == {"model_index.json", "README.md", "unet/config.json",
                        "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                        "samples/step_000010.png", LOSS_LOG}


def test_push_bad_repo_id_or_folder(run_folder, tmp_path):
    with pytest.raises(UserError, match="user/name"):
        hub.push_to_hub(run_folder, "not a repo id")
    with pytest.raises(UserError, match="not a pipeline folder"):
        hub.push_to_hub(tmp_path / "nothing", "me/model")


def test_a_run_without_its_final_pipeline_points_at_its_last_saved_one(tmp_path, capsys):
    """--model RUN while the run trains (or after a stop): the pipeline it saved last (by step, 10 after 9), not
    'train one with ddpmkit train'."""
    run = tmp_path / "run"
    for step in (9, 10):
        save_plain_pipeline(run / f"step_{step}")
    (run / "train_config.json").write_text("{}")
    code = main(["sample", "--model", str(run), "--out", str(tmp_path / "x.png")])
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and len(stderr.splitlines()) == 1, stderr
    assert f"is a run without its final pipeline yet: sample its last saved pipeline, {run / 'step_10'}" in stderr
