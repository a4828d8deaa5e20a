"""Training scales out with torchrun (DistributedDataParallel); on CPU the gloo backend runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import hashlib, json, os, sys
    from pathlib import Path
    import torch
    import trainer.train_segmenter as ts
    from trainer.config import TrainConfig
    from wbc_core.data.loader import load_dataset

    out, data = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = TrainConfig.from_dict({
        "model": {"min_size": 96, "max_size": 128, "fpn_channels": 32, "mask_resolution": 7},
        "train": {"epochs": 2, "batch_size": 1, "warmup_steps": 1, "num_workers": 0, "threads": 1,
                  "checkpoint_every": 0, "device": "cpu"},
    })
    dataset = load_dataset(data, label_map=cfg.labels, require_images=True)
    epochs, models = [], []
    real_iter, real_build = ts.EpochSampler.__iter__, ts.build_model

    def recording_iter(self):
        items = list(real_iter(self))
        epochs.append(items)
        return iter(items)

    def recording_build(*args, **kwargs):
        models.append(real_build(*args, **kwargs))
        return models[-1]

    ts.EpochSampler.__iter__, ts.build_model = recording_iter, recording_build
    bundle = ts.train_segmenter(cfg, dataset, out / "run", progress=False)

    def sha(state):
        return hashlib.sha256(b"".join(v.detach().cpu().numpy().tobytes() for v in state.values())).hexdigest()

    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({
        "epochs": epochs, "live_sha": sha(models[0].state_dict()),
        "bundle_sha": sha(torch.load(bundle / "model.pt", weights_only=True)),
        "world": torch.distributed.get_world_size()}))
""")


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_model(tmp_path: Path) -> None:
    from trainer.synthetic import generate_task

    generate_task(tmp_path / "data", n_images=6, width=128, height=96, seed=3)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), str(tmp_path / "data")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["live_sha"] == ranks[1]["live_sha"]      # both ranks hold the same trained weights
    assert ranks[0]["live_sha"] == ranks[0]["bundle_sha"]     # and rank 0 wrote exactly those to the bundle
    assert len(ranks[0]["epochs"]) == len(ranks[1]["epochs"]) == 2
    for a, b in zip(ranks[0]["epochs"], ranks[1]["epochs"], strict=True):
        assert len(a) == len(b) == 3 and sorted(a + b) == list(range(6))  # each epoch split between the ranks
    bundle = yaml.safe_load((tmp_path / "run" / "bundle" / "bundle.yaml").read_text())
    assert bundle["provenance"]["processes"] == 2
