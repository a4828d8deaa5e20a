"""Training end to end on small synthetic slides: learns, evaluates, resumes exactly, survives a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from trainer.config import TrainConfig
from trainer.evaluate import evaluate_bundle
from trainer.synthetic import generate_task
from trainer.train_segmenter import CHECKPOINT, lr_factor, train_segmenter
from wbc_core.data.loader import load_dataset
from wbc_core.detect import Predictor
from wbc_core.model import WeightsError

pytestmark = pytest.mark.slow

TINY = {
    "model": {"max_size": 320, "min_size": 240, "mask_resolution": 14, "fpn_channels": 64},
    "train": {"epochs": 2, "batch_size": 2, "lr": 2.0e-3, "warmup_steps": 5, "checkpoint_every": 2,
              "num_workers": 0, "threads": 2, "device": "cpu"},
    "augment": {"blur_p": 0.0},
}


def tiny_config(**train: object) -> TrainConfig:
    data = {k: dict(v) for k, v in TINY.items()}
    data["train"].update(train)
    return TrainConfig.from_dict(data)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    generate_task(root / "train", n_images=16, width=640, height=480, seed=11)
    generate_task(root / "test", n_images=4, width=640, height=480, seed=12)
    return root / "train", root / "test"


def test_trains_and_finds_cells(tasks: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = tiny_config(epochs=12)
    train = load_dataset(tasks[0], label_map=cfg.labels, require_images=True)
    test = load_dataset(tasks[1], label_map=cfg.labels, require_images=True)
    bundle = train_segmenter(cfg, train, tmp_path / "run", progress=False)
    losses = [float(r.split(",")[4]) for r in (tmp_path / "run" / "losses.csv").read_text().splitlines()[1:]]
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8, "loss did not go down"
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 1000
    metrics = evaluate_bundle(Predictor(bundle, device="cpu"), test, cfg.labels, out_dir=tmp_path / "eval",
                              overlays=1, class_agnostic=True, progress=False)
    # class-agnostic: the tiny model must at least find and outline the cells
    assert metrics["segm"]["AP50"] > 0.5, metrics["segm"]
    assert (tmp_path / "eval" / "metrics.json").exists()
    assert list((tmp_path / "eval").glob("overlay_*.png"))


def test_min_steps_trains_a_small_set_for_more_epochs(tmp_path: Path) -> None:
    generate_task(tmp_path / "few", n_images=4, width=640, height=480, seed=13)
    cfg = tiny_config(epochs=1, min_steps=5)
    few = load_dataset(tmp_path / "few", label_map=cfg.labels, require_images=True)
    bundle = train_segmenter(cfg, few, tmp_path / "run", progress=False)
    rows = (tmp_path / "run" / "losses.csv").read_text().splitlines()[1:]
    assert len(rows) == 6, "4 frames, batch 2: 3 epochs of 2 steps are the fewest that reach 5 steps"
    assert {r.split(",")[1] for r in rows} == {"0", "1", "2"}
    assert yaml.safe_load((bundle / "bundle.yaml").read_text())["provenance"]["steps"] == 6


def test_max_steps_stops_at_that_step_and_repeats(tmp_path: Path) -> None:
    generate_task(tmp_path / "few", n_images=4, width=640, height=480, seed=13)
    cfg = tiny_config(epochs=1, min_steps=50, max_steps=5, max_minutes=30.0, warmup_steps=1)
    few = load_dataset(tmp_path / "few", label_map=cfg.labels, require_images=True)
    first = train_segmenter(cfg, few, tmp_path / "a", progress=False)
    rows = (tmp_path / "a" / "losses.csv").read_text().splitlines()[1:]
    assert len(rows) == 5, "exactly max_steps: 2.5 epochs of 2 steps, min_steps ignored"
    last_lr = cfg.train.lr * lr_factor(4, 5, 1, cfg.train.min_lr_ratio)
    assert float(rows[-1].split(",")[3]) == pytest.approx(last_lr, rel=0.01), \
        "the schedule spans the 5 steps, not 3 whole epochs"
    again = train_segmenter(cfg, few, tmp_path / "b", progress=False)
    a = torch.load(first / "model.pt", weights_only=True)
    b = torch.load(again / "model.pt", weights_only=True)
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) == 0.0, "same steps, same model"


def test_precise_batchnorm_is_the_plain_mean_over_augmented_training_batches(tasks: tuple[Path, Path]) -> None:
    from trainer.data.segmentation_dataset import SegmentationDataset
    from trainer.train_segmenter import precise_batchnorm
    from wbc_core.model import build_model

    cfg = tiny_config()
    data = load_dataset(tasks[0], label_map=cfg.labels, require_images=True)
    dataset = SegmentationDataset(data, cfg.labels, cfg.model.max_size, cfg.model.min_size, augment=cfg.augment,
                                  scale=cfg.scale)
    model = build_model(cfg.model, len(cfg.labels.classes)).train()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms, "a from-scratch backbone has BatchNorm layers"
    first = norms[0]
    seen: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda _m, args: seen.append(args[0].mean(dim=(0, 2, 3))))
    weights = {k: v.clone() for k, v in model.named_parameters()}
    used = precise_batchnorm(model, dataset, 5, 2, torch.device("cpu"))
    hook.remove()
    assert used == 5 and len(seen) == 3, "5 images in batches of 2"
    assert torch.allclose(first.running_mean, torch.stack(seen).mean(0), atol=1e-5), "each batch counts the same"
    assert first.momentum == 0.1 and model.training, "momentum and train mode are restored"
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in weights.items()), "weights untouched"
    once = first.running_var.clone()
    precise_batchnorm(model, dataset, 5, 2, torch.device("cpu"))
    assert torch.equal(first.running_var, once), "the same draw every time: a run repeats"
    assert precise_batchnorm(model, dataset, 0, 2, torch.device("cpu")) == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_continues_exactly(tasks: tuple[Path, Path], tmp_path: Path, workers: int) -> None:
    # with a worker, the straight run's worker lives across both epochs and the resumed run starts a new one:
    # each index carries its epoch, so both draw the same augmentation
    cfg = tiny_config(epochs=2, num_workers=workers)
    train = load_dataset(tasks[0], label_map=cfg.labels, require_images=True)
    train.images = train.images[:6]
    straight = train_segmenter(cfg, train, tmp_path / "a", progress=False)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(epoch: int, *_: object) -> None:
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train_segmenter(cfg, train, tmp_path / "b", progress=False, on_epoch_end=stop_after_first_epoch)
    with pytest.raises(FileExistsError, match="--resume"):
        train_segmenter(cfg, train, tmp_path / "b", progress=False)
    resumed = train_segmenter(cfg, train, tmp_path / "b", resume=True, progress=False)
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-4, f"resumed weights differ by {worst}"


def test_short_epochs_checkpoint_every_checkpoint_every_steps(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.train_segmenter as ts

    generate_task(tmp_path / "few", n_images=4, width=320, height=240, seed=14)
    cfg = tiny_config(epochs=6, checkpoint_every=5)
    few = load_dataset(tmp_path / "few", label_map=cfg.labels, require_images=True)
    saved: list[int] = []
    real_save = ts.atomic_torch_save

    def recording_save(obj: dict, path: Path) -> None:
        saved.append(obj["step"])
        real_save(obj, path)

    monkeypatch.setattr(ts, "atomic_torch_save", recording_save)
    train_segmenter(cfg, few, tmp_path / "run", progress=False)
    # 6 epochs of 2 steps: every 5 steps (5, 10), at the first epoch end 5 steps after the last one (6), at the end
    assert saved == [5, 6, 10, 12]
    assert (tmp_path / "run" / "loss_curve.png").is_file()


def test_resume_with_other_backbone_is_refused(tasks: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = tiny_config(epochs=1)
    train = load_dataset(tasks[0], label_map=cfg.labels, require_images=True)
    train.images = train.images[:2]
    train_segmenter(cfg, train, tmp_path / "run", progress=False)
    other = tiny_config(epochs=1)
    other.model.backbone = "resnet18_fpn"
    with pytest.raises(WeightsError, match="backbone"):
        train_segmenter(other, train, tmp_path / "run", resume=True, progress=False)


def test_cli_survives_kill_and_resumes(tasks: tuple[Path, Path], tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    data = {k: dict(v) for k, v in TINY.items()}
    data["train"].update(epochs=3, checkpoint_every=1)
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "train-segmenter", "--config", str(config), "--data", str(tasks[0]),
           "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    ckpt = out / CHECKPOINT
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert not (out / "bundle" / "bundle.yaml").exists()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = torch.load(ckpt, weights_only=False)
    assert final["step"] == 3 * 8 > step_at_kill
    assert (out / "bundle" / "bundle.yaml").exists()
    steps = [int(r.split(",")[0]) for r in (out / "losses.csv").read_text().splitlines()[1:]]
    assert steps[-1] == 24


def test_cli_bad_input_exit_codes(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "trainer", "train-segmenter", "--data", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "nope" in run.stderr
    helped = subprocess.run([sys.executable, "-m", "trainer", "train-segmenter", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--resume" in helped.stdout


CAPTURES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "cvat-2.23.1-captures"


@pytest.mark.skipif(not CAPTURES.is_dir(), reason="../shared/reference (real CVAT exports) is not beside the repo")
def test_cli_trains_on_real_cvat_exports(tmp_path: Path) -> None:
    """Both real CVAT 2.23.1 export zips (with images) go straight into training and evaluation."""
    config = tmp_path / "tiny.yaml"
    data = {k: dict(v) for k, v in TINY.items()}
    data["train"].update(epochs=1)
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "trainer", "train-segmenter", "--config", str(config),
         "--data", str(CAPTURES / "task-export-cvat-for-images-1.1-with-images.zip"),
         "--data", str(CAPTURES / "task-export-coco-1.0-with-images.zip"),
         "--val", str(CAPTURES / "task-export-cvat-for-images-1.1-with-images.zip"), "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    bundle = yaml.safe_load((out / "bundle" / "bundle.yaml").read_text())
    assert bundle["classes"][0] == "band cell" and len(bundle["classes"]) == 10
    assert bundle["provenance"]["frames"] == 12  # 6 frames from each export
    assert bundle["provenance"]["cells"] == 10  # 4 polygons + 1 mask per export; rectangles have no outline
    assert "segm" in bundle["metrics"]
    assert (out / "eval" / "metrics.json").exists()
