"""LightningCLI for `fit`, `validate`, `test` and `predict`.

`fit` is the whole method: the bootstrap stages (cached ones reused) run as Lightning predict jobs on
the configured devices, then the gate and LoRA train jointly, then the run is exported to
`checkpoints/<run>/` and a short routed sanity check prints which way a few queries went.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from prism_lightning import run_paths
from prism_lightning.backbone import BackboneConfig
from prism_lightning.callbacks import EXPORT_FROM, PrismExport
from prism_lightning.config_files import with_default_config
from prism_lightning.data import PrismDataModule
from prism_lightning.errors import ConfigError
from prism_lightning.files import atomic_write_json, check_output_dir
from prism_lightning.model.checks import check_against_model
from prism_lightning.model.gate_eval import format_test_scores
from prism_lightning.model.module import PrismModule

SANITY_QUERIES = (
    "Write a short poem about autumn leaves.",
    "What is the capital of Australia? Answer with one word.",
    "How do I safely dispose of old batteries?",
)


def trainer_kwargs_from(trainer) -> dict[str, Any]:
    """The bootstrap's predict Trainers get the fit's devices; a strategy object (the FSDP preset's
    PrismFSDPStrategy) falls back to Lightning's default, which is DDP for several devices: generation
    runs a whole frozen model per process, so a model must fit one device to bootstrap."""
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else "auto"
    return {
        "accelerator": trainer.accelerator,
        "devices": trainer.devices,
        "strategy": strategy,
        "num_nodes": trainer.num_nodes,
    }


def wandb_has_key() -> bool:
    """A W&B key in the environment or ~/.netrc means the user wants online runs."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class PrismCLI(LightningCLI):
    """Links the backbone into the data module and adds PRISM's own fit steps around training."""

    def add_arguments_to_parser(self, parser) -> None:
        for f in fields(BackboneConfig):
            parser.link_arguments(f"model.backbone.{f.name}", f"data.backbone.{f.name}")
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="where fit exports the run (default: checkpoints/<name of data.run_dir>)",
        )
        parser.add_argument(
            "--export_from",
            type=str,
            default="last",
            help="which weights fit exports: last (end of training) or best (ModelCheckpoint's best by "
            "its monitor, val/loss in the default config)",
        )
        parser.add_argument(
            "--validate_before_fit",
            type=bool,
            default=True,
            help="one validation pass before training, so the starting KL is on record",
        )
        parser.add_argument(
            "--sanity_check",
            type=bool,
            default=True,
            help="after fit, route a few queries with the exported checkpoint",
        )
        parser.add_argument(
            "--heldout_check",
            type=int,
            default=0,
            help="after fit, write this many fresh queries per context and report the exported gate's "
            "AUROC and the verifier pass rates of base / context / adapter / routed answers on them "
            "(needs data.bootstrap.verifier: program; 0: off)",
        )
        parser.add_argument(
            "--predict_output",
            type=str | None,
            default=None,
            help="predict: JSONL written with response, route and gate_prob per row",
        )

    def _section(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._section()
        trainer = cfg.trainer
        if trainer.precision is None:  # config says nothing: bf16 autocast on GPU, fp32 on CPU
            trainer.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
        derive_run_paths(cfg)
        if self.subcommand == "fit" and cfg.get("export_from") not in EXPORT_FROM:
            raise ConfigError(
                f"--export_from must be one of {', '.join(EXPORT_FROM)}, got {cfg.get('export_from')!r}."
            )
        check_command_options(self.subcommand, cfg)
        if int(cfg.get("heldout_check") or 0) < 0:
            raise ConfigError(f"--heldout_check must be >= 0 (0: off), got {cfg.heldout_check}.")
        check_command_paths(self.subcommand, cfg)

    def before_fit(self) -> None:
        dm: PrismDataModule = self.datamodule
        cfg = self._section()
        # Everything that can be checked without the weights, before the bootstrap's long work.
        check_against_model(dict(self.model.hparams), self.model.backbone_config)
        if cfg.heldout_check and "program" not in dm.bootstrap.verifier:
            raise ConfigError(
                "--heldout_check needs data.bootstrap.verifier: program (a checkable verifier; a small "
                "model's self-judgments would make its labels noise)."
            )
        if self.model.adapter_groups is not None:  # K-way: every bootstrap persona in one adapter
            self.model.set_persona_names(dm.persona_names)
        dm.apply_global_batch(self.trainer)  # a global batch the processes cannot split fails here
        self.exporter = PrismExport(
            export_dir=str(self.export_dir()),
            export_from=cfg.export_from,
            training_config=self._training_config(),
        )
        self.trainer.callbacks.append(self.exporter)
        if self.trainer.loggers and not any(
            isinstance(c, LearningRateMonitor) for c in self.trainer.callbacks
        ):
            self.trainer.callbacks.append(LearningRateMonitor(logging_interval="step"))
        dm.ensure_bootstrap(trainer_kwargs_from(cfg.trainer))
        if cfg.validate_before_fit:
            self.trainer.validate(self.model, datamodule=dm, verbose=False)
            self.exporter.metrics_before = _val_metrics(self.trainer)
            # validate() ran under inference mode; fresh metric states keep fit's own loops legal.
            self.model.val_metrics.reset()
            self.model.val_route_rate.reset()

    def export_dir(self) -> Path:
        cfg = self._section()
        if cfg.get("export_dir"):
            return Path(cfg.export_dir)
        return run_paths.default_export_dir(self.datamodule.run_dir)

    def after_fit(self) -> None:
        exporter: PrismExport = self.exporter
        if self.trainer.interrupted or exporter.exported is None or not self.trainer.is_global_zero:
            return
        dm: PrismDataModule = self.datamodule
        self._print_metrics(exporter.metrics_before, _val_metrics(self.trainer))
        if exporter.test_scores is not None:
            print(format_test_scores(exporter.test_scores))
        src = exporter.exported_from
        weights = f"{src['weights']} (after {src.get('epochs')} epochs, step {src.get('global_step')})"
        print(f"\nexported checkpoint:  {exporter.exported}  <- {weights} weights; --export_from last|best")
        print(f"run directory:        {dm.run_dir}")
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None:
            last, best = ckpt.last_model_path or "-", ckpt.best_model_path or "-"
            print(f"lightning checkpoints: last {last}, best {best}")
        if self.trainer.logger is not None and getattr(self.trainer.logger, "save_dir", None):
            print(f"logs:                 {self.trainer.logger.save_dir}")
        if self._section().sanity_check:
            self._sanity_check(exporter.exported)
        if self._section().heldout_check:
            self._heldout_check(exporter.exported, int(self._section().heldout_check))

    def _training_config(self) -> dict:
        keys = ("model", "data", "trainer", "seed_everything")
        return {k: v for k, v in self._resolved_config().items() if k in keys}

    def _resolved_config(self) -> dict:
        """The resolved config as plain JSON types, stored in prism.json for reproducibility."""
        # as_dict: a jsonargparse Namespace's items() are flattened ("data.bootstrap.x"), which the key
        # filter of _training_config would drop; nested dicts keep model/data/trainer
        return json.loads(json.dumps(_to_plain(self._section().as_dict())))

    def _print_metrics(self, start: dict[str, float], final: dict[str, float]) -> None:
        print("\nvalidation split        before fit   after fit")
        keys = (
            "val/kl",
            "val/gate_loss",
            "val/gate_acc",
            "val/gate_auroc",
            "val/gate_f1",
            "val/routing_rate",
            "val/route_acc",  # K-way: none + K routes
        )
        for key in keys:
            if key in final:
                before = f"{start[key]:.4f}" if key in start else "-"
                print(f"  {key:<22}{before:>11}{final[key]:>12.4f}")

    def _heldout_check(self, checkpoint: Path, per_context: int) -> None:
        from prism_lightning.engines import open_engine
        from prism_lightning.eval.heldout import format_report, run_heldout_check

        dm: PrismDataModule = self.datamodule
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = open_engine(checkpoint, device=device)
        trained_on = [r["query"] for r in dm.bootstrap_rows("queries")]
        report = run_heldout_check(engine, dm.bootstrap, per_context=per_context, training_queries=trained_on)
        path = run_paths.heldout_report(dm.run_dir)
        atomic_write_json(path, {"summary": report.summary, "rows": report.rows})
        print(format_report(report.summary))
        print(f"  per-query rows: {path}")

    def _sanity_check(self, checkpoint: Path) -> None:
        from prism_lightning.generation import SamplingConfig
        from prism_lightning.model.export import load_checkpoint

        routed = load_checkpoint(checkpoint, device="cpu" if not torch.cuda.is_available() else None)
        outs = routed.generate(list(SANITY_QUERIES), sampling=SamplingConfig(max_new_tokens=32))
        print("\nrouted sanity check (gate decides inside the prefill):")
        for q, o in zip(SANITY_QUERIES, outs, strict=True):
            where = o.adapter or ("adapter" if o.route else "base")  # K-way: the adapter's name
            print(f"  [{where:<7} p={o.gate_prob:.2f}] {q}\n      -> {o.text[:120]!r}")

    def before_predict(self) -> None:
        from prism_lightning.model.writer import RoutedPredictionWriter

        self.datamodule.predict_rows()  # a missing or malformed prompt file fails before the model loads
        if self.model.hparams.checkpoint:
            from prism_lightning.model.export import verify_checkpoint

            verify_checkpoint(self.model.hparams.checkpoint)
        cfg = self._section()
        output = cfg.get("predict_output") or str(run_paths.predictions_file(self.datamodule.run_dir))
        self.trainer.callbacks.append(RoutedPredictionWriter(output))


# top-level options that one command reads, with their defaults: another command refuses a set one
COMMAND_ONLY_OPTIONS = {
    "export_dir": ("fit", None),
    "export_from": ("fit", "last"),
    "validate_before_fit": ("fit", True),
    "sanity_check": ("fit", True),
    "heldout_check": ("fit", 0),
    "predict_output": ("predict", None),
}


def check_command_options(subcommand: str | None, cfg) -> None:
    """An option another command reads would be ignored silently: refuse it. (Not for ``bootstrap``,
    which parses fit's arguments, so the same argument list serves both.)"""
    if subcommand is None:
        return
    for key, (command, default) in COMMAND_ONLY_OPTIONS.items():
        if subcommand != command and cfg.get(key, default) != default:
            raise ConfigError(f"--{key} acts only with `{command}`, not `{subcommand}`.")


def check_command_paths(subcommand: str | None, cfg) -> None:
    """The files a command reads or writes late, checked at its start: --ckpt_path must be a file, fit's
    export directory must be able to be a directory (an existing file there would be replaced by the
    export), predict's output a file."""
    if subcommand == "fit":
        default = Path("checkpoints") / Path(str(cfg.data.run_dir)).name
        check_output_dir(cfg.get("export_dir") or default, "--export_dir")
    ckpt = cfg.get("ckpt_path")
    named = ckpt in ("best", "last", "hpc") or str(ckpt).startswith("registry") or "://" in str(ckpt)
    if ckpt and not named and not Path(ckpt).is_file():  # Lightning would fail only after the bootstrap
        what = "is a directory" if Path(ckpt).is_dir() else "does not exist"
        raise ConfigError(
            f"--ckpt_path {ckpt} {what}; give a Lightning .ckpt file (<run_dir>/lightning/last.ckpt)."
        )
    if subcommand == "predict":
        output = Path(cfg.get("predict_output") or run_paths.predictions_file(str(cfg.data.run_dir)))
        if output.is_dir():
            raise ConfigError(f"--predict_output {output} is a directory; give a file name.")
        check_output_dir(output.parent, "the folder of --predict_output")


def derive_run_paths(cfg) -> None:
    """Every output of a run goes under ``data.run_dir`` unless a path is set explicitly: Lightning's
    root and checkpoints (``<run_dir>/lightning``), W&B files and the saved config.yaml (the logger's
    save_dir), so two runs with different run directories share no file."""
    run_dir = check_output_dir(str(cfg.data.run_dir), "--data.run_dir")
    trainer = cfg.trainer
    if not trainer.get("default_root_dir"):
        trainer.default_root_dir = str(run_dir)
    for cb in _as_list(trainer.get("callbacks")):
        if _class_name(cb) == "ModelCheckpoint":
            init = _init_args(cb)
            if not init.get("dirpath"):
                init["dirpath"] = str(run_paths.lightning_dir(run_dir))
    for lg in _as_list(trainer.get("logger")):
        name = _class_name(lg)
        if not name:
            continue
        init = _init_args(lg)
        if init.get("save_dir") in (None, "", "."):  # "." is WandbLogger's own default, not a choice
            init["save_dir"] = str(run_dir)
        if name == "WandbLogger":
            if not wandb_has_key():  # no key: keep the run on disk, `wandb sync` uploads it later
                init["offline"] = True
            if not init.get("name"):
                init["name"] = run_dir.name
        os.makedirs(init["save_dir"], exist_ok=True)


def _as_list(value) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, list) else [value]


def _class_name(node) -> str:
    path = node.get("class_path", "") if hasattr(node, "get") else ""
    return str(path).rsplit(".", 1)[-1]


def _init_args(node):
    if node.get("init_args") is None:
        node["init_args"] = Namespace()
    return node["init_args"]


def _val_metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def _to_plain(obj: Any) -> Any:
    if hasattr(obj, "items"):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_to_plain(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return _to_plain(asdict(obj))
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


class _ParseOnlyCLI(PrismCLI):
    """The fit parser without building a Trainer or models (for commands that only read the config)."""

    def instantiate_classes(self) -> None:
        pass


def parse_config(prog: str, args: list[str]):
    """The resolved fit config (same files, keys and links as `fit`) for another command."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both `args` and an argv
    try:
        cli = _ParseOnlyCLI(
            PrismModule,
            PrismDataModule,
            run=False,
            args=with_default_config(args),
            parser_kwargs={"prog": f"python -m prism_lightning {prog}"},
        )
    finally:
        sys.argv = argv
    return cli.config


def run_lightning_cli(command: str, args: list[str]) -> PrismCLI:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    args = with_default_config(args)
    sys.argv = [sys.argv[0], command, *args]  # LightningCLI reads sys.argv (and warns if given both)
    try:
        return PrismCLI(
            PrismModule,
            PrismDataModule,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": f"{Path(sys.executable).name} -m prism_lightning"},
        )
    except SIGTERMException as stop:
        # Lightning ends training on SIGTERM with a bare SystemExit, i.e. exit code 0: a scheduler would
        # take the killed run for a finished one. (A bootstrap stage has already said so, with 143.)
        if stop.code != 143:
            print(
                f"stopped by SIGTERM during `{command}`: finished bootstrap stages and saved checkpoints are "
                "kept; --ckpt_path <run_dir>/lightning/last.ckpt resumes training when one was saved",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(143) from None


def bootstrap_main(argv: Sequence[str] | None = None) -> int:
    """``python -m prism_lightning bootstrap``: run (or reuse) every bootstrap stage and print the summary.
    It parses exactly what ``fit`` parses (the same YAML files, ``--data.bootstrap.*``,
    ``--model.backbone.*``, ``--trainer.devices`` ...), so a ``bootstrap`` followed by a ``fit`` with the
    same arguments finds every stage cached."""
    from prism_lightning.bootstrap import BootstrapConfig
    from prism_lightning.bootstrap.runner import run_bootstrap
    from prism_lightning.bootstrap.stage import global_rank
    from prism_lightning.bootstrap.summary import format_summary
    from prism_lightning.model.checks import check_module_settings

    cfg = parse_config("bootstrap", list(sys.argv[1:] if argv is None else argv))
    data = cfg.data
    bootstrap = BootstrapConfig(**data.bootstrap.as_dict())
    backbone = BackboneConfig(**data.backbone.as_dict())
    # the model settings that fit will use are checked now, so fit cannot fail on them after this work
    model_settings = cfg.model.as_dict()
    check_module_settings(model_settings)
    check_against_model(model_settings, backbone)
    result = run_bootstrap(bootstrap, backbone, data.run_dir, trainer_kwargs_from(cfg.trainer))
    if global_rank() == 0:
        print(format_summary(result.summary))
        print(f"summary: {result.summary_path}")
    return 0
