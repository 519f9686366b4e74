"""LightningDataModules and datasets over the bootstrap artifacts (see :mod:`prism_lightning.bootstrap`)."""

from prism_lightning.data.datamodule import (
    EmptySplitError,
    PrismDataModule,
    PrismExamples,
    collate_examples,
    stratified_split,
    three_way_split,
)

__all__ = [
    "EmptySplitError",
    "PrismDataModule",
    "PrismExamples",
    "collate_examples",
    "stratified_split",
    "three_way_split",
]
