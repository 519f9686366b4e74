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
from dataclasses import dataclass
from pathlib import Path

from prism_lightning.errors import ConfigError, require
from prism_lightning.serve.guard import DEFAULT_MAX_BODY_BYTES, ServeLimits
from prism_lightning.settings_args import (
    HelpFormatter,
    add_dataclass_arguments,
    flag,
    nested,
    settings_from_namespace,
)

ENGINES = ("hf", "vllm")
API_KEY_ENV = "PRISM_API_KEY"
SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


@dataclass(kw_only=True)
class NetworkSettings:
    """Authentication and limits for a server others can reach."""

    api_key: str | None = flag(None)
    """clients must send `Authorization: Bearer KEY` (every route but /health); default: $PRISM_API_KEY,
    else no authentication (then only a loopback --host is allowed)"""
    allow_unauthenticated: bool = flag(False)
    """listen on a non-loopback --host without an API key"""
    max_body_bytes: int = flag(DEFAULT_MAX_BODY_BYTES)
    """largest request body; larger ones get 413 unread (default 1 MiB)"""
    max_queue: int = flag(256)
    """requests that may wait beyond --max_batch_size running ones; more get 429 with Retry-After
    (default 256)"""
    request_timeout: float | None = flag(None)
    """seconds from arrival a request may take; then it is cancelled and gets 504 (a stream: an error
    event). Default: no limit"""


@dataclass(kw_only=True)
class ServeSettings:
    """``serve``'s options, declared once: the command line is generated from these fields."""

    checkpoint: str = flag()
    """exported PRISM run directory (checkpoints/<run>)"""
    engine: str = flag("hf", choices=ENGINES)
    """generation engine (default hf)"""
    host: str = flag("127.0.0.1")
    """address to listen on (default 127.0.0.1)"""
    port: int = flag(8000)
    """port; 0 picks a free one (default 8000)"""
    served_model_name: str | None = flag(None)
    """model name (default: the checkpoint dir's)"""
    threshold: float | None = flag(None)
    """gate threshold (default: the checkpoint's)"""
    max_batch_size: int = flag(32)
    """most requests in one running batch"""
    scheduler: str = flag("continuous", choices=("continuous", "static"))
    """hf engine: continuous (a waiting request joins the running batch at the next decode step, a
    finished one leaves it at once) or static (each batch runs to its end before the next starts);
    default continuous"""
    batch_window_ms: float = flag(20.0)
    """how long the first waiting request waits for others to share its batch"""
    default_max_tokens: int = flag(256)
    """answer length limit when a request sets none"""
    max_model_len: int | None = flag(None)
    """context limit (default: the model's)"""
    merge_weights: bool = flag(False)
    """batches routed all on run on merged weights (faster, a second copy of the adapted weights)"""
    device: str | None = flag(None)
    """cpu, cuda, cuda:1 ... (default: cuda when available)"""
    log_level: str = flag("info", choices=("debug", "info", "warning", "error"))
    """uvicorn's log level (debug also logs every request)"""
    network: NetworkSettings = nested(
        NetworkSettings, ("network", "authentication and limits for a server others can reach")
    )


def build_parser() -> argparse.ArgumentParser:
    """``serve``'s command line, generated from :class:`ServeSettings`."""
    p = argparse.ArgumentParser(
        prog="python -m prism_lightning serve",
        description="Serve an exported PRISM checkpoint behind an OpenAI-compatible API\n"
        "(/v1/chat/completions, /v1/models, /health, /metrics). Model names: NAME (the gate decides),\n"
        "NAME:on, NAME:off (route forced); a K-way checkpoint also NAME:<adapter> (that adapter forced).",
        formatter_class=HelpFormatter,
    )
    add_dataclass_arguments(p, ServeSettings)
    return p


def check_args(settings: ServeSettings) -> tuple[str | None, socket.socket]:
    """Everything that can be wrong before the model loads; returns the API key (``--api_key``, else
    ``$PRISM_API_KEY``) and the bound listening socket."""
    from prism_lightning.model.export import verify_checkpoint

    net = settings.network
    if settings.engine == "vllm":
        from prism_lightning.engines.vllm_core import require_vllm

        require(
            settings.scheduler == "continuous",
            "--scheduler static is for --engine hf (vLLM schedules continuously itself).",
        )
        require_vllm()
        require(
            not settings.merge_weights, "--merge_weights is for --engine hf (vLLM applies the LoRA itself)."
        )
        require(settings.device is None, "--device is for --engine hf (vLLM places the model itself).")
    require(0 <= settings.port <= 65535, f"--port must be in 0..65535, got {settings.port}.")
    require(settings.max_batch_size >= 1, f"--max_batch_size must be >= 1, got {settings.max_batch_size}.")
    require(settings.batch_window_ms >= 0, f"--batch_window_ms must be >= 0, got {settings.batch_window_ms}.")
    require(
        settings.default_max_tokens >= 1,
        f"--default_max_tokens must be >= 1, got {settings.default_max_tokens}",
    )
    if settings.max_model_len is not None:
        require(settings.max_model_len >= 2, f"--max_model_len must be >= 2, got {settings.max_model_len}.")
    if settings.threshold is not None:
        require(0 < settings.threshold < 1, f"--threshold must be in (0, 1), got {settings.threshold}.")
    require(net.max_body_bytes >= 1, f"--max_body_bytes must be >= 1, got {net.max_body_bytes}.")
    require(net.max_queue >= 0, f"--max_queue must be >= 0, got {net.max_queue}.")
    if net.request_timeout is not None:
        timeout = net.request_timeout
        require(
            math.isfinite(timeout) and timeout > 0,
            f"--request_timeout must be a number of seconds > 0, got {timeout}.",
        )
    api_key = resolve_api_key(net.api_key)
    if api_key is None and not net.allow_unauthenticated and not is_loopback(settings.host):
        raise ConfigError(
            f"--host {settings.host} can be reached from other machines and no API key is set: pass "
            f"--api_key (or set ${API_KEY_ENV}), or --allow_unauthenticated to serve anyone who can connect."
        )
    name = settings.served_model_name
    if name is not None:
        require(
            name.strip() != "" and not name.endswith((":on", ":off")),
            f"--served_model_name must be a non-empty name without :on/:off, got {name!r}.",
        )
    adapters = list(verify_checkpoint(settings.checkpoint).get("adapters") or [])
    require(
        not (adapters and settings.merge_weights),
        "--merge_weights serves one adapter; a K-way checkpoint keeps its adapters unmerged.",
    )
    clash = sorted({"on", "off"} & set(adapters))
    require(not clash, f"adapter name(s) {clash} clash with the NAME:on / NAME:off model names.")
    return api_key, bind(settings.host, settings.port)


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
    """``serve`` from the command line: its flags are :class:`ServeSettings`'s fields."""
    serve_command(settings_from_namespace(ServeSettings, build_parser().parse_args(argv)))
    return 0


def serve_command(settings: ServeSettings) -> None:
    """Check every input, load the checkpoint and serve it until SIGINT / SIGTERM (requests in flight
    are answered first)."""
    require_server_packages()
    api_key, sock = check_args(settings)
    import uvicorn

    from prism_lightning.model.export import load_checkpoint
    from prism_lightning.serve.app import create_app
    from prism_lightning.serve.engine import HFServeEngine
    from prism_lightning.serve.protocol import model_ids

    name = settings.served_model_name or Path(settings.checkpoint).resolve().name
    if settings.engine == "vllm":
        from prism_lightning.serve.vllm_engine import VLLMServeEngine

        engine = VLLMServeEngine(
            settings.checkpoint,
            threshold=settings.threshold,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_batch_size,
        )
    else:
        routed = load_checkpoint(
            settings.checkpoint, device=settings.device, merge_weights=settings.merge_weights
        )
        if settings.threshold is not None:
            routed.threshold = settings.threshold
        engine = HFServeEngine(
            routed,
            max_batch_size=settings.max_batch_size,
            batch_window_s=settings.batch_window_ms / 1000,
            max_model_len=settings.max_model_len,
            scheduler=settings.scheduler,
        )
    net = settings.network
    limits = ServeLimits(
        api_key=api_key,
        max_body_bytes=net.max_body_bytes,
        max_in_flight=settings.max_batch_size + net.max_queue,
        request_timeout_s=net.request_timeout,
    )
    app = create_app(engine, name, default_max_tokens=settings.default_max_tokens, limits=limits)
    host, port = sock.getsockname()[:2]
    auth = "an API key required" if api_key else "no authentication"
    variants = ", ".join(model_ids(name, engine.adapter_names)[1:])
    print(
        f"serving {name} ({variants}) with the {settings.engine} engine on http://{host}:{port}/v1 ({auth})",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=settings.log_level == "debug")
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again for the handler that
    # was there before it: a no-op here, so a clean shutdown exits 0 instead of dying of the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("server stopped: every request in flight was answered", file=sys.stderr)
