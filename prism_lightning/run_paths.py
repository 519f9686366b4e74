"""Where a run's files lie: the one definition of the on-disk layout that every writer and reader uses.

::

    <run_dir>/                                  data.run_dir of bootstrap and fit
        bootstrap/summary.json                  the bootstrap summary
        bootstrap/<stage>-<hash12>/             one bootstrap stage (queries, answers, verdicts, teacher):
            meta.json  rows.jsonl  shard-<rank>.jsonl  tensors-<rank>-<digest>.safetensors  DONE
        lightning/last.ckpt                     Lightning checkpoints (fit resumes from last.ckpt)
        predictions.jsonl                       predict's routed answers
    checkpoints/<run name>/                     fit's export (the default export_dir):
        prism.json  gate.safetensors  adapter/  (K-way: adapters/<name>/)
    <evaluate --out>/                           summary.json  summary.csv
                                                items/<benchmark>__<condition>.jsonl
    <study --out>/                              study.csv  study.json
                                                items/<benchmark>__<persona>__<length>__<placement>.jsonl
    <report --out>/  (default <run_dir>/report) report.md  <figure>.png
    <reproduce dir>/                            run/  checkpoint/  eval/  study/  report/
                                                reproduce.json  comparison.md  comparison.json
        run-seed<S>/  checkpoint-seed<S>/  eval-seed<S>/   another training seed (``--seeds``);
        run-seed<S>/bootstrap -> ../run/bootstrap          one bootstrap for every seed

Existing runs resume only while these names stay as they are: change one and old stage directories,
item files and checkpoints are no longer found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# -- a fit/bootstrap run directory ------------------------------------------------------------------

BOOTSTRAP_DIR = "bootstrap"
SUMMARY_JSON = "summary.json"  # the bootstrap's summary, and evaluate's
BOOTSTRAP_STAGES: tuple[str, ...] = ("queries", "answers", "verdicts", "teacher")
LIGHTNING_DIR = "lightning"
LAST_CKPT = "last.ckpt"
PREDICTIONS_FILE = "predictions.jsonl"
HELDOUT_JSON = "heldout.json"


def bootstrap_dir(run_dir: str | Path) -> Path:
    """``<run_dir>/bootstrap``: the stage directories and the summary."""
    return Path(run_dir) / BOOTSTRAP_DIR


def bootstrap_summary(run_dir: str | Path) -> Path:
    """``<run_dir>/bootstrap/summary.json``, written last by every bootstrap (and fit) run."""
    return bootstrap_dir(run_dir) / SUMMARY_JSON


def lightning_dir(run_dir: str | Path) -> Path:
    """Where fit's ModelCheckpoint writes unless its ``dirpath`` is set."""
    return Path(run_dir) / LIGHTNING_DIR


def last_checkpoint(run_dir: str | Path) -> Path:
    """The ``last.ckpt`` a fit of ``run_dir`` resumes from."""
    return lightning_dir(run_dir) / LAST_CKPT


def heldout_report(run_dir: str | Path) -> Path:
    """fit's held-out check (``--heldout_check``): per-query rows and the summary it printed."""
    return Path(run_dir) / HELDOUT_JSON


def predictions_file(run_dir: str | Path) -> Path:
    """predict's output unless ``predict_output`` is set."""
    return Path(run_dir) / PREDICTIONS_FILE


# -- a bootstrap stage directory --------------------------------------------------------------------

STAGE_META = "meta.json"
STAGE_ROWS = "rows.jsonl"
STAGE_DONE = "DONE"  # written last: a stage is finished when it exists and the content check passes
SHARD_GLOB = "shard-*.jsonl"


def stage_dir(bootstrap_root: str | Path, stage: str, stage_hash: str) -> Path:
    """``<bootstrap>/<stage>-<first 12 hex digits of the stage hash>``."""
    return Path(bootstrap_root) / f"{stage}-{stage_hash[:12]}"


def stage_dir_glob(stage: str) -> str:
    """Glob (under ``<run_dir>/bootstrap``) of every directory of one stage, whatever its settings."""
    return f"{stage}-*"


def shard_file(rank: int) -> str:
    """The file rank ``rank`` appends its rows to while a stage runs."""
    return f"shard-{rank}.jsonl"


def tensor_file(rank: int, digest: str) -> str:
    """A stage's tensor file of one batch of rank ``rank`` (rows name it in ``tensor_file``)."""
    return f"tensors-{rank}-{digest}.safetensors"


# -- an exported checkpoint -----------------------------------------------------------------------

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_DIR = "checkpoint"  # a reproduction's export, and report's last guess inside a run directory
PRISM_JSON = "prism.json"
GATE_FILE = "gate.safetensors"
ADAPTER_DIR = "adapter"
ADAPTERS_DIR = "adapters"  # K-way: adapters/<name>/


def default_export_dir(run_dir: str | Path) -> Path:
    """fit's export when ``export_dir`` is unset: ``checkpoints/<run name>`` (relative to where it runs)."""
    return Path(CHECKPOINTS_DIR) / Path(run_dir).name


# -- evaluate / study / report outputs ----------------------------------------------------------------

EVAL_DIR = "eval"  # evaluate's and study's default places inside a run or reproduce directory
STUDY_DIR = "study"
SUMMARY_CSV = "summary.csv"
ITEMS_DIR = "items"
STUDY_CSV = "study.csv"
STUDY_JSON = "study.json"
REPORT_DIR = "report"
REPORT_MD = "report.md"


def eval_summary(out: str | Path) -> Path:
    """``<evaluate --out>/summary.json``, written once every condition is scored."""
    return Path(out) / SUMMARY_JSON


def eval_summary_csv(out: str | Path) -> Path:
    return Path(out) / SUMMARY_CSV


def items_dir(out: str | Path) -> Path:
    """The scored rows of evaluate or study, one JSONL file per benchmark and condition (or cell)."""
    return Path(out) / ITEMS_DIR


def item_file(out: str | Path, benchmark: str, condition: str) -> Path:
    """``<out>/items/<benchmark>__<condition>.jsonl`` (a study cell name stands for the condition)."""
    return items_dir(out) / f"{benchmark}__{condition}.jsonl"


def item_files(out: str | Path, condition: str = "*") -> list[Path]:
    """The item files under ``out`` (of one condition, or all), sorted."""
    directory = items_dir(out)
    return sorted(directory.glob(f"*__{condition}.jsonl")) if directory.is_dir() else []


def parse_item_file(path: str | Path) -> tuple[str, str]:
    """(benchmark, condition) of an item file (the condition may itself hold ``__``: study cells)."""
    benchmark, _, condition = Path(path).stem.partition("__")
    return benchmark, condition


def study_cell(persona: str, length: str, placement: str) -> str:
    """The name of one study cell in its item files (``none`` is the no-persona baseline's)."""
    return f"{persona}__{length}__{placement}"


def study_csv(out: str | Path) -> Path:
    return Path(out) / STUDY_CSV


def study_json(out: str | Path) -> Path:
    """Written after study.csv: its presence says a study finished."""
    return Path(out) / STUDY_JSON


def report_md(out: str | Path) -> Path:
    return Path(out) / REPORT_MD


def figure_file(out: str | Path, name: str) -> Path:
    return Path(out) / f"{name}.png"


# -- a reproduction -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """Where one reproduction's outputs lie (all under its directory ``root``). ``seed`` names another
    training seed of the same reproduction (``reproduce --seeds``): its fit, export and evaluation lie in
    ``run-seed<S>/``, ``checkpoint-seed<S>/`` and ``eval-seed<S>/`` (the bootstrap inside ``run-seed<S>/`` is
    a link to the first seed's); the study, report and state files are the reproduction's own."""

    root: Path
    seed: int | None = None

    def for_seed(self, seed: int | None) -> RunPaths:
        """The paths of another training seed's fit and evaluation (None: the first seed's)."""
        return RunPaths(self.root, seed)

    def _own(self, name: str) -> Path:
        return self.root / (name if self.seed is None else f"{name}-seed{self.seed}")

    @property
    def run(self) -> Path:  # fit's data.run_dir: bootstrap stages, Lightning checkpoints, W&B files
        return self._own("run")

    @property
    def checkpoint(self) -> Path:
        return self._own(CHECKPOINT_DIR)

    @property
    def eval(self) -> Path:
        return self._own(EVAL_DIR)

    @property
    def study(self) -> Path:
        return self.root / STUDY_DIR

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def state(self) -> Path:
        """``reproduce.json``: each step's arguments and status."""
        return self.root / "reproduce.json"

    @property
    def comparison_md(self) -> Path:
        return self.root / "comparison.md"

    @property
    def comparison_json(self) -> Path:
        return self.root / "comparison.json"
