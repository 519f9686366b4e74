"""Command dispatch: Lightning's verbs go to LightningCLI, PRISM's own verbs to their modules.

Only commands that are built are listed; each module is imported when its command runs so
`--help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

LIGHTNING_COMMANDS = {
    "fit": "bootstrap (cached stages reused), train the gate and LoRA jointly, export, sanity-check",
    "validate": "run the validation loop on the bootstrapped validation split",
    "test": "run the test loop",
    "predict": "routed generation over a JSONL of prompts",
}
PRISM_COMMANDS: dict[str, tuple[str, str]] = {
    "bootstrap": (
        "prism_lightning.lightning_cli:bootstrap_main",
        "write queries, answers, verdicts, teacher logits",
    ),
    "chat": ("prism_lightning.chat:chat_main", "talk to a model, with a persona or a routed checkpoint"),
    "assets": ("prism_lightning.asset_cli:assets_main", "fetch the embedded model and benchmark files"),
    "evaluate": (
        "prism_lightning.eval.cli:evaluate_main",
        "MT-Bench, MMLU and safety under base/persona/random_persona/lora/prism",
    ),
    "study": ("prism_lightning.eval.cli:study_main", "persona-effect grid: personas x lengths x placements"),
    "probe-gate": (
        "prism_lightning.eval.gate_probe:probe_gate_main",
        "cross-validated linear probes on the gate's candidate inputs (which layer k separates intents)",
    ),
    "report": (
        "prism_lightning.analysis.report:report_main",
        "figures (PNG) and a Markdown summary of a run, its evaluation and study",
    ),
    "reproduce": (
        "prism_lightning.reproduce.cli:reproduce_main",
        "the paper's pipeline for one model (--preset) and its numbers beside the paper's",
    ),
    "serve": (
        "prism_lightning.serve.cli:serve_main",
        "serve a checkpoint behind an OpenAI-compatible API (routed per request)",
    ),
}


def _usage() -> str:
    lines = ["usage: python -m prism_lightning <command> [options]", "", "commands:"]
    for name, text in LIGHTNING_COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, (_, text) in PRISM_COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    lines += [
        "",
        "`python -m prism_lightning <command> --help` shows a command's options.",
        "`fit` with no --config uses configs/default.yaml (the embedded SmolLM2 default).",
    ]
    return "\n".join(lines)


def _load(target: str) -> Callable[[Sequence[str]], int | None]:
    module, func = target.split(":")
    return getattr(__import__(module, fromlist=[func]), func)


class _DropLitLoggerTip(logging.Filter):
    """Lightning advertises its cloud logger once per Trainer, i.e. once per bootstrap stage."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def configure_logging() -> None:
    """One line per log record: Lightning prints its records through its own handler, so they must not
    reach the root handler a second time."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning").propagate = False
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLitLoggerTip())


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in LIGHTNING_COMMANDS and command not in PRISM_COMMANDS:
        print(f"Unknown command {command!r}.\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    from prism_lightning.errors import PrismError

    try:
        if command in LIGHTNING_COMMANDS:
            from prism_lightning.lightning_cli import run_lightning_cli

            run_lightning_cli(command, rest)
            return
        code = _load(PRISM_COMMANDS[command][0])(rest)
    except PrismError as err:  # the user's input: one clear message, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code or 0)
