"""Multi-set starter training: the Bio-Net reader, the multi-set config and its errors, batches grouped so that
box-only frames never reach the mask head, and --ship keeping only shippable sets with their licences."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import trainer.train_segmenter as ts
from trainer.__main__ import main as trainer_main
from trainer.config import TrainConfig
from trainer.data.bccd import bccd_rbc_boxes
from trainer.data.bionet import load_bionet, median_rbc_diameter
from trainer.multiset import MultiSetError, build_training_data, parse_multiset, select_sets
from trainer.synthetic import render_slide
from wbc_core.bundle import load_bundle
from wbc_core.data.coco import write_coco
from wbc_core.data.types import AnnotatedDataset, DatasetError, ImageRecord, Instance

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_MODEL = {"max_size": 128, "min_size": 96, "fpn_channels": 32, "mask_resolution": 7,
              "box_batch_size_per_image": 16, "rpn_post_nms_top_n_train": 100}
TINY_TRAIN = {"epochs": 1, "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 0, "num_workers": 0,
              "threads": 1, "device": "cpu"}


def make_bionet(root: Path, n: int = 4, width: int = 128, height: int = 96, split: str = "train",
                categories: tuple[str, ...] = ("WBC", "RBC", "Platelets"), seed: int = 0) -> list[list[float]]:
    """A Bio-Net-like folder: synthetic slides as JPEGs and a COCO bbox-only JSON (WBC boxes from the drawn cells,
    RBC boxes of 12 px). Returns the WBC boxes (x0, y0, x1, y1) of the first frame."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns, first = [], [], []
    cat = {name: i + 1 for i, name in enumerate(categories)}
    for i in range(n):
        image, cells = render_slide(rng, width, height, n_cells=1)
        name = f"{i:03d}.jpg"
        cv2.imwrite(str(root / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for c in cells:
            x0, y0, x1, y1 = c.box
            if "WBC" in cat:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat["WBC"], "segmentation": [],
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
            if i == 0:
                first.append([x0, y0, x1, y1])
        for x in (10, 40, 70):  # three whole red cells, 12 px across, and one cut by the edge
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat.get("RBC", 99),
                         "segmentation": [], "bbox": [x, 5, 12, 12], "iscrowd": 0})
        anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat.get("RBC", 99), "segmentation": [],
                     "bbox": [0, 50, 4, 12], "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": v, "name": k, "supercategory": ""} for k, v in cat.items()]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return first


# --- Bio-Net reader --------------------------------------------------------------------------------------------

def test_bionet_fake_set_gives_box_only_wbcs_and_red_cells(tmp_path: Path) -> None:
    first = make_bionet(tmp_path / "bionet", n=3)
    ds = load_bionet(tmp_path / "bionet", "train")
    assert len(ds) == 3 and ds.labels == ["wbc"]
    rec = ds.images[0]
    assert rec.path.is_file() and (rec.width, rec.height) == (128, 96)
    assert [i.kind for i in rec.instances] == ["rectangle"] and rec.instances[0].label == "wbc"
    assert np.allclose(rec.instances[0].box, first[0], atol=0.01)
    assert rec.outlined() == []
    assert len(ds.meta["rbc_boxes"][rec.name]) == 4
    assert ds.meta["rbc_diameter_px"][rec.name] == pytest.approx(12.0)  # the edge-cut box is left out
    assert ds.meta["frame_box_only"][rec.name] is True


def test_median_rbc_diameter_leaves_out_cut_cells() -> None:
    boxes = [[10, 10, 22, 22], [30, 10, 42, 22], [50, 10, 62, 22], [0, 40, 3, 52]]
    assert median_rbc_diameter(boxes, 100, 100) == pytest.approx(12.0)
    assert median_rbc_diameter([[0, 40, 4, 52]], 100, 100) == pytest.approx(8.0)  # too few whole ones: all
    assert median_rbc_diameter([], 100, 100) is None


def test_bionet_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope"):
        load_bionet(tmp_path / "nope", "train")
    make_bionet(tmp_path / "b", n=1)
    with pytest.raises(DatasetError, match=r"instances_test\.json not found.*\['train'\]"):
        load_bionet(tmp_path / "b", "test")
    make_bionet(tmp_path / "c", n=1, categories=("RBC", "Platelets"))
    with pytest.raises(DatasetError, match=r"instances_train\.json has no WBC category"):
        load_bionet(tmp_path / "c", "train")
    make_bionet(tmp_path / "d", n=2)
    (tmp_path / "d" / "images" / "001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 images are missing.*001\.jpg"):
        load_bionet(tmp_path / "d", "train")


@pytest.mark.skipif(not (SHARED / "bionet-wbc").is_dir(), reason="../shared/data/bionet-wbc is not beside the repo")
def test_bionet_real_val_split() -> None:
    ds = load_bionet(SHARED / "bionet-wbc", "val")
    assert len(ds) == 151  # README: val 151 frames, 173 WBC boxes
    assert sum(len(r.instances) for r in ds.images) == 173
    assert all(i.kind == "rectangle" and i.label == "wbc" for r in ds.images for i in r.instances)
    assert all(r.path.is_file() and (r.width, r.height) == (640, 480) for r in ds.images)
    d = np.median(list(ds.meta["rbc_diameter_px"].values()))
    assert 50 < d < 65  # README: RBC box median 56.5 px


@pytest.mark.skipif(not (SHARED / "bccd-wbc").is_dir(), reason="../shared/data/bccd-wbc is not beside the repo")
def test_bccd_rbc_boxes_from_voc() -> None:
    boxes = bccd_rbc_boxes(SHARED / "bccd-wbc", ["BloodImage_00000.jpg"])["BloodImage_00000.jpg"]
    assert len(boxes) > 5 and boxes[0] == [78.0, 336.0, 184.0, 435.0]
    assert 80 < median_rbc_diameter(boxes, 640, 480) < 130


# --- the multi-set config ---------------------------------------------------------------------------------------

def config(*sets: dict, **sections: object) -> dict:
    return {"sets": list(sets), "model": dict(TINY_MODEL), "train": dict(TINY_TRAIN), **sections}


SYN = {"name": "syn", "kind": "synthetic", "frames": 4, "width": 128, "height": 96, "weight": 1.0, "masks": True,
       "licence": "MIT", "attribution": "ours", "ship": True}
BIO = {"name": "bio", "kind": "bionet", "path": "bionet", "split": "train", "weight": 1.0, "masks": False,
       "licence": "none stated", "attribution": "Shams et al. 2024", "ship": False}


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "red"}, r"set 'bio': unknown keys \['colour'\]"),
    ({"masks": True}, r"set 'bio': a bionet set has boxes only.*masks: false"),
    ({"kind": "flickr"}, r"set 'bio': kind must be one of"),
    ({"weight": 0}, r"set 'bio': weight must be > 0"),
    ({"ship": True}, r"set 'bio': ship: true needs a licence"),
    ({"path": None}, r"set 'bio': needs a 'path'"),
    ({"masks": "yes"}, r"set 'bio': masks must be true or false"),
    ({"name": "a b"}, r"'name' must be a short name"),
])
def test_bad_set_entries_are_refused_naming_the_set(change: dict, message: str) -> None:
    bad = {**BIO, **change}
    if change.get("path", 1) is None:
        del bad["path"]
    with pytest.raises(MultiSetError, match=message):
        parse_multiset(config(SYN, bad), source="cfg.yaml")


def test_bad_config_sections_are_refused() -> None:
    with pytest.raises(MultiSetError, match="needs a non-empty 'sets:'"):
        parse_multiset({"model": {}}, "cfg.yaml")
    with pytest.raises(MultiSetError, match="repeated: \\['syn'\\]"):
        parse_multiset(config(SYN, SYN), "cfg.yaml")
    with pytest.raises(MultiSetError, match="class-agnostic"):
        parse_multiset(config(SYN, labels={"classes": ["neutrophil"]}), "cfg.yaml")
    with pytest.raises(MultiSetError, match="unknown config sections"):
        parse_multiset(config(SYN, extra={}), "cfg.yaml")
    missing_masks = {k: v for k, v in SYN.items() if k != "masks"}
    with pytest.raises(MultiSetError, match="say whether it has outlines"):
        parse_multiset(config(missing_masks), "cfg.yaml")
    cfg = parse_multiset(config(SYN, BIO), "cfg.yaml")
    assert cfg.train.labels.classes == ["wbc"]
    with pytest.raises(MultiSetError, match="--leave-out \\['nope'\\]"):
        select_sets(cfg, leave_out=["nope"])
    with pytest.raises(MultiSetError, match="mask head would not learn"):
        select_sets(cfg, leave_out=["syn"])
    assert [s.name for s in select_sets(cfg, ship=True)] == ["syn"]


def write_export(folder: Path, instances: list[Instance], labels: list[str]) -> Path:
    """A COCO 1.0 export folder with one 64x48 frame."""
    (folder / "images").mkdir(parents=True)
    cv2.imwrite(str(folder / "images" / "f.jpg"), np.full((48, 64, 3), 200, np.uint8))
    ds = AnnotatedDataset(images=[ImageRecord(name="f.jpg", width=64, height=48, instances=instances)], labels=labels)
    (folder / "annotations").mkdir()
    write_coco(ds, folder / "annotations" / "instances_default.json")
    return folder


def test_bad_data_is_refused_naming_the_set_and_nothing_is_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    poly = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], float)
    write_export(tmp_path / "rbc-only", [Instance(label="RBC", polygon=poly)], ["RBC"])
    write_export(tmp_path / "boxes", [Instance(label="neutrophil", box=(5, 5, 30, 30))], ["neutrophil"])
    make_bionet(tmp_path / "bionet", n=2)
    write_export(tmp_path / "empty", [], ["neutrophil"])
    coco = tmp_path / "empty" / "annotations" / "instances_default.json"
    coco.write_text(json.dumps({**json.loads(coco.read_text()), "images": [], "annotations": []}))
    cases = [
        ({"name": "none", "kind": "export", "path": "empty", "masks": True}, r"set 'none'.*(no frames|zero frames)"),
        ({"name": "gone", "kind": "bccd", "path": "missing", "masks": True}, r"set 'gone'.*missing.*does not exist"),
        ({"name": "rbc", "kind": "export", "path": "rbc-only", "masks": True}, r"set 'rbc'.*no WBC label.*RBC"),
        ({"name": "box", "kind": "export", "path": "boxes", "masks": True}, r"set 'box'.*boxes only.*masks: false"),
        ({**BIO, "split": "val"}, r"set 'bio'.*instances_val\.json not found"),
    ]
    for entry, message in cases:
        cfg = parse_multiset(config(SYN, entry), "cfg.yaml")
        with pytest.raises(DatasetError, match=message):
            build_training_data(cfg, cfg.sets, tmp_path, out)
        assert not out.exists(), "a bad set must stop the run before anything is written"
    # the same box-only export is fine as a boxes-only set
    cfg = parse_multiset(config({"name": "box", "kind": "export", "path": "boxes", "masks": False}), "cfg.yaml")
    data, prov = build_training_data(cfg, cfg.sets, tmp_path, out)
    assert data.meta["frame_box_only"] == [True] and data.images[0].instances[0].label == "wbc"
    assert prov["datasets"][0]["cells"] == 1


# --- grouped batches: box-only frames never reach the mask head --------------------------------------------------

def test_set_batch_sampler_groups_weights_and_ranks() -> None:
    groups = [0] * 6 + [1] * 30
    s = ts.SetBatchSampler(groups, [3.0, 1.0], batch_size=2, seed=5)
    batches = s.epoch_batches()
    assert len(batches) == len(s) == 18
    kinds = [{groups[i % 36] for i in b} for b in batches]
    assert all(len(k) == 1 for k in kinds)  # never mixed
    share0 = sum(k == {0} for k in kinds) / len(kinds)
    assert 0.5 < share0 < 0.95  # weight 3:1 although set 0 has 5x fewer frames
    assert any(i >= 36 for b in batches for i in b)  # set 0 repeats, as index + k * n
    assert batches == s.epoch_batches()  # deterministic (exact resume)
    s.set_position(0, 5)
    assert list(s) == batches[5:]
    r0, r1 = (ts.SetBatchSampler(groups, [1.0, 1.0], 2, 5, rank=r, world=2).epoch_batches() for r in (0, 1))
    assert len(r0) == len(r1) == 9
    assert all({groups[i % 36] for i in a} == {groups[i % 36] for i in b} for a, b in zip(r0, r1, strict=True))


def test_mask_branch_disabled_restores_the_model() -> None:
    from wbc_core.model import SegmenterConfig, build_model

    model = build_model(SegmenterConfig(**TINY_MODEL), 1)
    pool = model.roi_heads.mask_roi_pool
    keys = set(model.state_dict())
    with ts.mask_branch_disabled(model):
        assert not model.roi_heads.has_mask()
    assert model.roi_heads.mask_roi_pool is pool and model.roi_heads.has_mask()
    assert set(model.state_dict()) == keys


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    make_bionet(root / "bionet", n=6)
    return root


def test_box_only_batches_skip_the_mask_head(mixed_root: Path, tmp_path: Path, monkeypatch) -> None:
    cfg = parse_multiset(config({**SYN, "frames": 6}, BIO, train={**TINY_TRAIN, "epochs": 2, "seed": 3}), "cfg.yaml")
    data, prov = build_training_data(cfg, cfg.sets, mixed_root, tmp_path / "run")
    box_only_ids = {i for i, b in enumerate(data.meta["frame_box_only"]) if b}
    calls: list[dict] = []
    real_build = ts.build_model

    def spying_build(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def before_heads(module, args):
            targets = args[3]
            calls.append({"ids": [int(t["image_id"]) for t in targets], "masks": ["masks" in t for t in targets],
                          "mask_head": False})

        def mask_head_ran(module, args, output):
            calls[-1]["mask_head"] = True

        model.roi_heads.register_forward_pre_hook(before_heads)
        model.roi_heads.mask_head.register_forward_hook(mask_head_ran)
        return model

    monkeypatch.setattr(ts, "build_model", spying_build)
    bundle = ts.train_segmenter(cfg.train, data, tmp_path / "run", progress=False, provenance=prov)
    assert len(calls) == 12  # 2 epochs x ceil(12 frames / batch 2)
    box_calls = [c for c in calls if set(c["ids"]) & box_only_ids]
    mask_calls = [c for c in calls if not set(c["ids"]) & box_only_ids]
    assert box_calls and mask_calls, "both kinds of batch should occur"
    for c in box_calls:
        assert set(c["ids"]) <= box_only_ids, f"mixed batch {c}"
        assert not any(c["masks"]) and not c["mask_head"], f"box-only batch reached the mask head: {c}"
    assert all(all(c["masks"]) and c["mask_head"] for c in mask_calls)
    rows = list(csv.DictReader((tmp_path / "run" / "losses.csv").open()))
    assert sum(r["loss_mask"] == "" for r in rows) == len(box_calls)
    assert all(float(r["loss_box_reg"]) >= 0 for r in rows)
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    assert load_bundle(bundle).classes == ["wbc"]


# --- the one command --------------------------------------------------------------------------------------------

def test_starter_ship_keeps_shippable_sets_and_records_licences(mixed_root: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "starter.yaml"
    cfg_path.write_text(yaml.safe_dump(config(
        {**SYN, "licence": "MIT (ours)", "attribution": "synthetic slides"}, BIO,
        scale={"mode": "rbc", "rbc_px": 12, "jitter": [0.9, 1.1], "max_side": 192, "min_side": 64},
        augment={"stain_p": 0.5, "white_balance_p": 0.5, "cast_p": 0.3, "noise_p": 0.3, "jpeg_p": 0.3, "scale_p": 0.3,
                 "defocus_p": 0.3, "pale_p": 0.3})))
    out = tmp_path / "run"
    code = starter_main(["--config", str(cfg_path), "--data-root", str(mixed_root), "--out", str(out), "--ship",
                         "--max-steps", "3", "--no-progress"])
    assert code == 0
    assert len((out / "losses.csv").read_text().splitlines()) == 1 + 3  # exactly --max-steps, whatever the epochs
    bundle = load_bundle(out / "bundle")
    prov = bundle.provenance
    assert [d["name"] for d in prov["datasets"]] == ["syn"]
    assert prov["datasets"][0]["licence"] == "MIT (ours)" and prov["datasets"][0]["attribution"] == "synthetic slides"
    assert prov["datasets"][0]["frames"] == 4 and prov["datasets"][0]["weight"] == 1.0
    assert prov["ship_build"] is True and prov["all_sets_shippable"] is True
    assert bundle.scale == {"mode": "rbc", "rbc_px": 12.0, "max_side": 192, "min_side": 64, "fallback": "fixed"}
    assert (out / "synthetic" / "syn" / "annotations.xml").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["scale"]["mode"] == "rbc" and TrainConfig.from_dict(saved).scale.rbc_px == 12
    # the same command again without --resume is refused; a bad set name exits 2
    assert starter_main(["--config", str(cfg_path), "--data-root", str(mixed_root), "--out", str(out), "--ship",
                         "--no-progress"]) == 2
    assert starter_main(["--config", str(cfg_path), "--data-root", str(mixed_root), "--out", str(tmp_path / "o2"),
                         "--leave-out", "nope"]) == 2
    assert starter_main(["--config", str(cfg_path), "--data-root", str(mixed_root), "--out", str(tmp_path / "o3"),
                         "--max-steps", "0"]) == 2
    assert not (tmp_path / "o3").exists()


def test_starter_help_explains_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        starter_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("--ship", "--leave-out", "--data-root", "--max-minutes", "--max-steps", "masks", "licence", "bundle"):
        assert word in text


def starter_main(argv: list[str]) -> int:
    return trainer_main(["train-starter", *argv])


def test_packaged_starter_config_parses() -> None:
    from trainer.multiset import load_multiset_config
    from trainer.starter import default_config_path

    cfg = load_multiset_config(default_config_path())
    assert {s.name: (s.masks, s.ship) for s in cfg.sets} == {"bccd": (True, True), "bionet": (False, False),
                                                             "synthetic": (True, True)}
    assert cfg.train.scale.mode == "rbc" and cfg.train.augment.stain_p > 0


def test_generate_task_is_reused(tmp_path: Path) -> None:
    """A second build reuses the synthetic slides already in the run folder (resume draws nothing again)."""
    cfg = parse_multiset(config(SYN), "cfg.yaml")
    build_training_data(cfg, cfg.sets, None, tmp_path)
    stamp = (tmp_path / "synthetic" / "syn" / "images" / "synth_0000.jpg").stat().st_mtime_ns
    data, _ = build_training_data(cfg, cfg.sets, None, tmp_path)
    assert (tmp_path / "synthetic" / "syn" / "images" / "synth_0000.jpg").stat().st_mtime_ns == stamp
    assert len(data) == 4
    assert data.meta["frame_rbc_px"][0] == pytest.approx(0.095 * 128)



CLS = {"source": "pbc-sample", "target": "bccd-wbc", "method": "source-only", "stain_norm": "reinhard",
       "licence": "CC BY 4.0", "attribution": "Acevedo et al. 2020", "ship": True}


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": 1}, r"classifier: unknown keys \['colour'\]"),
    ({"source": None}, r"classifier: source must name a folder"),
    ({"method": "magic"}, r"classifier: method must be one of"),
    ({"stain_norm": "vahadane"}, r"classifier: stain_norm must be one of"),
    ({"licence": "none stated"}, r"classifier: ship: true needs a licence"),
    ({"ship": "yes"}, r"classifier: ship must be true or false"),
])
def test_bad_classifier_section_is_refused(change: dict, message: str) -> None:
    with pytest.raises(MultiSetError, match=message):
        parse_multiset(config(SYN, classifier={**CLS, **change}), source="cfg.yaml")


def test_classifier_section_and_the_packaged_starter_config() -> None:
    cfg = parse_multiset(config(SYN, classifier=CLS), source="cfg.yaml")
    assert cfg.classifier is not None and cfg.classifier.source == "pbc-sample" and cfg.classifier.ship
    assert parse_multiset(config(SYN), source="cfg.yaml").classifier is None
    from trainer.multiset import load_multiset_config
    from trainer.starter import default_config_path

    starter = load_multiset_config(default_config_path())
    assert starter.classifier is not None and starter.classifier.licence == "CC BY 4.0"
    assert [s.name for s in select_sets(starter, ship=True)] == ["bccd", "synthetic"]
