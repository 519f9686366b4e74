"""Analysis of PRISM runs: tidy frames (:mod:`.load`), seaborn figures (:mod:`.figures`), and the
``report`` command (:mod:`.report`). The notebooks under ``notebooks/`` are thin wrappers of these."""

from prism_lightning.analysis.load import MissingInputError

__all__ = ["MissingInputError"]
