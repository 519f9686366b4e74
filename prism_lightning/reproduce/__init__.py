"""``reproduce``: the paper's pipeline for one model in one command, and its numbers beside the paper's.

- :mod:`~prism_lightning.reproduce.presets` — ``presets.yaml``: each model's fit configs, evaluate and study
  options and whose published numbers it is compared with;
- :mod:`~prism_lightning.reproduce.steps` — bootstrap, fit, evaluate, study, report through the commands'
  own entry points, resumable (``reproduce.json``);
- :mod:`~prism_lightning.reproduce.compare` — ``paper_numbers.yaml`` (each number with its source) beside
  this run's values with 95% bootstrap CIs;
- :mod:`~prism_lightning.reproduce.cli` — the command.
"""

from prism_lightning.reproduce.presets import Preset, load_preset, preset_names

__all__ = ["Preset", "load_preset", "preset_names"]
