"""TFDS builder for Multi30K task 1 (Elliott et al. 2016): English-German image captions.

Reads the original files of github.com/multi30k/dataset (data/task1/raw) from
the manual directory; TFDS writes the prepared splits as for any builder.
Imported only where data is prepared (it imports TFDS).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import tensorflow_datasets as tfds

# split -> file stem; sha256 of each file at multi30k/dataset@a3d2e0d.
FILES = {"train": "train", "validation": "val", "test": "test_2016_flickr"}
SHA256 = {
  "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
  "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
  "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
  "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
  "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
  "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
}


def read_lines(path: Path) -> list[str]:
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return [line.rstrip("\n") for line in f]


class Multi30kEnDe(tfds.core.GeneratorBasedBuilder):
  """Multi30K task 1: 29,000 train, 1,014 validation, 1,000 test (2016 Flickr) pairs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Task 1 raw files of multi30k/dataset@a3d2e0d."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put train, val and test_2016_flickr .en.gz and .de.gz from "
    "https://github.com/multi30k/dataset/tree/master/data/task1/raw in the manual directory."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict({"en": tfds.features.Text(), "de": tfds.features.Text()}),
      supervised_keys=("de", "en"),
      homepage="https://github.com/multi30k/dataset",
      citation="Elliott et al. 2016, Multi30K: Multilingual English-German Image Descriptions",
    )

  def _split_generators(self, dl_manager):
    manual = Path(dl_manager.manual_dir)
    return {split: self._generate_examples(manual, stem) for split, stem in FILES.items()}

  def _generate_examples(self, manual: Path, stem: str):
    english, german = read_lines(manual / f"{stem}.en.gz"), read_lines(manual / f"{stem}.de.gz")
    if len(english) != len(german):
      raise ValueError(f"{stem}: {len(english)} English lines but {len(german)} German lines")
    for index, (en, de) in enumerate(zip(english, german, strict=True)):
      yield index, {"en": en, "de": de}
