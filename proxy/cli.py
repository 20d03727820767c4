"""The `llm-gateway` command: serve, check-config, token, ab-report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from proxy.settings import ConfigError, Settings, load_settings

_PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"


def default_config() -> Path:
    """`config/gateway.yaml` in the working directory, else the one shipped with the project."""
    local = Path("config/gateway.yaml")
    return local if local.exists() else _PROJECT_CONFIG


def _load(path: str | None) -> tuple[Path, Settings]:
    p = Path(path) if path else default_config()
    try:
        return p, load_settings(p)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    path, settings = _load(args.path)
    print(f"{path}: ok ({len(settings.backends)} backends, {len(settings.models)} models)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from proxy.auth.authenticator import ensure_secret
    from proxy.edge import ENV as EDGE_ENV
    from proxy.edge import GuardedHttpToolsProtocol
    from proxy.observability.metrics import prepare_multiprocess
    from proxy.observability.observer import configure_logging

    path, settings = _load(args.config)
    server = settings.server
    host, port = args.host or server.host, args.port if args.port is not None else server.port
    workers = args.workers or server.workers
    configure_logging(settings.observability)
    prepare_multiprocess(workers)  # before workers start: they share one PROMETHEUS_MULTIPROC_DIR
    # The secret is settled here, once, before workers start, so every worker reads the same one.
    _, generated = ensure_secret(settings.auth, Path(server.state_dir))
    if generated:
        print(
            f"Generated a JWT signing secret in {server.state_dir}/jwt_secret (mode 0600).\n"
            f"Mint a token:  llm-gateway token --config {path} --sub alice",
            file=sys.stderr,
        )
    os.environ["LLM_GATEWAY_CONFIG"] = str(path)
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


def cmd_token(args: argparse.Namespace) -> int:
    from proxy.auth.authenticator import ensure_secret, mint_token, parse_ttl

    _, settings = _load(args.config)
    auth = settings.auth
    algorithm = auth.algorithms[0]
    if not algorithm.startswith("HS"):
        print(
            "token: only HS* algorithms can be minted here (RS/ES keys belong to your IdP)", file=sys.stderr
        )
        return 2
    secret, _ = ensure_secret(auth, Path(settings.server.state_dir))
    token = mint_token(
        key=secret,
        algorithm=algorithm,
        sub=args.sub,
        tenant=args.tenant,
        tier=args.tier,
        models=args.models.split(",") if args.models else None,
        ttl_s=parse_ttl(args.ttl),
        audience=auth.audience,
        issuer=auth.issuer,
        settings=auth,
    )
    print(token)
    return 0


def cmd_ab_report(args: argparse.Namespace) -> int:
    from proxy.auth.authenticator import parse_ttl
    from proxy.experiments.aggregates import ab_report

    _, settings = _load(args.config)
    try:
        since_s = parse_ttl(args.since)
    except ValueError as exc:
        print(f"ab-report: {exc}", file=sys.stderr)
        return 2
    return ab_report(settings, model=args.model, since_s=since_s, window=args.since, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description="OpenAI-compatible LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="config file (default: config/gateway.yaml)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", nargs="?")
    check.set_defaults(func=cmd_check_config)
    token = sub.add_parser("token", help="print a JWT signed with the configured key")
    token.add_argument("--config")
    token.add_argument("--sub", required=True)
    token.add_argument("--tenant")
    token.add_argument("--tier")
    token.add_argument("--models", help="comma-separated allow-list of public model names")
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d")
    token.set_defaults(func=cmd_token)
    report = sub.add_parser("ab-report", help="per-variant A/B statistics from the shared aggregates")
    report.add_argument("--config")
    report.add_argument("--model", help="one experiment (public model name); default: all")
    report.add_argument("--since", default="1h", help="window: 90s, 15m, 1h, 7d")
    report.add_argument("--json", action="store_true", help="machine-readable output")
    report.set_defaults(func=cmd_ab_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
