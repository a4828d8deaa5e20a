"""The shared config reader: every config section refuses unknown keys and names the file it could not read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.classifier.train import load_classifier_config
from trainer.config import load_config
from trainer.retrain import load_retrain_config
from wbc_core.config_io import check_known, dataclass_from_dict, read_yaml_mapping


@dataclass
class Section:
    size: int = 64
    margin: float = 0.15


def test_a_section_takes_known_keys_and_defaults() -> None:
    assert dataclass_from_dict(Section, None, "section keys") == Section()
    assert dataclass_from_dict(Section, {"size": 32}, "section keys") == Section(size=32)


def test_unknown_keys_are_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown section keys: \['sise'\]; known: \['margin', 'size'\]"):
        dataclass_from_dict(Section, {"sise": 32}, "section keys")
    with pytest.raises(ValueError, match=r"unknown things: \['c'\]"):
        check_known({"a": 1, "c": 2}, ["a", "b"], "things")
    check_known({"a": 1}, ["a", "b"], "things")


def test_a_section_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ValueError, match="section keys must be a mapping, not list"):
        dataclass_from_dict(Section, [1, 2], "section keys")


def test_files_that_are_not_yaml_mappings_name_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml_mapping(empty, "config") == {}
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    for loader in (load_config, load_classifier_config):
        with pytest.raises(ValueError, match=r"list\.yaml must be a YAML mapping"):
            loader(listing)
        with pytest.raises(ValueError, match=r"cannot read .*broken\.yaml"):
            loader(broken)
    with pytest.raises(ValueError, match=r"cannot read .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"list\.yaml must be a YAML mapping"):
        load_retrain_config(listing)


def test_every_config_refuses_a_typo_in_a_section(tmp_path: Path) -> None:
    cases = {load_config: "train:\n  epoch: 3\n", load_classifier_config: "crop:\n  sise: 32\n",
             load_retrain_config: "data: [x]\nsplit:\n  val_fraction: 0.2\n  salt_: y\n"}
    for loader, text in cases.items():
        path = tmp_path / f"{loader.__name__}.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match="unknown"):
            loader(path)
