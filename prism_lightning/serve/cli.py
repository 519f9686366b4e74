"""`python -m prism_lightning serve --checkpoint DIR`: every argument is checked (checkpoint files, host,
port free) before the model loads; then uvicorn serves the app until SIGINT / SIGTERM, which finish
the requests in flight first."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from prism_lightning.errors import ConfigError, require

ENGINES = ("hf", "vllm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m prism_lightning serve",
        description="Serve an exported PRISM checkpoint behind an OpenAI-compatible API "
        "(/v1/chat/completions, /v1/models, /health, /metrics). Model names: NAME (the gate decides), "
        "NAME:on, NAME:off (route forced); a K-way checkpoint also NAME:<adapter> (that adapter forced).",
    )
    p.add_argument("--checkpoint", required=True, help="exported PRISM run directory (checkpoints/<run>)")
    p.add_argument("--engine", default="hf", choices=ENGINES, help="generation engine (default hf)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    p.add_argument("--served_model_name", default=None, help="model name (default: the checkpoint dir's)")
    p.add_argument("--threshold", type=float, default=None, help="gate threshold (default: the checkpoint's)")
    p.add_argument("--max_batch_size", type=int, default=32, help="most requests in one running batch")
    p.add_argument(
        "--batch_window_ms", type=float, default=20.0,
        help="how long the first waiting request waits for others to share its batch",
    )  # fmt: skip
    p.add_argument(
        "--default_max_tokens", type=int, default=256, help="answer length limit when a request sets none"
    )
    p.add_argument("--max_model_len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument(
        "--merge_weights", action="store_true",
        help="batches routed all on run on merged weights (faster, a second copy of the adapted weights)",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def check_args(args: argparse.Namespace) -> socket.socket:
    """Everything that can be wrong before the model loads; returns the bound listening socket."""
    from prism_lightning.model.export import verify_checkpoint

    if args.engine == "vllm":
        from prism_lightning.engines.vllm_core import require_vllm

        require_vllm()
        require(not args.merge_weights, "--merge_weights is for --engine hf (vLLM applies the LoRA itself).")
    require(0 <= args.port <= 65535, f"--port must be in 0..65535, got {args.port}.")
    require(args.max_batch_size >= 1, f"--max_batch_size must be >= 1, got {args.max_batch_size}.")
    require(args.batch_window_ms >= 0, f"--batch_window_ms must be >= 0, got {args.batch_window_ms}.")
    require(args.default_max_tokens >= 1, f"--default_max_tokens must be >= 1, got {args.default_max_tokens}")
    if args.max_model_len is not None:
        require(args.max_model_len >= 2, f"--max_model_len must be >= 2, got {args.max_model_len}.")
    if args.threshold is not None:
        require(0 < args.threshold < 1, f"--threshold must be in (0, 1), got {args.threshold}.")
    if args.served_model_name is not None:
        require(
            args.served_model_name.strip() != "" and not args.served_model_name.endswith((":on", ":off")),
            f"--served_model_name must be a non-empty name without :on/:off, got {args.served_model_name!r}.",
        )
    adapters = list(verify_checkpoint(args.checkpoint).get("adapters") or [])
    require(
        not (adapters and args.merge_weights),
        "--merge_weights serves one adapter; a K-way checkpoint keeps its adapters unmerged.",
    )
    clash = sorted({"on", "off"} & set(adapters))
    require(not clash, f"adapter name(s) {clash} clash with the NAME:on / NAME:off model names.")
    return bind(args.host, args.port)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so a taken port fails before minutes of model loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r} is not an address this machine can listen on ({err}).") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        reason = err.strerror or err
        raise ConfigError(f"cannot listen on {host}:{port}: {reason} (is the port in use?)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sock = check_args(args)
    import uvicorn

    from prism_lightning.model.export import load_checkpoint
    from prism_lightning.serve.app import create_app
    from prism_lightning.serve.engine import HFServeEngine
    from prism_lightning.serve.protocol import model_ids

    name = args.served_model_name or Path(args.checkpoint).resolve().name
    if args.engine == "vllm":
        from prism_lightning.serve.vllm_engine import VLLMServeEngine

        engine = VLLMServeEngine(
            args.checkpoint,
            threshold=args.threshold,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_batch_size,
        )
    else:
        routed = load_checkpoint(args.checkpoint, device=args.device, merge_weights=args.merge_weights)
        if args.threshold is not None:
            routed.threshold = args.threshold
        engine = HFServeEngine(
            routed,
            max_batch_size=args.max_batch_size,
            batch_window_s=args.batch_window_ms / 1000,
            max_model_len=args.max_model_len,
        )
    app = create_app(engine, name, default_max_tokens=args.default_max_tokens)
    host, port = sock.getsockname()[:2]
    variants = ", ".join(model_ids(name, engine.adapter_names)[1:])
    print(
        f"serving {name} ({variants}) with the {args.engine} engine on http://{host}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug")
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again for the handler that
    # was there before it: a no-op here, so a clean shutdown exits 0 instead of dying of the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("server stopped: every request in flight was answered", file=sys.stderr)
    return 0
