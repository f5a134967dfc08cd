"""Configuration: conf/stella.toml, overlaid by $STELLA_CONFIG, then STELLA_* and PORT.

Everything is decoded into msgspec structs, so a wrong key or type stops
start-up with one line that names it. Secrets never live in TOML: a backend
names the environment variable that holds its key (`api_key_env`).
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from base64 import b64encode
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec
from msgspec import Meta

from stella.backends import ConfigError, check_finite, effective_config, registry
from stella.logs import is_secret_field, name_words


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: unknown keys are errors."""


# Ranges: a negative timeout or limit would be accepted and then do something odd.
# A count's largest: 2**53, the largest whole number a float holds exactly (buckets are
# floats, in this process and in Redis's Lua), so a limit is shown as it was written.
MAX_COUNT = 2**53
Count = Annotated[int, Meta(ge=0, le=MAX_COUNT)]  # 0: none / unlimited, where the key says so
Seconds = Annotated[float, Meta(ge=0)]
Positive = Annotated[float, Meta(gt=0)]
# Money: a price in USD per million tokens, a budget in USD per day. Counted in whole
# nano-dollars (stella.cost): a budget's largest keeps a day's count of them exact
# where Redis's Lua writes it back (14 significant digits) to a thousandth of a cent.
MAX_PRICE = 100_000.0
MAX_BUDGET = 1_000_000.0
UsdPerMillion = Annotated[float, Meta(ge=0, le=MAX_PRICE)]
UsdPerDay = Annotated[float, Meta(ge=0, le=MAX_BUDGET)]  # 0: no budget


class ServerSettings(Section):
    """[server]"""

    host: str = "127.0.0.1"
    port: int = 8000
    # 8 MiB: a long agent session (Claude Code on a 1M-token context model) sends its whole
    # history, system prompt and tools in each request, past 1 MiB.
    max_body_bytes: Annotated[int, Meta(ge=1)] = 8 * 1024 * 1024
    drain_timeout_s: Seconds = 25.0
    workers: Annotated[int, Meta(ge=1)] = 1
    public_url: str = ""
    # Host names (besides loopback ones and public_url's) under which a key-less
    # loopback server trusts its callers (see stella.auth).
    allowed_hosts: list[str] = []
    # Under load, one socket write per connection per loop turn (stella.transport).
    coalesce_writes: bool = True


# A route's name or alias as a URL path names it (DELETE /api/v1/models/{name}): parts
# split by "/", none empty or only dots. HTTP clients drop "." and ".." segments and
# some merge "//", so a name such as "a/../b", "." or "x//y" could not be named there.
_NAME_PART = r"\.*[A-Za-z0-9_:-][A-Za-z0-9._:-]*"  # one way to match: no backtracking
# The runtime routes' names add a character set to the rule. "(?!\n)$": Python's "$" also
# matches before a final newline ("x7\n" passed); "\Z" would say it, but the pattern is
# also the OpenAPI document's, where "\Z" means nothing.
ROUTE_NAME_PATTERN = rf"^{_NAME_PART}(?:/{_NAME_PART})*(?!\n)$"
ROUTE_NAME_RULE = "parts split by '/', none empty or only dots, as a URL path names them"


# A route's upstream model: sent in every upstream request and shown by every model list
# (and, for runtime routes, read by every replica), so bounded as a request's `model` is
# (core.MAX_MODEL_NAME), and free of control characters, which no engine's names hold.
MAX_UPSTREAM_MODEL = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def upstream_model_problem(name: str) -> str:
    """Why `name` can't be a route's upstream model ("" when it can)."""
    if len(name) > MAX_UPSTREAM_MODEL:
        return f"over {MAX_UPSTREAM_MODEL} characters"
    control = _CONTROL.search(name)
    if control:
        return f"holds a control character ({control.group()!r} at {control.start()})"
    return ""


def addressable(name: str) -> bool:
    """Whether a URL path can name this route name or alias (see ROUTE_NAME_RULE)."""
    return all(part.strip(".") for part in name.split("/"))


class Price(Section):
    """[models.routes.NAME] price: what the route's upstream charges, in USD per million
    tokens (the prompt's, the answer's, and the prompt's tokens read from its cache)."""

    input: UsdPerMillion = 0.0
    output: UsdPerMillion = 0.0
    # Absent: cached prompt tokens cost `input`, as any prompt token.
    cached_input: UsdPerMillion | None = None


class RouteSettings(Section):
    """[models.routes.NAME]: how one model name reaches a backend."""

    backend: str
    upstream_model: str = ""
    aliases: list[str] = []
    fallbacks: list[str] = []
    # More backends serving the same upstream model: a call goes to the least busy of
    # these and `backend` (see routing.Router.pick), the others follow it in its chain.
    balance: list[str] = []
    # Timeouts: connect is the backend's; these bound the stream as the client sees it.
    ttft_timeout_s: Positive = 120.0
    # A non-stream call to an upstream that answers in one piece (OpenAI-compatible)
    # sends nothing before its whole answer: this bounds that wait per attempt
    # (0: ttft_timeout_s). Raise it for long non-stream generations.
    answer_timeout_s: Seconds = 0.0
    idle_timeout_s: Positive = 60.0
    total_timeout_s: Positive = 600.0
    retries: Count = 2
    retry_backoff_s: Seconds = 0.25
    retry_max_backoff_s: Seconds = 4.0
    # What a call served here costs (None: unpriced, no cost_usd; see stella.cost).
    price: Price | None = None


class ModelsSettings(Section):
    """[models]"""

    default: str = "smollm2-135m"
    routes: dict[str, RouteSettings] = {}
    # `provider/model` selects backend `provider` with upstream model `model`, when allowed.
    allow_direct: bool = False


class StreamSettings(Section):
    """[stream]"""

    ping_interval_s: Positive = 15.0


class BreakerSettings(Section):
    """[breaker]: per backend circuit breaker."""

    failure_threshold: Count = 5  # 0: never opens
    cooldown_s: Seconds = 30.0


class KeySettings(Section):
    """[auth.keys.NAME]: one API key, stored as its SHA-256 hex digest."""

    sha256: str
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    admin: bool = False
    requests_per_minute: Count = 0
    tokens_per_minute: Count = 0
    max_concurrent: Count = 0
    requests_per_day: Count = 0
    tokens_per_day: Count = 0
    usd_per_day: UsdPerDay = 0.0


# What a `*_env` key (api_key_env, keys_env) holds: a variable's name, as a shell sets it.
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def pasted_secret(key: str, value: Any) -> bool:
    """Whether `value`, under a key that names an environment variable (`api_key_env`,
    `keys_env`), is no variable's name: likely the secret itself, pasted in its place."""
    return (
        key.lower().endswith("_env")
        and isinstance(value, str)
        and bool(value)
        and not VARIABLE_NAME.fullmatch(value)
    )


class AuthSettings(Section):
    """[auth]"""

    allow_anonymous: bool = False
    keys: dict[str, KeySettings] = {}
    # Name of the env var with comma-separated plain keys (quick starts); all admin.
    keys_env: str = "STELLA_API_KEYS"


class ModelLimits(Section):
    """[limits.models.ROUTE]: limits of one model, across every key."""

    requests_per_minute: Count = 0
    tokens_per_minute: Count = 0
    requests_per_day: Count = 0
    tokens_per_day: Count = 0
    usd_per_day: UsdPerDay = 0.0


class LimitsSettings(Section):
    """[limits]: defaults for every key, and per-model limits."""

    requests_per_minute: Count = 0
    tokens_per_minute: Count = 0
    max_concurrent: Count = 0
    # Daily quotas: a fixed window, the UTC day (see stella.limits).
    requests_per_day: Count = 0
    tokens_per_day: Count = 0
    # A daily budget in USD, what priced routes cost (see stella.cost).
    usd_per_day: UsdPerDay = 0.0
    queue_timeout_s: Seconds = 10.0
    # Tokens reserved for a request that gives no max_tokens.
    reserve_tokens: Annotated[int, Meta(ge=1)] = 256
    models: dict[str, ModelLimits] = {}
    # Concurrent requests per backend name (0 or absent: unlimited); waits like per-key slots.
    backends: dict[str, Count] = {}


class StateSettings(Section):
    """[state]"""

    redis_url: str = ""
    prefix: str = "stella"


# An origin as a browser sends it in `Origin`: scheme://host[:port], nothing after it.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://(?:[a-z0-9_~.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?")
ORIGIN_RULE = (
    "scheme://host[:port] as a browser sends it, no path or query "
    "(https://app.example.com, http://localhost:5173), or '*' for any"
)


# Browsers leave a scheme's default port out of `Origin` (https://a.example, never
# https://a.example:443).
_DEFAULT_PORTS = {"https": ":443", "http": ":80"}


def origin(configured: str) -> str:
    """A configured origin as browsers send it in `Origin`: no trailing slash, lower case,
    no default port (CORS and the keyless Origin guard compare it so)."""
    text = configured.strip().rstrip("/").lower()
    port = _DEFAULT_PORTS.get(text.partition("://")[0])
    if port and text.endswith(port):
        return text[: -len(port)]
    return text


def is_origin(entry: str) -> bool:
    """Whether a `cors.allowed_origins` entry, read as `origin` reads it, can equal a
    browser's Origin."""
    m = _ORIGIN.fullmatch(origin(entry))
    return m is not None and int(m.group(1) or 0) < 65536


class CorsSettings(Section):
    """[cors]"""

    allowed_origins: list[str] = []
    max_age_s: Count = 600


class LogSettings(Section):
    """[log]"""

    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    audit_path: str = ""
    content: bool = False


class MetricsSettings(Section):
    """[metrics]"""

    enabled: bool = True


class Settings(Section):
    """The whole configuration."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    models: ModelsSettings = msgspec.field(default_factory=ModelsSettings)
    backends: dict[str, dict[str, Any]] = {}
    stream: StreamSettings = msgspec.field(default_factory=StreamSettings)
    breaker: BreakerSettings = msgspec.field(default_factory=BreakerSettings)
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    state: StateSettings = msgspec.field(default_factory=StateSettings)
    cors: CorsSettings = msgspec.field(default_factory=CorsSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)


def default_config_path() -> Path:
    """conf/stella.toml of a checkout, or the copy shipped inside the wheel."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "conf" / "stella.toml"
    return checkout if checkout.is_file() else here / "conf" / "stella.toml"


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base`: tables merge, other values replace."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        # utf-8-sig: a byte-order mark, as some Windows editors write, is not TOML.
        return tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a directory") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _env_value(raw: str) -> Any:
    """A TOML array, table, quoted string or boolean when it is one, else the string.

    Numbers stay strings: decoding turns "9000" into an int where the key is one, and a
    string key keeps "123" (a prefix, a model name) as written.
    """
    if raw in ("true", "false") or raw[:1] in ("[", "{", '"', "'"):
        try:
            return tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return raw


def _env_path(name: str) -> tuple[str, ...] | None:
    """The key a STELLA_SECTION__KEY variable sets, as its lower-case parts (None: the
    variable sets none)."""
    if name.startswith("STELLA_") and "__" in name:
        return tuple(p.lower() for p in name[len("STELLA_") :].split("__"))
    return None


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """STELLA_SECTION__KEY=value (and PORT) as a nested dict.

    A table given whole (STELLA_BACKENDS__ECHO={kind="echo"}) and keys under it
    (STELLA_BACKENDS__ECHO__REPLY=hi) deep-merge, the more specific keys on top, whatever
    order the environment lists them in; two variables for one key, or a key under a
    value that is not a table, are refused.
    """
    out: dict[str, Any] = {}
    found = []
    for name in environ:
        if (path := _env_path(name)) is not None:
            found.append((path, name))
    # Shorter paths first: a table, then what goes into it (the environment's own order
    # would decide otherwise which of the two is lost).
    found.sort(key=lambda item: (len(item[0]), item))
    setters: dict[tuple[str, ...], str] = {}
    for path, name in found:
        node = out
        for depth, part in enumerate(path[:-1], 1):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                other = setters.get(path[:depth], "another STELLA_ variable")
                raise ConfigError(f"{name}: conflicts with {other} (not a table)")
        if path in setters:  # the same key in other capitals
            raise ConfigError(f"{name}: conflicts with {setters[path]} (the same key)")
        setters[path] = name
        value = _env_value(environ[name])
        last = path[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            value = merge(node[last], value)  # a table within one given whole: both, merged
        node[last] = value
    if port := environ.get("PORT"):
        out.setdefault("server", {})["port"] = _env_value(port)
    return out


def _under_values(environ: Mapping[str, str], files: Mapping[str, Any]) -> None:
    """Refuse a variable that sets a key under a file's value that is not a table (as
    env_overrides refuses one under another variable's), naming the variable: decoding
    would blame the file's key alone, as a type error about an object no one wrote."""
    paths = {name: path for name in environ if (path := _env_path(name)) is not None}
    whole = set(paths.values())
    for name, parts in paths.items():
        node: Any = files
        for depth, part in enumerate(parts[:-1], 1):
            node = node.get(part) if isinstance(node, Mapping) else None
            if node is None:
                break  # no file has this table: the variables make it
            if not isinstance(node, Mapping):
                if parts[:depth] in whole:
                    break  # a variable gives it whole, replacing the file's value
                key = ".".join(parts[:depth])
                raise ConfigError(f"{name}: {key} is not a table (a file sets it to a value)")


def set_by_user(key: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether $STELLA_CONFIG or the environment sets `key` (dotted), beyond the defaults,
    as the last load_settings() read them (a config given as a pipe is read once)."""
    environ = os.environ if environ is None else environ
    extra = environ.get("STELLA_CONFIG", "")
    user = (
        _last_user_file if extra == _last_user_path else (_read_toml(Path(extra)) if extra else {})
    )
    return _lookup(merge(user, env_overrides(environ)), key) is not None


def setting_variable(key: str, overrides: Mapping[str, Any] | None = None) -> str | None:
    """The environment variable whose value `key` (dotted) has, when one sets it and no
    flag in `overrides` replaces it (PORT before STELLA_SERVER__PORT)."""
    return _blamed_variable(f"{key}: ", os.environ, overrides or {}, _last_files)


def env_over_file(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, list[str]]]:
    """$STELLA_CONFIG's path, and the environment variables that replace values that file
    sets, each with the keys it replaces (the environment wins, and a file's value lost
    to one is easily missed: an image's ENV, a platform's variables). Read as the last
    load_settings() read the file; the shipped defaults are not asked about, nor keys
    `overrides` (command-line flags) replace in turn."""
    environ = os.environ if environ is None else environ
    extra = environ.get("STELLA_CONFIG", "")
    if not extra:
        return "", {}
    user = _last_user_file if extra == _last_user_path else _read_toml(Path(extra))
    found: dict[str, list[str]] = {}
    for name, raw in environ.items():
        if name == "PORT":
            if not raw:
                continue  # an empty PORT is not read (env_overrides)
            path: tuple[str, ...] | None = ("server", "port")
        else:
            path = _env_path(name)
        if path is None:
            continue
        if path == ("server", "port") and name != "PORT" and environ.get("PORT"):
            continue  # PORT wins over it: it replaces nothing
        # A table given whole replaces only the keys it gives: those the file sets too.
        keys = [
            k
            for k in _leaves(_env_value(raw), path)
            if _lookup(user, k) is not None and _lookup(overrides or {}, k) is None
        ]
        if keys:
            found[name] = keys
    return extra, dict(sorted(found.items()))


def _leaves(value: Any, path: tuple[str, ...]) -> Iterator[str]:
    """The dotted keys a value at `path` sets (a table: each of its keys, however deep)."""
    if isinstance(value, Mapping) and value:
        for key, inner in value.items():
            yield from _leaves(inner, (*path, str(key)))
    else:
        yield ".".join(path)


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> Settings:
    """Defaults, then $STELLA_CONFIG, then the environment, then `overrides`."""
    global _last_files, _last_user_file, _last_user_path
    environ = os.environ if environ is None else environ
    files = _read_toml(path or default_config_path())
    user: dict[str, Any] = {}
    if extra := environ.get("STELLA_CONFIG"):
        user = _read_toml(Path(extra))
        files = merge(files, user)
    _last_files, _last_user_file, _last_user_path = files, user, extra or ""
    env = env_overrides(environ)
    _under_values(environ, files)
    data = merge(files, env)
    if overrides:
        data = merge(data, overrides)
    try:
        return decode_settings(data)
    except ConfigError as exc:
        raise blamed(exc, overrides, environ, files) from None


# What the last load_settings() read from the files (all of them, and $STELLA_CONFIG's
# alone): a later blamed() or set_by_user() reads it rather than open the files again.
_last_files: dict[str, Any] = {}
_last_user_file: dict[str, Any] = {}
_last_user_path = ""


def blamed(
    exc: ConfigError,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    files: Mapping[str, Any] | None = None,
) -> ConfigError:
    """`exc`, naming the environment variable that set the bad key when one did (also for
    errors found after decoding: a backend's table, a key's digest)."""
    environ = os.environ if environ is None else environ
    if files is None:
        files = _last_files
    variable = _blamed_variable(str(exc), environ, overrides or {}, files)
    if variable is None:
        return exc
    # The variable and its value too: a shell or a platform set it, not a file. Masked
    # as /config masks it: a header by its name, a key of stella's own that holds no
    # secret not at all (STELLA_LIMITS__TOKENS_PER_MINUTE=abc), anything else by its key.
    parts = variable.lower().split("__")
    value = environ[variable]
    text = value.lstrip()
    try:
        data = merge(files, env_overrides(environ))
    except ConfigError:  # variables that contradict each other: the files tell what they can
        data = dict(files)
    if variable in _secret_variables(data):
        shown = "***"  # the config names it as a key's holder: a secret whatever it sets
    elif pasted_secret(parts[-1], value):
        shown = "***"  # a key where its variable's name goes; a name is shown (below)
    elif text.startswith("{") or (text.startswith("[") and "{" in text) or parts[-1] == "headers":
        shown = "(not shown)"  # a table, or what should be one: its secrets are inside it
    elif len(parts) > 2 and parts[-2] == "headers":
        shown = "***" if value and _is_secret_name(parts[-1]) else value
    elif _plain_field(("server", "port") if variable == "PORT" else _env_path(variable) or ()):
        # A URL may carry a password, under any key (an origin with a user in it).
        shown = _redact_url(value) if parts[-1].endswith("url") or "://" in value else value
        if len(shown) > MAX_SHOWN_VALUE:
            shown = shown[:MAX_SHOWN_VALUE] + "…"
        if not shown.isprintable():
            shown = ascii(shown)  # a control character would garble the terminal's line
    else:
        shown = _redact(value, (parts[-1],))
    return ConfigError(f"{variable}={shown}: {exc}")


# The most of a bad value an error line quotes.
MAX_SHOWN_VALUE = 60


def _secret_variables(data: Mapping[str, Any]) -> set[str]:
    """The environment variables the configuration names as holding keys (auth.keys_env,
    each backend's api_key_env), as far as `data` can be read."""
    auth = data.get("auth")
    keys_env = auth.get("keys_env") if isinstance(auth, Mapping) else None
    out = {keys_env if isinstance(keys_env, str) else AuthSettings().keys_env}
    backends = data.get("backends")
    for table in backends.values() if isinstance(backends, Mapping) else ():
        if isinstance(table, Mapping) and isinstance(table.get("api_key_env"), str):
            out.add(table["api_key_env"])
    return out


def _plain_field(parts: tuple[str, ...]) -> bool:
    """Whether a key is a field of stella's own settings that holds no secret (a number,
    a name, a flag; not an API key's digest, nor anything in a backend's table, which its
    kind decodes and which may name a credential)."""
    type_: Any = Settings
    i = 0
    if not parts:
        return False
    while i < len(parts):
        if not (isinstance(type_, type) and issubclass(type_, msgspec.Struct)):
            return False
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(type_)}
        if parts[i] not in fields:
            return False  # an unknown key: what it holds is not known
        type_ = fields[parts[i]]
        i += 1
        if typing.get_origin(type_) is dict:  # named entries: the next part is a name
            type_ = typing.get_args(type_)[1]
            i += 1
        while typing.get_origin(type_) is Annotated:
            type_ = typing.get_args(type_)[0]
    if i > len(parts):
        return False  # a whole table of entries
    return parts[-1] != "sha256" and not (
        isinstance(type_, type) and issubclass(type_, msgspec.Struct)
    )


def _blamed_variable(
    message: str,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any],
    files: Mapping[str, Any],
) -> str | None:
    """The environment variable that set the key an error names, when one did (and no
    command-line flag replaced it, and no file holds the table it is in)."""
    key, _, reason = message.partition(": ")
    if reason.startswith("required"):  # a field missing, named by itself: its table's error
        key = key.rpartition(".")[0] or key
    # An unknown field is blamed on the variable that names it, not on any variable
    # that set something else in the same table (a variable's names are lower case: a
    # file's `Host` is not STELLA_SERVER__HOST's). Any other error about a table (a
    # field missing) is blamed on the one variable under it, when no file has the table.
    unknown = _UNKNOWN_FIELD.search(message)
    field = f"{key}.{unknown.group(1)}" if unknown else None
    # An error about a table no file has is the doing of the variables that made it; in
    # a table a file has, only of a variable whose value the error quotes (an alias
    # taken), not of one that set something else there (a field missing is the file's).
    file_table = _lookup(files, key) is not None
    found = []
    for name in environ:
        if name == "PORT":
            if not environ[name]:
                continue  # an empty PORT is not read (env_overrides)
            path = "server.port"
        elif (parts := _env_path(name)) is not None:
            path = ".".join(parts)
        else:
            continue
        # The key itself, a value inside it (a table, an array), or an entry under a
        # table that the error names.
        under = path.startswith(key + ".") and (
            not file_table or (path.endswith(".aliases") and _quoted(message, environ[name]))
        )
        # An unknown field is the variable's that set it, or a key inside it.
        named = field is not None and (path == field or path.startswith(field + "."))
        if path == key or key.startswith(path + ".") or (named if unknown else under):
            found.append((name, path))
    if any(name == "PORT" for name, _ in found):  # PORT wins over STELLA_SERVER__PORT
        found = [(n, p) for n, p in found if n != "STELLA_SERVER__PORT"]
    if len(found) != 1 or _lookup(overrides, found[0][1]) is not None:
        return None
    return found[0][0]


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")


def _quoted(message: str, raw: str) -> bool:
    """Whether the name `message` quotes first (the alias in "'x' is already an alias of
    'y'") is one a variable's value holds."""
    first = re.search(r"'([^']*)'", message)
    value = _env_value(raw)
    items = value if isinstance(value, list) else [value]
    return first is not None and first.group(1) in items


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of nested tables, or None."""
    node: Any = data
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def decode_settings(data: Mapping[str, Any]) -> Settings:
    """Validate a config dict; ConfigError names the first bad key."""
    log = data.get("log")
    if isinstance(log, dict) and isinstance(log.get("level"), str):
        data = {**data, "log": {**log, "level": log["level"].lower()}}  # INFO as info
    # Tables of named entries first, one by one: msgspec says `backends[...]` for an
    # entry of a dict, and with several keys, routes or backends the name is what tells
    # them apart.
    for path, entry in _NAMED:
        entries: Any = data
        for part in path:
            entries = entries.get(part, {}) if isinstance(entries, dict) else {}
        if isinstance(entries, dict):
            for name, value in entries.items():
                _convert(value, entry, ".".join((*path, name)))
    sections = [f.encode_name for f in msgspec.structs.fields(Settings)]
    for name in data:
        # Named by itself (msgspec says "config: ... unknown field"), so that the variable
        # that made it is named too.
        if name not in sections:
            raise ConfigError(f"{name}: unknown section; known: {', '.join(sections)}")
    settings = _convert(_enabled_flags(data), Settings, "")
    _check(settings)
    return settings


_NAMED: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("auth", "keys"), KeySettings),
    (("models", "routes"), RouteSettings),
    (("limits", "models"), ModelLimits),
    (("limits", "backends"), Count),
    (("backends",), dict[str, Any]),
)


def _enabled_flags(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """`backends.NAME.enabled` decoded as a boolean (from the environment "false" or "0",
    as every boolean key takes them): a backend table is otherwise kept as written for its
    kind to decode, and a string there would leave the backend on."""
    backends = data.get("backends")
    if not isinstance(backends, dict):
        return data
    out = {}
    for name, table in backends.items():
        if "enabled" in table:
            flag = _convert(table["enabled"], bool, f"backends.{name}.enabled")
            table = {**table, "enabled": flag}
        out[name] = table
    return {**data, "backends": out}


def _convert(value: Any, type_: type[Any], where: str) -> Any:
    try:
        out = msgspec.convert(value, type_, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, sep, path = text.rpartition(" - at `$")
        path = path.rstrip("`").lstrip(".") if sep else ""
        key = ".".join(p for p in (where, path) if p) or "config"
        raise ConfigError(f"{key}: {message if sep else text}") from None
    check_finite(out, where)
    return out


def serves(rs: RouteSettings, backends: Collection[str]) -> bool:
    """Whether `backends` can serve a route: its own backend or one in its `balance`."""
    return rs.backend in backends or any(b in backends for b in rs.balance)


def enabled_backends(s: Settings) -> dict[str, dict[str, Any]]:
    """Backend tables without `enabled = false` (the key itself removed)."""
    return {
        name: {k: v for k, v in table.items() if k != "enabled"}
        for name, table in s.backends.items()
        if table.get("enabled", True)
    }


def _check(s: Settings) -> None:
    host = s.server.host
    if host.startswith("[") and host.endswith("]"):
        s.server.host = host[1:-1]  # an IPv6 address as a URL writes it: the address
    if not s.server.host.strip():
        # uvicorn would listen on every interface ("" is INADDR_ANY) and say so nowhere.
        raise ConfigError(
            "server.host: empty; give the address to listen on (127.0.0.1, or 0.0.0.0 for all)"
        )
    if not 0 < s.server.port < 65536:
        raise ConfigError(f"server.port: {s.server.port} is not a TCP port")
    if s.server.max_body_bytes <= 0:
        raise ConfigError("server.max_body_bytes: must be positive")
    if s.server.workers < 1:
        raise ConfigError("server.workers: must be at least 1")
    url = s.server.public_url
    if url and (not url.startswith(("http://", "https://")) or " " in url):
        # Redacted as redis_url is: a URL may carry a password.
        raise ConfigError(f"server.public_url: {_redact_url(url)!r} is not an http(s) URL")
    for host in s.server.allowed_hosts:
        if not host.strip() or any(c in host for c in "/@ ") or not host.isprintable():
            raise ConfigError(f"server.allowed_hosts: {host!r} is not a host name")
    for entry in s.cors.allowed_origins:
        # "app.example.com" or a path would pass into the CORS list and match no Origin.
        if entry != "*" and not is_origin(entry):
            raise ConfigError(
                f"cors.allowed_origins: {_redact_url(entry)!r} is not an origin: {ORIGIN_RULE}"
            )
    redis = s.state.redis_url
    if pasted_secret("keys_env", s.auth.keys_env):
        # Not shown (blamed() masks it too): likely a key, which /config would show.
        raise ConfigError(
            "auth.keys_env: not an environment variable name (letters, digits, _): name "
            "the variable that holds the keys, not a key"
        )
    if redis and not redis.startswith(("redis://", "rediss://", "unix://")):
        shown = repr(_redact_url(redis))
        raise ConfigError(f"state.redis_url: {shown} is not a redis://, rediss:// or unix:// URL")
    for name in s.limits.models:
        # Limits hold per route name: one set under an alias would never apply. (A name
        # no configured route has may be a runtime route's: the app warns at start-up.)
        owner = next((r for r, rs in s.models.routes.items() if name in rs.aliases), None)
        if owner is not None and name not in s.models.routes:
            raise ConfigError(f"limits.models.{name}: an alias of {owner!r}; name the route")
    for name in s.limits.backends:
        if name not in s.backends:
            raise ConfigError(
                f"limits.backends.{name}: unknown backend; known: {sorted(s.backends)}"
            )
    for name, route in s.models.routes.items():
        # The admin routes name a route by its name or an alias in the URL path.
        if not addressable(name):
            raise ConfigError(
                f"models.routes.{name}: {name!r} is not a route name: {ROUTE_NAME_RULE}"
            )
        for alias in route.aliases:
            if not addressable(alias):
                raise ConfigError(
                    f"models.routes.{name}.aliases: {alias!r} is not a route name: {ROUTE_NAME_RULE}"
                )
        problem = upstream_model_problem(route.upstream_model)
        if problem:
            raise ConfigError(f"models.routes.{name}.upstream_model: {problem}")
        if route.backend not in s.backends:
            raise ConfigError(
                f"models.routes.{name}.backend: unknown backend {route.backend!r}; "
                f"known: {sorted(s.backends)}"
            )
        for i, other in enumerate(route.balance):
            where = f"models.routes.{name}.balance[{i}]"
            if other not in s.backends:
                raise ConfigError(
                    f"{where}: unknown backend {other!r}; known: {sorted(s.backends)}"
                )
            if other == route.backend:
                raise ConfigError(f"{where}: {other!r} is the route's own backend")
            if other in route.balance[:i]:
                raise ConfigError(f"{where}: {other!r} is listed twice")
        for fb in route.fallbacks:
            if fb not in s.models.routes:
                raise ConfigError(f"models.routes.{name}.fallbacks: unknown route {fb!r}")
    live = enabled_backends(s)
    if not s.models.default:
        # A request without a model would have no route, and the router refuses "" as the
        # default at start-up: refused here, where `config --check` sees it too.
        usable = sorted(n for n, r in s.models.routes.items() if serves(r, live))
        raise ConfigError(
            f"models.default: empty; name the route a request without a model goes to; "
            f"known: {usable}"
        )
    # The default is what the router will resolve it to. Routes whose backends are all
    # disabled are left out of it, aliases and all: a name or alias a live route answers
    # to is served (one whose own backend is disabled by another in its `balance`).
    name, routes = s.models.default, s.models.routes
    served = [n for n, r in routes.items() if serves(r, live) and (n == name or name in r.aliases)]
    held = [n for n, r in routes.items() if n == name or name in r.aliases]
    if not served and held:
        holder = name if name in routes else held[0]
        shown = repr(name) if holder == name else f"{name!r} (an alias of {holder!r})"
        rs = routes[holder]
        also = f" (and its balance {rs.balance!r}, disabled too)" if rs.balance else ""
        raise ConfigError(
            f"models.default: route {shown} uses disabled backend {rs.backend!r}{also}"
        )
    if s.models.default not in s.models.routes:
        aliases = {a for r in s.models.routes.values() for a in r.aliases}
        if s.models.default not in aliases:
            usable = sorted(n for n, r in s.models.routes.items() if serves(r, live))
            raise ConfigError(
                f"models.default: {s.models.default!r} is not a route; known: {usable}"
            )


# A configured value (a backend's field, a static header, a URL's query parameter) is a
# credential when its name says so: Helicone-Auth, X-AuthKey, X-Api-Key, Cookie,
# X-Signature, CB-ACCESS-PASSPHRASE, passwd, credentials; `sha256` is an API key's digest.
SECRET_PARTS = (
    "auth",
    "key",
    "token",
    "secret",
    "pass",
    "pwd",
    "cookie",
    "sign",
    "credential",
    "sha256",
)
# Words of a name that contain one of those without naming a credential (Portkey's
# routing headers, x-portkey-provider, name a provider, not a key).
NOT_SECRET_WORDS = frozenset(
    {"bypass", "passthrough", "author", "authors", "portkey", "tokenizer", "tokenizers"}
)
# A header value only the broad rule finds is masked in every log line from this length
# on: a short word ("openai") masked everywhere would wreck the lines. /config masks it
# whatever its length; a field the log's own rule names (api_key, passwd) is always
# masked.
MIN_LOGGED_SECRET = 8
# Configured values that are not secrets whatever their header: masking them wherever
# they appear would hide ordinary text (`"stream":true` in every log line).
PLAIN_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "none", "null"})


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective configuration as a dict, every secret-looking value masked."""
    shown = msgspec.to_builtins(settings)
    # A backend's table is kept as written for its kind to decode: shown as its kind reads
    # it, with the defaults that apply (a base_url, the timeouts), then masked as the rest.
    kinds = registry()
    shown["backends"] = {
        name: effective_config(table, kinds) for name, table in settings.backends.items()
    }
    return _redact(shown)


def secret_values(settings: Settings) -> list[str]:
    """Credentials written in the configuration itself (a backend's auth header or any
    field named as one, a password in a URL), for the logs and error messages to mask."""
    out = []
    for name, table in settings.backends.items():
        for value in _secret_leaves(table, ("backends", name)):
            out.append(value)
            # "Bearer xyz": the token alone, wherever it appears without its scheme.
            out.append(value.rpartition(" ")[2])
        base_url = table.get("base_url")
        if isinstance(base_url, str):  # a user:password@ in it is sent as Basic auth
            out += _url_secrets(base_url)
            # An upstream's error may quote the Authorization header it refused.
            if token := basic_credential(base_url):
                out.append(token)
    out += _url_secrets(settings.state.redis_url)
    return [v for v in out if v.lower() not in PLAIN_VALUES and not v.isdigit()]


def _is_secret_name(name: str) -> bool:
    """Whether a header or parameter name names a credential (by its words, camelCase
    split: X-AuthKey, accessToken)."""
    return any(
        part in word
        for word in name_words(name)
        if word not in NOT_SECRET_WORDS
        for part in SECRET_PARTS
    )


# stella's own settings whose names hold a credential's word without naming one (the
# token limit's field name): shown, so that /config and `stella config` can be checked.
NOT_SECRET_FIELDS = frozenset({"max_tokens_param"})


def _names_secret(key: str) -> bool:
    """Whether a configured string under this key (a field's or a header's name) is a
    credential; `api_key_env`, `keys_env` name a variable, they are not the secret."""
    lowered = key.lower()
    return (
        not lowered.endswith("_env") and lowered not in NOT_SECRET_FIELDS and _is_secret_name(key)
    )


def _field_name(path: tuple[str, ...], key: str, value: Any) -> str:
    """The name the secret rule reads for `key` of the table at `path`: a backend's
    `models` table maps model names to sources, and a model's name says nothing of its
    source."""
    if len(path) == 3 and path[0] == "backends" and path[2] == "models":
        return "" if isinstance(value, str) else key
    return key


def _secret_leaves(node: Any, path: tuple[str, ...]) -> Iterator[str]:
    """The non-empty strings under `node` (at `path`) that _redact masks by their name,
    for the logs: a backend's headers by the header rule, its other fields by the log's
    own (stricter) field rule (`auth_scheme = "Bearer"` is no credential)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _secret_leaves(v, (*path, _field_name(path, k, v)))
    elif isinstance(node, list):
        for v in node:
            yield from _secret_leaves(v, path)
    elif isinstance(node, str) and node:
        key = path[-1]
        if not _names_secret(key):
            return
        if is_secret_field(key):
            yield node
        elif len(path) > 1 and path[-2] == "headers" and len(node) >= MIN_LOGGED_SECRET:
            # A header the broad rule finds (X-Signature, Helicone-Auth): a credential
            # often enough, and long enough not to be an ordinary word.
            yield node


def _redact(node: Any, path: tuple[str, ...] = ()) -> Any:
    # Only strings are masked: a table named `auth`, a number (`max_tokens`) or a boolean
    # under a secret-looking name is shown as it is.
    if isinstance(node, dict):
        return {k: _redact(v, (*path, _field_name(path, k, v))) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact(v, path) for v in node]
    key = path[-1] if path else ""
    if isinstance(node, str) and node and _names_secret(key):
        return "***"
    if pasted_secret(key, node):  # e.g. a disabled backend's, which nothing refused
        return "***"
    if isinstance(node, str) and ("://" in node or key.lower().endswith("url")):
        return _redact_url(node)
    return node


def basic_credential(url: str) -> str:
    """The Basic credential a URL's user and password are sent as ("" without them)."""
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return ""
    if user is None and password is None:
        return ""
    return b64encode(f"{unquote(user or '')}:{unquote(password or '')}".encode()).decode()


def _url_secrets(url: str) -> list[str]:
    """The password of a URL's user info and the values of its secret-looking query
    parameters (redis://:pw@host, redis://host/0?password=pw)."""
    try:
        parts = urlsplit(url)
        password = parts.password or ""
    except ValueError:
        return []
    out = [password, unquote(password)]  # as written, and as sent
    for name, value in parse_qsl(parts.query):
        if _is_secret_name(name):
            out.append(value)
    return [v for v in out if v]


def _redact_url(url: str) -> str:
    """redis://user:pass@host -> redis://***@host; a secret query value -> ***.

    A password may hold a raw `/`, `?` or `#`, and a path or a query an `@`: which `@`
    ends the user info cannot always be told, so everything before the last one goes
    (a URL with an `@` in its path or query shows less than it could, never a
    password), and secret-named parameters are masked wherever they are.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:  # first: a password may hold what looks like a parameter
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{_PARAM.sub(_mask_param, rest)}"


# A parameter, in a query or a fragment (one more `?` too): separator, name, value.
_PARAM = re.compile(r"([?&#])([^=&#?]*)=([^&#?]*)")


def _mask_param(m: re.Match[str]) -> str:
    sep, name, value = m.groups()
    return f"{sep}{name}=***" if value and _is_secret_name(unquote(name)) else m.group(0)
