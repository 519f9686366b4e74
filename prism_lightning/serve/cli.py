"""`python -m prism_lightning serve --checkpoint DIR`: every argument is checked (checkpoint files, host,
port free, an API key off loopback) before the model loads; then uvicorn serves the app until SIGINT /
SIGTERM, which finish the requests in flight first."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import math
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from prism_lightning.errors import ConfigError, require
from prism_lightning.serve.guard import DEFAULT_MAX_BODY_BYTES, ServeLimits

ENGINES = ("hf", "vllm")
API_KEY_ENV = "PRISM_API_KEY"
SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


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
        "--scheduler", default="continuous", choices=("continuous", "static"),
        help="hf engine: continuous (a waiting request joins the running batch at the next decode step, "
        "a finished one leaves it at once) or static (each batch runs to its end before the next starts); "
        "default continuous",
    )  # fmt: skip
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
    net = p.add_argument_group("network", "authentication and limits for a server others can reach")
    net.add_argument(
        "--api_key", default=None,
        help=f"clients must send `Authorization: Bearer KEY` (every route but /health); default: "
        f"${API_KEY_ENV}, else no authentication (then only a loopback --host is allowed)",
    )  # fmt: skip
    net.add_argument(
        "--allow_unauthenticated", action="store_true",
        help="listen on a non-loopback --host without an API key",
    )  # fmt: skip
    net.add_argument(
        "--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body; larger ones get 413 unread (default {DEFAULT_MAX_BODY_BYTES}, 1 MiB)",
    )  # fmt: skip
    net.add_argument(
        "--max_queue", type=int, default=256,
        help="requests that may wait beyond --max_batch_size running ones; more get 429 with Retry-After "
        "(default 256)",
    )  # fmt: skip
    net.add_argument(
        "--request_timeout", type=float, default=None,
        help="seconds from arrival a request may take; then it is cancelled and gets 504 (a stream: an "
        "error event). Default: no limit",
    )  # fmt: skip
    return p


def check_args(args: argparse.Namespace) -> socket.socket:
    """Everything that can be wrong before the model loads; returns the bound listening socket."""
    from prism_lightning.model.export import verify_checkpoint

    if args.engine == "vllm":
        from prism_lightning.engines.vllm_core import require_vllm

        require(
            args.scheduler == "continuous",
            "--scheduler static is for --engine hf (vLLM schedules continuously itself).",
        )
        require_vllm()
        require(not args.merge_weights, "--merge_weights is for --engine hf (vLLM applies the LoRA itself).")
        require(args.device is None, "--device is for --engine hf (vLLM places the model itself).")
    require(0 <= args.port <= 65535, f"--port must be in 0..65535, got {args.port}.")
    require(args.max_batch_size >= 1, f"--max_batch_size must be >= 1, got {args.max_batch_size}.")
    require(args.batch_window_ms >= 0, f"--batch_window_ms must be >= 0, got {args.batch_window_ms}.")
    require(args.default_max_tokens >= 1, f"--default_max_tokens must be >= 1, got {args.default_max_tokens}")
    if args.max_model_len is not None:
        require(args.max_model_len >= 2, f"--max_model_len must be >= 2, got {args.max_model_len}.")
    if args.threshold is not None:
        require(0 < args.threshold < 1, f"--threshold must be in (0, 1), got {args.threshold}.")
    require(args.max_body_bytes >= 1, f"--max_body_bytes must be >= 1, got {args.max_body_bytes}.")
    require(args.max_queue >= 0, f"--max_queue must be >= 0, got {args.max_queue}.")
    if args.request_timeout is not None:
        timeout = args.request_timeout
        require(
            math.isfinite(timeout) and timeout > 0,
            f"--request_timeout must be a number of seconds > 0, got {timeout}.",
        )
    args.api_key = resolve_api_key(args.api_key)
    if args.api_key is None and not args.allow_unauthenticated and not is_loopback(args.host):
        raise ConfigError(
            f"--host {args.host} can be reached from other machines and no API key is set: pass --api_key "
            f"(or set ${API_KEY_ENV}), or --allow_unauthenticated to serve anyone who can connect."
        )
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


def resolve_api_key(flag: str | None) -> str | None:
    """The key from --api_key, else from $PRISM_API_KEY (an empty variable counts as unset)."""
    key = flag if flag is not None else (os.environ.get(API_KEY_ENV) or None)
    if key is not None:
        source = "--api_key" if flag is not None else f"${API_KEY_ENV}"
        require(
            key.isascii() and key.isprintable() and key != "" and " " not in key,
            f"{source} must be a non-empty key of printable ASCII characters without spaces.",
        )
    return key


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one (127.0.0.0/8, ::1); a host that does
    not resolve counts as loopback here, and `bind` then says what is wrong with it."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return True
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def require_server_packages() -> None:
    """One error line instead of a ModuleNotFoundError traceback when the web stack is missing."""
    for name in SERVER_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing = err.name or name
            raise ConfigError(
                f"serve needs {', '.join(SERVER_PACKAGES)}, and `{missing}` cannot be imported: "
                f"pip install {' '.join(SERVER_PACKAGES)} (or reinstall prism_lightning, which needs them)."
            ) from None


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
    require_server_packages()
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
            scheduler=args.scheduler,
        )
    limits = ServeLimits(
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        max_in_flight=args.max_batch_size + args.max_queue,
        request_timeout_s=args.request_timeout,
    )
    app = create_app(engine, name, default_max_tokens=args.default_max_tokens, limits=limits)
    host, port = sock.getsockname()[:2]
    auth = "an API key required" if args.api_key else "no authentication"
    variants = ", ".join(model_ids(name, engine.adapter_names)[1:])
    print(
        f"serving {name} ({variants}) with the {args.engine} engine on http://{host}:{port}/v1 ({auth})",
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
