"""The `llm-gateway` command as a user meets it: one-line errors, exit 2 for usage and config
mistakes, never a traceback; `token` never creates a secret and signs with the server's."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import jwt
import pytest
import yaml

from proxy.auth.authenticator import Authenticator, ensure_secret
from proxy.cli import main
from proxy.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


def _config(folder: Path, **sections: object) -> Path:
    """A config in its own folder, with its word list beside it and a relative state_dir."""
    (folder / "words").mkdir(parents=True)
    shutil.copy(ROOT / "config/words/en.txt", folder / "words/en.txt")
    config: dict[str, object] = {
        "server": {"state_dir": ".state"},
        "auth": {"audience": "llm-gateway", "issuer": "cli-test"},
        "limits": {"tiers": {"default": {}, "pro": {"requests_per_minute": 600}}},
        "cache": {"semantic": {"enabled": False}},
        "policies": {"words": ["words/en.txt"]},
        "backends": {"gpu": {"type": "openai", "url": "http://127.0.0.1:9", "model": "m"}},
        "models": {"assistant": {"variants": [{"name": "control", "weight": 1, "backends": ["gpu"]}]}},
        **sections,
    }
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _files(*folders: Path) -> set[Path]:
    return {p for f in folders for p in f.rglob("*")}


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Commands run from a folder that is neither the project nor the config's."""
    where = tmp_path / "elsewhere"
    where.mkdir()
    monkeypatch.chdir(where)
    return where


def test_token_without_a_secret_fails_and_creates_nothing(
    tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "cfg")
    before = _files(tmp_path)
    assert main(["token", "--config", str(config), "--sub", "alice"]) == 1
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert "no signing secret" in line and "llm-gateway serve --config" in line
    assert captured.out == ""
    assert _files(tmp_path) == before  # no .state here, none beside the config


def test_token_signs_with_the_secret_serve_created(
    tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "cfg")
    settings = load_settings(config)
    # what `serve` does before its workers start, with the state_dir the config resolves to
    secret, generated = ensure_secret(settings.auth, Path(settings.server.state_dir))
    assert generated and (tmp_path / "cfg/.state/jwt_secret").is_file()
    assert main(["token", "--config", str(config), "--sub", "alice", "--tier", "pro", "--models", "assistant"]) == 0
    token = capsys.readouterr().out.strip()
    auth = Authenticator(settings.auth, secret=secret)  # what the server's lifespan builds
    principal = asyncio.run(auth.authenticate([f"Bearer {token}"]))
    assert (principal.sub, principal.tier, principal.allowed_models) == ("alice", "pro", frozenset({"assistant"}))
    assert not (cwd / ".state").exists()
    assert "admin" not in jwt.decode(token, options={"verify_signature": False})
    assert main(["token", "--config", str(config), "--sub", "ops", "--admin"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), secret, audience=settings.auth.audience, algorithms=["HS256"])
    assert claims[settings.auth.admin_claim] is True  # the web console's data


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--ttl", "5y"], "invalid duration '5y'"),
        (["--ttl", "0s"], "invalid duration '0s'"),
        (["--tier", "platinum"], "--tier 'platinum' is not a tier"),
        (["--models", "nosuch"], "'nosuch' not in"),
        (["--models", "assistant,nosuch"], "'nosuch' not in"),
        (["--models", ","], "name at least one model"),
        (["--sub", ""], "must be 1 to 256 characters"),
    ],
)
def test_token_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    config = _config(tmp_path / "cfg", auth={"secret": "s" * 40})
    argv = ["token", "--config", str(config), "--sub", "alice", *args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit, for a value its type refused
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert fragment in _one_line_error(captured.err) and captured.out == ""


def test_tier_and_models_the_config_knows_are_minted(
    tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "cfg", auth={"secret": "s" * 40})
    assert main(["token", "--config", str(config), "--sub", "bob", "--tier", "default", "--ttl", "7d"]) == 0
    assert capsys.readouterr().out.count(".") == 2  # a JWT


def test_check_config_and_serve_refuse_the_same_mistake_the_same_way(
    tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "cfg", policies={"words": ["words/en.txt", "words/zh.txt"]})
    assert main(["check-config", str(config)]) == 2
    checked = _one_line_error(capsys.readouterr().err)
    assert checked.startswith(f"{config}:") and "policies.words.1: cannot read word list" in checked
    # an unusable host: were the config to pass, serve would fail to bind rather than run on
    assert main(["serve", "--config", str(config), "--host", "256.0.0.1"]) == 2  # refused before it listens
    assert _one_line_error(capsys.readouterr().err) == checked
    assert not (tmp_path / "cfg/.state").exists()  # nothing was started, no secret generated


@pytest.mark.parametrize("name", ["gateway.yaml", "gateway.load.yaml", "gateway.gpu.yaml"])
def test_shipped_configs_pass_check_config(
    name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEWAY_JWT_SECRET", "x" * 40)  # the GPU config requires it
    assert main(["check-config", str(ROOT / "config" / name)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.endswith("models)\n")


def test_a_yaml_mistake_is_one_line_naming_file_line_and_key(
    tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "cfg", server={"state_dir": ".state", "port": "eighty"})
    assert main(["check-config", "--config", str(config)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith(f"{config}:3: server.port: ")


def test_ab_report_without_redis_says_it_needs_redis_url(
    tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "cfg")
    assert main(["ab-report", "--config", str(config)]) == 2
    assert "redis_url" in _one_line_error(capsys.readouterr().err)


def test_ab_report_mistakes_are_one_line(tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path / "cfg", redis_url="redis://127.0.0.1:1/0")
    assert main(["ab-report", "--config", str(config), "--model", "nosuch"]) == 2
    assert "unknown model 'nosuch'" in _one_line_error(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_info:
        main(["ab-report", "--config", str(config), "--since", "3w"])
    assert exit_info.value.code == 2
    assert "invalid duration '3w'" in _one_line_error(capsys.readouterr().err)
    assert main(["ab-report", "--config", str(config)]) == 1  # nothing listens on port 1
    assert "cannot read Redis" in _one_line_error(capsys.readouterr().err)


def test_a_missing_config_is_one_line(tmp_path: Path, cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--config", str(tmp_path / "nope.yaml"), "--sub", "a"]) == 2
    assert "nope.yaml: cannot read" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("args", [["--port", "99999"], ["--port", "http"], ["--workers", "0"]])
def test_serve_flags_out_of_range_are_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", *args])
    assert exit_info.value.code == 2
    assert "is not a whole number from" in _one_line_error(capsys.readouterr().err)
