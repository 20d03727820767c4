"""The `llm-gateway` command: serve, check-config, token, ab-report.

A user's mistake (a bad flag, a config problem, a missing secret) is one line on stderr and a
non-zero exit status, never a traceback: 2 for usage and configuration, 1 for a missing resource.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from proxy.settings import ConfigError, Settings, load_settings

_PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"
_MAX_CLAIM_CHARS = 256  # what the authenticator accepts for sub and tenant


class _Parser(argparse.ArgumentParser):
    """Reports a usage mistake on one line instead of the usage text and a second line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Fail(Exception):
    """A user-facing failure: its message is printed as it is, then the command exits with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def default_config() -> Path:
    """`config/gateway.yaml` in the working directory, else the one shipped with the project."""
    local = Path("config/gateway.yaml")
    return local if local.exists() else _PROJECT_CONFIG


def _config_path(given: str | None) -> Path:
    return Path(given) if given else default_config()


def _load(path: Path) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise _Fail(str(exc)) from None


def _checked(path: Path) -> Settings:
    """The settings after every start-up check (proxy/preflight.py): what serve and check-config use."""
    from proxy.preflight import check

    try:
        return check(path)
    except ConfigError as exc:
        raise _Fail(str(exc)) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    path = _config_path(args.config or args.path)
    settings = _checked(path)
    print(f"{path}: ok ({len(settings.backends)} backends, {len(settings.models)} models)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.edge import ENV as EDGE_ENV
    from proxy.edge import GuardedHttpToolsProtocol
    from proxy.observability.metrics import prepare_multiprocess
    from proxy.observability.observer import configure_logging

    path = _config_path(args.config)
    settings = _checked(path)
    server = settings.server
    host, port = args.host or server.host, args.port if args.port is not None else server.port
    workers = args.workers or server.workers
    configure_logging(settings.observability)
    prepare_multiprocess(workers)  # before workers start: they share one PROMETHEUS_MULTIPROC_DIR
    _settle_secret(path, settings)  # once, before workers start, so that every worker reads the same one
    os.environ["LLM_GATEWAY_CONFIG"] = os.path.abspath(path)
    os.environ[EDGE_ENV] = f"{server.max_headers},{server.max_header_bytes},{server.header_timeout_s}"
    uvicorn.run(
        "proxy.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=GuardedHttpToolsProtocol,
        loop="uvloop",
        access_log=False,
        timeout_keep_alive=30,
        limit_max_requests=None,
        server_header=False,
        date_header=False,
        proxy_headers=False,  # no client address is used or logged: one ASGI layer less
        log_level=settings.observability.log_level,
    )
    return 0


def _settle_secret(path: Path, settings: Settings) -> None:
    """The first run of `serve` (and only it) generates the signing secret `token` reads."""
    from proxy.auth.authenticator import ensure_secret

    state = Path(settings.server.state_dir)
    try:
        _, generated = ensure_secret(settings.auth, state)
    except (OSError, ValueError) as exc:
        raise _Fail(f"{path}: server.state_dir: cannot keep the signing secret in {state}: {exc}") from None
    if generated:
        print(
            f"Generated a JWT signing secret in {state / 'jwt_secret'} (mode 0600).\n"
            f"Mint a token:  llm-gateway token --config {os.path.abspath(path)} --sub alice",
            file=sys.stderr,
        )


def cmd_token(args: argparse.Namespace) -> int:
    from proxy.auth.authenticator import mint_token

    path = _config_path(args.config)
    settings = _load(path)
    auth = settings.auth
    algorithm = next((a for a in auth.algorithms if a.startswith("HS")), None)
    if algorithm is None:
        raise _Fail("token: only HS* algorithms can be minted here (RS/ES keys belong to your IdP)")
    _check_claims(path, settings, args.tier, args.models)
    token = mint_token(
        key=_signing_secret(path, settings),
        algorithm=algorithm,
        sub=args.sub,
        tenant=args.tenant,
        tier=args.tier,
        models=args.models,
        ttl_s=args.ttl,
        audience=auth.audience,
        issuer=auth.issuer,
        settings=auth,
        admin=args.admin,
    )
    print(token)
    return 0


def _check_claims(path: Path, settings: Settings, tier: str | None, models: list[str] | None) -> None:
    """A token for a tier or a model the config does not know would fail later, at request time."""
    if tier is not None and tier not in settings.limits.tiers:
        known = ", ".join(settings.limits.tiers)
        raise _Fail(f"token: --tier {tier!r} is not a tier in {path} (limits.tiers: {known})")
    unknown = [m for m in models or () if m not in settings.models]
    if unknown:
        known = ", ".join(settings.models)
        raise _Fail(f"token: --models: {', '.join(map(repr, unknown))} not in {path} (models: {known})")


def _signing_secret(path: Path, settings: Settings) -> str:
    """The secret the server verifies with; minting never creates one."""
    from proxy.auth.authenticator import read_secret

    state = Path(settings.server.state_dir)
    try:
        secret = read_secret(settings.auth, state)
    except (OSError, ValueError) as exc:
        raise _Fail(f"token: {exc}") from None
    if not secret:
        raise _Fail(
            f"token: no signing secret: {path} sets no auth.secret and {state / 'jwt_secret'} does not "
            f"exist; start the gateway once (llm-gateway serve --config {path}) or set auth.secret",
            code=1,
        )
    return secret


def cmd_ab_report(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from proxy.experiments.report import render_text, report_document

    path = _config_path(args.config)
    settings = _load(path)
    if not settings.redis_url:
        raise _Fail(
            f"ab-report reads the A/B aggregates from Redis, and {path} sets no redis_url: point it "
            "(or REDIS_URL) at the Redis the gateway writes to; without one they live only in the gateway"
        )
    if args.model is not None and args.model not in settings.models and not args.all:
        known = ", ".join(settings.models)
        raise _Fail(f"ab-report: unknown model {args.model!r} (models: {known}; --all: also unconfigured)")
    try:
        data = asyncio.run(_read_aggregates(settings, args.since[1], args.model))
    except (RedisError, OSError, TimeoutError) as exc:
        raise _Fail(f"ab-report: cannot read Redis: {exc}", code=1) from None
    document = report_document(settings, data, args.since[1], args.model, include_all=args.all)
    if args.json:
        import orjson

        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_text(document["experiments"], args.since[0]))
    return 0


async def _read_aggregates(settings: Settings, since_s: int, model: str | None) -> dict[str, Any]:
    from proxy.experiments.aggregates import ExperimentStore
    from proxy.redis import SharedRedis

    redis = SharedRedis(settings.redis_url, settings.redis)  # the config's timeouts, as serve uses them
    store = ExperimentStore(redis, settings.observability)
    try:
        return await store.read(since_s, model)
    finally:
        await store.close()
        await redis.close()


# -- arguments ---------------------------------------------------------------------------------------
def _duration(text: str) -> int:
    from proxy.auth.authenticator import parse_ttl

    try:
        return parse_ttl(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 90s, 15m, 1h or 7d") from None


def _window(text: str) -> tuple[str, int]:
    return text, _duration(text)


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return value

    return parse


def _claim(text: str) -> str:
    if not text or len(text) > _MAX_CLAIM_CHARS:
        raise argparse.ArgumentTypeError(f"must be 1 to {_MAX_CLAIM_CHARS} characters")
    return text


def _model_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one model (comma-separated)")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llm-gateway", description="OpenAI-compatible LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "config file (default: config/gateway.yaml here, else the project's)"
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=config_help)
    serve.add_argument("--host", help="overrides server.host")
    serve.add_argument("--port", type=_bounded(0, 65535), help="overrides server.port")
    serve.add_argument("--workers", type=_bounded(1, 64), help="overrides server.workers")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="run every start-up check of serve, then exit")
    check.add_argument("path", nargs="?", help=config_help)
    check.add_argument("--config", help="the same as the positional path")
    check.set_defaults(func=cmd_check_config)
    token = sub.add_parser("token", help="print a JWT signed with the gateway's key (never creates one)")
    token.add_argument("--config", help=config_help)
    token.add_argument("--sub", required=True, type=_claim, help="the caller's identity")
    token.add_argument("--tenant", type=_claim, help="cache and rate-limit scope (default: the sub)")
    token.add_argument("--tier", help="a tier of limits.tiers (default: default)")
    token.add_argument("--models", type=_model_list, help="comma-separated allow-list of public model names")
    token.add_argument("--ttl", default=_duration("1h"), type=_duration, help="lifetime: 90s, 15m, 1h, 7d")
    token.add_argument("--admin", action="store_true", help="add the admin claim: the web console's data")
    token.set_defaults(func=cmd_token)
    report = sub.add_parser("ab-report", help="per-variant A/B statistics from the aggregates in Redis")
    report.add_argument("--config", help=config_help)
    report.add_argument("--model", help="one experiment (public model name); default: all configured")
    report.add_argument("--since", default=_window("1h"), type=_window, help="window: 90s, 15m, 1h, 7d")
    report.add_argument("--all", action="store_true", help="also models and variants no longer configured")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(func=cmd_ab_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _Fail as exc:
        print(exc, file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    raise SystemExit(main())
