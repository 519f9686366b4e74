"""LightningCLI for `fit`, `validate`, `test` and `predict`.

`fit` is the whole method: the bootstrap stages (cached ones reused) run as Lightning predict jobs on
the configured devices, then the gate and LoRA train jointly, then the run is exported to
`checkpoints/<run>/` and a short routed sanity check prints which way a few queries went.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from prism_lightning.backbone import BackboneConfig
from prism_lightning.bootstrap.cli import trainer_kwargs_from
from prism_lightning.cli import package_configs_dir
from prism_lightning.data import PrismDataModule
from prism_lightning.model.module import PrismModule

SANITY_QUERIES = (
    "Write a short poem about autumn leaves.",
    "What is the capital of Australia? Answer with one word.",
    "How do I safely dispose of old batteries?",
)


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
        loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
        for lg in loggers:
            if not hasattr(lg, "get") or "WandbLogger" not in str(lg.get("class_path", "")):
                continue
            if lg.get("init_args") is None:
                lg["init_args"] = Namespace()
            init = lg["init_args"]
            if not wandb_has_key():  # no key: keep the run on disk, `wandb sync` uploads it later
                init["offline"] = True
            if not init.get("save_dir"):
                init["save_dir"] = str(cfg.data.run_dir)
            os.makedirs(init["save_dir"], exist_ok=True)

    def before_fit(self) -> None:
        dm: PrismDataModule = self.datamodule
        dm.ensure_bootstrap(trainer_kwargs_from(self._section().trainer))
        self.start_metrics: dict[str, float] = {}
        if self._section().validate_before_fit:
            self.trainer.validate(self.model, datamodule=dm, verbose=False)
            self.start_metrics = _val_metrics(self.trainer)
            # validate() ran under inference mode; fresh metric states keep fit's own loops legal.
            self.model.val_metrics.reset()
            self.model.val_route_rate.reset()

    def export_dir(self) -> Path:
        cfg = self._section()
        if cfg.get("export_dir"):
            return Path(cfg.export_dir)
        return Path("checkpoints") / Path(self.datamodule.run_dir).name

    def after_fit(self) -> None:
        if self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        from prism_lightning.model.export import export_checkpoint

        dm: PrismDataModule = self.datamodule
        cfg = self._section()
        keys = ("model", "data", "trainer", "seed_everything")
        training = {k: v for k, v in self._resolved_config().items() if k in keys}
        final = _val_metrics(self.trainer)
        training["metrics"] = {"before_fit": getattr(self, "start_metrics", {}), "after_fit": final}
        self._print_metrics(final)
        out = export_checkpoint(
            self.model,
            self.export_dir(),
            personas=dm.persona_names,
            bootstrap_summary=dm.bootstrap_summary,
            training_config=training,
        )
        print(f"\nexported checkpoint: {out}")
        print(f"bootstrap run:       {dm.run_dir}")
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or "(none)"
        print(f"lightning checkpoint: {best}")
        if self.trainer.logger is not None and getattr(self.trainer.logger, "save_dir", None):
            print(f"logs:                {self.trainer.logger.save_dir}")
        if cfg.sanity_check:
            self._sanity_check(out)

    def _resolved_config(self) -> dict:
        """The resolved config as plain JSON types, stored in prism.json for reproducibility."""
        return json.loads(json.dumps(_to_plain(self._section())))

    def _print_metrics(self, final: dict[str, float]) -> None:
        start = getattr(self, "start_metrics", {})
        print("\nvalidation split        before fit   after fit")
        keys = (
            "val/kl",
            "val/gate_loss",
            "val/gate_acc",
            "val/gate_auroc",
            "val/gate_f1",
            "val/routing_rate",
        )
        for key in keys:
            if key in final:
                before = f"{start[key]:.4f}" if key in start else "-"
                print(f"  {key:<22}{before:>11}{final[key]:>12.4f}")

    def _sanity_check(self, checkpoint: Path) -> None:
        from prism_lightning.generation import SamplingConfig
        from prism_lightning.model.export import load_checkpoint

        routed = load_checkpoint(checkpoint, device="cpu" if not torch.cuda.is_available() else None)
        outs = routed.generate(list(SANITY_QUERIES), sampling=SamplingConfig(max_new_tokens=32))
        print("\nrouted sanity check (gate decides inside the prefill):")
        for q, o in zip(SANITY_QUERIES, outs, strict=True):
            where = "adapter" if o.route else "base"
            print(f"  [{where:<7} p={o.gate_prob:.2f}] {q}\n      -> {o.text[:120]!r}")

    def before_predict(self) -> None:
        from prism_lightning.model.writer import RoutedPredictionWriter

        cfg = self._section()
        output = cfg.get("predict_output") or str(Path(self.datamodule.run_dir) / "predictions.jsonl")
        self.trainer.callbacks.append(RoutedPredictionWriter(output))


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


def with_default_config(args: list[str]) -> list[str]:
    """A command with no --config takes configs/default.yaml (the embedded default)."""
    has_config = any(a in ("-c", "--config") or a.startswith("--config=") for a in args)
    if not has_config and "--help" not in args and "-h" not in args:
        return ["--config", str(package_configs_dir() / "default.yaml"), *args]
    return list(args)


def parse_config(prog: str, args: list[str]):
    """The resolved fit config (same files, keys and links as `fit`) for another command."""
    cli = _ParseOnlyCLI(
        PrismModule,
        PrismDataModule,
        run=False,
        args=with_default_config(args),
        parser_kwargs={"prog": f"python -m prism_lightning {prog}"},
    )
    return cli.config


def run_lightning_cli(command: str, args: list[str]) -> PrismCLI:
    args = with_default_config(args)
    sys.argv = [sys.argv[0], command, *args]  # LightningCLI reads sys.argv (and warns if given both)
    return PrismCLI(
        PrismModule,
        PrismDataModule,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": f"{Path(sys.executable).name} -m prism_lightning"},
    )
