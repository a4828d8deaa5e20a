"""Where the CVAT server and its credentials come from: environment variables or a 0600 config file.

Never from command-line values (they land in shell history and ``ps``). Precedence: environment, then
the config file (``--config``, else ``$CVAT_SYNC_CONFIG``, else ``~/.config/cvat_sync/config.yaml``).

Environment variables::

    CVAT_URL            https://cvat.example.org   (the server's base URL)
    CVAT_ACCESS_TOKEN   a Personal Access Token (CVAT >= 2.3x)     -> Authorization: Bearer <token>
    CVAT_TOKEN          a legacy API key from /api/auth/login      -> Authorization: Token <key>
    CVAT_USERNAME, CVAT_PASSWORD                                   -> logs in for a Token, else Basic
    CVAT_ORG            organization slug (X-Organization)
    CVAT_CA_BUNDLE      a CA bundle file for a private certificate authority

Config file (YAML, readable by its owner only: ``chmod 600``)::

    url: https://cvat.example.org
    access_token: ...          # or: token: ... / username: ... + password: ...
    org: my-lab                # optional
    ca_bundle: /etc/ssl/my-ca.pem
    out: data/cvat             # where pulled datasets go
    jobs: completed            # completed | accepted | all
    max_export_size: 8G        # --via export: refuse exports that would extract to more (bytes, or K/M/G/T)
    max_export_ratio: 200      # --via export: refuse exports compressed more than this (zip bombs)
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_CONFIG = Path("~/.config/cvat_sync/config.yaml")
JOB_FILTERS = ("completed", "accepted", "all")
# --via export limits (zip bombs): total uncompressed size, and uncompressed/compressed ratio. A real CVAT export
# is frames (JPEG/PNG: ratio ~1) plus annotations (JSON/XML: ~5-30), so 200 leaves a wide margin; 8 GiB is
# tens of thousands of typical slide frames.
DEFAULT_MAX_EXPORT_BYTES = 8 << 30
DEFAULT_MAX_EXPORT_RATIO = 200.0
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_size(value: object, what: str = "size") -> int:
    """Bytes from ``123``, ``"500M"``, ``"8G"``, ``"1.5GiB"`` (binary units); ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size like 8G or 500M, not {value!r}")
    if isinstance(value, int):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).upper() not in _UNITS:
            raise ConfigError(f"{what} must be a size like 8G or 500M, not {value!r}")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what} must be more than 0 bytes, not {value!r}")
    return size


def parse_ratio(value: object, what: str = "ratio") -> float:
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number like 200, not {value!r}") from None
    if isinstance(value, bool) or not ratio >= 1.0 or ratio == float("inf"):
        raise ConfigError(f"{what} must be a number >= 1 like 200, not {value!r}")
    return ratio


class ConfigError(ValueError):
    """The connection settings are missing or unsafe; the message says what to set."""


class Secret:
    """A credential that never shows itself in logs, reprs or exception texts."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass
class Settings:
    url: str
    access_token: Secret | None = None
    token: Secret | None = None
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    org: str | None = None
    ca_bundle: str | None = None
    insecure: bool = False
    out: Path = Path("data/cvat")
    jobs: str = "completed"
    max_export_bytes: int = DEFAULT_MAX_EXPORT_BYTES
    max_export_ratio: float = DEFAULT_MAX_EXPORT_RATIO
    source: str = "environment"

    @property
    def auth_kind(self) -> str:
        if self.access_token:
            return "access token (Bearer)"
        if self.token:
            return "API token"
        if self.username and self.password:
            return f"user {self.username}"
        return "none"


def check_url(url: str) -> str:
    """A normalised http(s) base URL without credentials, path or query; ConfigError otherwise."""
    url = (url or "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"CVAT URL {url!r} is not an http(s) URL; set CVAT_URL like https://cvat.example.org")
    if parts.username or parts.password:
        raise ConfigError("the CVAT URL must not contain credentials; set CVAT_USERNAME/CVAT_PASSWORD or "
                          "CVAT_ACCESS_TOKEN instead")
    if parts.query or parts.fragment:
        raise ConfigError(f"the CVAT URL must not have a query or fragment: {parts.scheme}://{parts.netloc}")
    path = parts.path.rstrip("/")
    if path.endswith("/api"):
        path = path[:-4]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _read_config_file(path: Path) -> dict[str, Any]:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} holds credentials but is readable by others (mode {stat.S_IMODE(mode):o}); "
                          f"run: chmod 600 {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # never the message itself: it quotes the file (secrets)
        where = f" near line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a YAML mapping (url: ..., access_token: ...)")
    known = {"url", "access_token", "token", "username", "password", "org", "ca_bundle", "insecure", "out", "jobs",
             "max_export_size", "max_export_ratio"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    return data


def load_settings(config: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Settings from the environment and the config file (environment wins)."""
    env = dict(os.environ if env is None else env)
    path = config or (Path(env["CVAT_SYNC_CONFIG"]) if env.get("CVAT_SYNC_CONFIG") else None)
    explicit = path is not None
    path = (path or DEFAULT_CONFIG).expanduser()
    data: dict[str, Any] = {}
    if path.is_file():
        data = _read_config_file(path)
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")

    def pick(env_key: str, key: str) -> Any:
        value = env.get(env_key)
        return value if value not in (None, "") else data.get(key)

    url = pick("CVAT_URL", "url")
    if not url:
        raise ConfigError(f"no CVAT server: set CVAT_URL (e.g. export CVAT_URL=https://cvat.example.org) or 'url' "
                          f"in {path}")
    jobs = str(data.get("jobs", "completed"))
    if jobs not in JOB_FILTERS:
        raise ConfigError(f"{path}: jobs must be one of {JOB_FILTERS}, not {jobs!r}")

    def secret(env_key: str, key: str) -> Secret | None:
        value = pick(env_key, key)
        return Secret(str(value)) if value else None

    return Settings(
        url=check_url(str(url)),
        access_token=secret("CVAT_ACCESS_TOKEN", "access_token"),
        token=secret("CVAT_TOKEN", "token"),
        username=pick("CVAT_USERNAME", "username"),
        password=secret("CVAT_PASSWORD", "password"),
        org=pick("CVAT_ORG", "org"),
        ca_bundle=pick("CVAT_CA_BUNDLE", "ca_bundle"),
        insecure=bool(data.get("insecure", False)),
        out=Path(data.get("out", "data/cvat")),
        jobs=jobs,
        max_export_bytes=parse_size(data.get("max_export_size", DEFAULT_MAX_EXPORT_BYTES),
                                    f"{path}: max_export_size"),
        max_export_ratio=parse_ratio(data.get("max_export_ratio", DEFAULT_MAX_EXPORT_RATIO),
                                     f"{path}: max_export_ratio"),
        source=f"environment + {path}" if data else "environment",
    )
