"""What is known about one request as it passes the stages; the log line and metrics read it when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.auth.authenticator import Principal


@dataclass(slots=True)
class Call:
    """Everything known about one request; observability reads it when the request ends."""

    request_id: str
    started: float
    endpoint: str = "chat"  # the API the client spoke (proxy/apis/)
    principal: Principal | None = None
    model: str | None = None
    variant: str | None = None
    backend: str | None = None
    tried: list[str] = field(default_factory=list)
    fallback_reasons: list[str] = field(default_factory=list)
    cache: str = "bypass"
    policy: list[str] = field(default_factory=list)
    pii: dict[str, int] = field(default_factory=dict)  # personal data: "direction:type:action" -> values
    stream: bool = False
    status: int = 200
    error: str | None = None
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    disconnected: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    completion_id: str | None = None  # the id the client saw; feedback maps it back to the variant
    route: str | None = None  # how the pool ordered its replicas: affinity|spill|least_loaded|random|shed
