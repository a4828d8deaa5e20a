"""trainer.registry: versions, verified promotion, rollback, prune, lock, crash leftovers, history, CLI.

The bundles here are tiny (a 2x2 linear layer as "model.pt"): the registry only copies and checksums
files, it never builds the model, so no test needs a real Mask R-CNN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainer.__main__ import main as trainer_main
from trainer.registry import Registry, RegistryBusy, RegistryError
from wbc_core.bundle import write_bundle
from wbc_core.model import SegmenterConfig


def _bundle(directory: Path, threshold: float = 0.5, seed: int = 0) -> Path:
    cfg = SegmenterConfig(min_size=96, max_size=128, fpn_channels=32, mask_resolution=7)
    torch.manual_seed(seed)
    return write_bundle(directory, torch.nn.Linear(2, 2), ["neutrophil", "lymphocyte"], cfg,
                        score_threshold=threshold)


@pytest.fixture
def bundles(tmp_path: Path) -> list[Path]:
    return [_bundle(tmp_path / f"bundle{i}", threshold=0.1 * (i + 1), seed=i) for i in range(4)]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".staging-", ".current-", ".deleting-")))


def test_add_promote_and_current(root: Path, bundles: list[Path]) -> None:
    reg = Registry(root)
    assert not root.exists() and reg.versions() == [] and reg.current() is None and reg.history() == []
    info = {"metrics": {"candidate": {"mask_ap": np.float64(0.41), "macro_f1": 0.7}},
            "data": {"tasks": [12, 13], "frames": 80}, "git": "abc123", "gate": "promote"}
    v1 = reg.add(bundles[0], info)
    v2 = reg.add(bundles[1], {"git": "def456"})
    assert (v1, v2) == ("v0001", "v0002") and reg.versions() == ["v0001", "v0002"]
    assert reg.current() is None, "add never touches current"
    meta = yaml.safe_load((root / v1 / "registry.yaml").read_text())
    assert meta["version"] == v1 and meta["created_at"].endswith("+00:00")
    assert set(meta["files"]) == {"bundle.yaml", "model.pt"} and all(len(h) == 64 for h in meta["files"].values())
    assert meta["metrics"]["candidate"]["mask_ap"] == pytest.approx(0.41) and meta["data"]["tasks"] == [12, 13]
    assert (root / v1 / "model.pt").read_bytes() == (bundles[0] / "model.pt").read_bytes()

    reg.promote(v1, reason="first model")
    assert reg.current() == v1 and os.readlink(root / "current") == "v0001", "a relative symlink"
    assert reg.current_path == root / "current" and (reg.current_path / "bundle.yaml").is_file()
    reg.promote(v2)
    assert reg.current() == v2 and reg.path(v2) == root / "v0002"
    shown = reg.show(v2)
    assert shown["current"] is True and shown["path"] == str(root / "v0002") and shown["git"] == "def456"
    assert reg.show(v1)["current"] is False
    assert _leftovers(root) == []

    events = reg.history()
    assert [(e["kind"], e["version"]) for e in events] == [("added", v1), ("added", v2), ("promoted", v1),
                                                          ("promoted", v2)]
    assert all("time" in e for e in events) and events[2]["reason"] == "first model"
    assert events[3]["previous"] == v1
    with pytest.raises(RegistryError, match="unknown version v0009"):
        reg.path("v0009")
    with pytest.raises(RegistryError, match="not a version name"):
        reg.path("../etc")
    with pytest.raises(RegistryError, match="may not set"):
        reg.add(bundles[2], {"version": "v0100"})


def test_promote_of_a_corrupted_copy_is_refused_and_current_stays(root: Path, bundles: list[Path]) -> None:
    reg = Registry(root)
    v1, v2 = reg.add(bundles[0], {}), reg.add(bundles[1], {})
    reg.promote(v1)
    _flip_byte(root / v2 / "model.pt")
    with pytest.raises(RegistryError, match=r"refused to make v0002 current.*v0002/model\.pt"):
        reg.promote(v2)
    assert reg.current() == v1 and os.readlink(root / "current") == "v0001"
    last = reg.history()[-1]
    assert last["kind"] == "refused" and last["version"] == v2 and "model.pt" in last["error"]
    with pytest.raises(RegistryError, match=r"model\.pt"):
        reg.verify(v2)
    reg.verify(v1)
    (root / v1 / "bundle.yaml").unlink()
    with pytest.raises(RegistryError, match=r"v0001/bundle\.yaml is missing"):
        reg.verify(v1)
    assert _leftovers(root) == []


def test_add_refuses_a_corrupt_bundle_and_leaves_nothing(root: Path, bundles: list[Path]) -> None:
    reg = Registry(root)
    _flip_byte(bundles[0] / "model.pt")
    with pytest.raises(RegistryError, match="corrupt"):
        reg.add(bundles[0], {})
    assert reg.versions() == [] and _leftovers(root) == [] and reg.history() == []
    with pytest.raises(RegistryError, match="does not exist"):
        reg.add(root / "nope", {})


def test_rollback_and_prune_keep_current_and_newest(root: Path, bundles: list[Path]) -> None:
    reg = Registry(root)
    versions = [reg.add(b, {}) for b in bundles]
    assert versions == ["v0001", "v0002", "v0003", "v0004"]
    reg.promote("v0004")
    reg.rollback("v0001")
    assert reg.current() == "v0001"
    rollback = reg.history()[-1]
    assert rollback["kind"] == "rollback" and rollback["previous"] == "v0004"

    assert reg.prune(keep=2) == ["v0002"]
    assert reg.versions() == ["v0001", "v0003", "v0004"] and reg.current() == "v0001"
    assert reg.prune(keep=0) == ["v0003", "v0004"]
    assert reg.versions() == ["v0001"] and (reg.current_path / "model.pt").is_file()
    assert reg.prune(keep=0) == []
    assert reg.add(bundles[0], {}) == "v0005", "numbers seen in the history are never reused"
    assert _leftovers(root) == []
    with pytest.raises(RegistryError):
        reg.prune(keep=-1)


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fh = open(sys.argv[1], "a+")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.seek(0); fh.truncate(); fh.write(f"{os.getpid()}\\n"); fh.flush()
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_lock_held_by_another_process_is_busy(root: Path) -> None:
    reg = Registry(root)
    root.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root / ".retrain.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RegistryBusy, match=rf"held by pid {holder.pid}") as info, reg.lock():
            pass
        assert info.value.pid == holder.pid
        with reg.lock("other"):  # a different lock name is independent
            pass
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    with reg.lock(), pytest.raises(RegistryBusy, match=str(os.getpid())), reg.lock():  # released by the holder
        pass
    assert (root / ".retrain.lock").read_text().strip() == str(os.getpid())


def test_a_crash_mid_add_leaves_current_intact_and_is_cleaned(root: Path, bundles: list[Path]) -> None:
    reg = Registry(root)
    reg.promote(reg.add(bundles[0], {}))
    pid = os.fork()  # the child dies between the verified copy and the rename, without any cleanup
    if pid == 0:
        try:
            os.rename = lambda *a, **k: os._exit(3)
            Registry(root).add(bundles[1], {"note": "crash"})
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    staging = [p for p in root.iterdir() if p.name.startswith(".staging-")]
    assert len(staging) == 1 and (staging[0] / "model.pt").is_file()
    os.symlink("v0001", root / ".current-deadbeef")  # as left by a crash inside promote
    assert reg.versions() == ["v0001"] and reg.current() == "v0001"
    reg.verify("v0001")
    with reg.lock():
        reg.clean_staging()
    assert _leftovers(root) == [] and reg.current() == "v0001"
    assert reg.add(bundles[1], {}) == "v0002"


def test_history_skips_a_torn_line(root: Path, bundles: list[Path]) -> None:
    reg = Registry(root)
    reg.record({"kind": "note", "text": "hello"})
    with open(root / "history.jsonl", "a") as fh:
        fh.write('{"kind": "promo')  # a crash in the middle of a write
    reg.add(bundles[0], {})
    events = reg.history()
    assert [e["kind"] for e in events] == ["note", "added"]


def test_cli_list_show_rollback_verify_prune(root: Path, bundles: list[Path], capsys: pytest.CaptureFixture[str],
                                             caplog: pytest.LogCaptureFixture) -> None:
    reg = Registry(root)
    reg.add(bundles[0], {"metrics": {"candidate": {"mask_ap": 0.412, "macro_f1": 0.7}}})
    reg.add(bundles[1], {"metrics": {"mask_ap": 0.5}})
    reg.add(bundles[2], {})
    reg.promote("v0002")
    capsys.readouterr()

    assert trainer_main(["registry", "list", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["version", "created", "mask", "AP", "macro-F1"]
    rows = {line.lstrip("* ").split()[0]: line for line in lines[1:]}
    assert "0.412" in rows["v0001"] and "0.700" in rows["v0001"]
    assert rows["v0002"].startswith("*") and "0.500" in rows["v0002"]
    assert rows["v0003"].split()[-2:] == ["-", "-"]

    assert trainer_main(["registry", "--root", str(root), "show", "v0001"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["version"] == "v0001" and shown["current"] is False and "model.pt" in shown["files"]

    assert trainer_main(["registry", "rollback", "v0001", "--root", str(root)]) == 0
    assert reg.current() == "v0001" and reg.history()[-1]["kind"] == "rollback"
    assert trainer_main(["registry", "verify", "v0003", "--root", str(root)]) == 0
    assert "v0003: ok" in capsys.readouterr().out
    assert trainer_main(["registry", "prune", "--keep", "1", "--root", str(root)]) == 0
    assert reg.versions() == ["v0001", "v0003"]

    caplog.clear()
    assert trainer_main(["registry", "rollback", "v0042", "--root", str(root)]) == 2
    assert "unknown version v0042" in caplog.text and "v0001, v0003" in caplog.text
    _flip_byte(root / "v0003" / "model.pt")
    assert trainer_main(["registry", "verify", "v0003", "--root", str(root)]) == 2
    assert "v0003/model.pt" in caplog.text
    assert trainer_main(["registry", "list", "--root", str(root / "empty")]) == 2
    assert "is empty" in caplog.text
    assert trainer_main(["registry", "show", "v0001", "--root", str(root / "empty")]) == 2
    assert "the registry is empty" in caplog.text
    assert json.loads((root / "history.jsonl").read_text().splitlines()[-1])["kind"] == "pruned"
