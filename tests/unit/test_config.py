"""Settings: defaults < TOML file < environment < flags, generic over the settings dataclasses."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from blobstore.server.app import ServerConfig
from blobstore.server.backends import BackendConfig, S3Config
from blobstore.server.config import ConfigError, load_config, parse_assignments, settings
from blobstore.server.engine import EngineConfig


@dataclass
class Tls:
    cert: str | None = None
    required: bool = False


@dataclass
class Config:
    """Settings as other features may add them: optional text, literals, lists, a new section."""

    quota_bytes: int = 0
    public_url: str = ""
    mode: Literal["a", "b"] = "a"
    backends: list[str] = field(default_factory=list)
    tls: Tls = field(default_factory=Tls)


DOCS = Path(__file__).resolve().parents[2] / "docs"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "blobstore.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source() -> None:
    assert load_config(ServerConfig) == ServerConfig()


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    file = write(tmp_path, 'port = 1001\nhost = "file"\ndata_dir = "/from/file"\n[engine]\nchunk_size = 111\n')
    env = {"BLOBSTORE_PORT": "2002", "BLOBSTORE_HOST": "env", "BLOBSTORE_ENGINE_CHUNK_SIZE": "222"}
    config = load_config(ServerConfig, file=file, env=env, overrides={"port": 3003, "engine.chunk_size": "333"})
    assert config.port == 3003  # flag
    assert config.engine.chunk_size == 333  # --set text, read as TOML
    assert config.host == "env"  # environment over file
    assert config.data_dir == "/from/file"  # file over default
    assert config.engine.inline_threshold == EngineConfig().inline_threshold  # default
    assert config.log_format == "text"


def test_unset_flags_do_not_override(tmp_path: Path) -> None:
    config = load_config(ServerConfig, env={"BLOBSTORE_PORT": "2002"}, overrides={"port": None, "host": None})
    assert config.port == 2002
    assert config.host == ServerConfig().host


def test_text_is_read_by_the_type_of_the_setting() -> None:
    env = {
        "BLOBSTORE_SHUTDOWN_GRACE_S": "5",  # an int where a float is wanted
        "BLOBSTORE_DATA_DIR": "/srv/store 1",  # text as it is, no quotes
        "BLOBSTORE_LOG_FORMAT": "json",
        "BLOBSTORE_ADDRESS": "ignored:1",  # the client's variable is not a server setting
    }
    config = load_config(ServerConfig, env=env)
    assert config.shutdown_grace_s == 5.0 and isinstance(config.shutdown_grace_s, float)
    assert config.data_dir == "/srv/store 1"
    assert config.log_format == "json"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"env": {"BLOBSTORE_PORT": "fifty"}}, "$BLOBSTORE_PORT: 'fifty' is not a int"),
        ({"env": {"BLOBSTORE_PORT": "true"}}, "$BLOBSTORE_PORT: True is not a int"),
        ({"env": {"BLOBSTORE_LOG_FORMAT": "xml"}}, "'xml' is not a one of 'text', 'json'"),
        ({"overrides": {"engine.chunk_sise": "5"}}, "unknown setting 'engine.chunk_sise'"),
        ({"overrides": {"port": 1.5}}, "setting port: 1.5 is not a int"),
    ],
)
def test_bad_values_name_their_source(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ServerConfig, **kwargs)


def test_a_bad_file_names_the_file_and_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("unknown setting 'engine.nope'")):
        load_config(ServerConfig, file=write(tmp_path, "[engine]\nnope = 1\n"))
    with pytest.raises(ConfigError, match="reap_interval_s: 'soon' is not a float"):
        load_config(ServerConfig, file=write(tmp_path, 'reap_interval_s = "soon"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(ServerConfig, file=write(tmp_path, "port = \n"))


def test_parse_assignments() -> None:
    assert parse_assignments(["a=1", "engine.b = x=y"]) == {"a": "1", "engine.b": "x=y"}
    with pytest.raises(ConfigError):
        parse_assignments(["novalue"])


def test_new_fields_and_sections_need_no_code() -> None:
    env = {
        "BLOBSTORE_TLS_CERT": "/etc/cert.pem",
        "BLOBSTORE_BACKENDS": '["s3", "pg"]',
        "BLOBSTORE_TLS_REQUIRED": "true",
    }
    config = load_config(Config, env=env, overrides={"quota_bytes": "10", "mode": "b"})
    assert config == Config(10, "", "b", ["s3", "pg"], Tls("/etc/cert.pem", True))


def test_arrays_become_tuples_and_text_becomes_bytes(tmp_path: Path) -> None:
    file = write(tmp_path, 'url_signing_secrets = ["new secret", "old secret"]\n')
    config = load_config(ServerConfig, file=file)
    assert config.url_signing_secrets == (b"new secret", b"old secret")
    env = {"BLOBSTORE_URL_SIGNING_SECRETS": '["only"]'}
    assert load_config(ServerConfig, env=env).url_signing_secrets == (b"only",)
    with pytest.raises(ConfigError, match="url_signing_secrets"):
        load_config(ServerConfig, file=write(tmp_path, "url_signing_secrets = [1, 2]\n"))


def test_the_sample_file_holds_every_setting_at_its_default() -> None:
    sample = DOCS / "blobstore.sample.toml"
    assert load_config(ServerConfig, file=str(sample)) == ServerConfig()
    text = sample.read_text()
    documented = (DOCS / "configuration.md").read_text()
    for setting in settings(ServerConfig):
        assert f"`{setting.name}`" in documented, f"{setting.name} is missing from docs/configuration.md"
        # A setting whose default TOML cannot write (None) stands commented out.
        commented = "# " if setting.default is None else ""
        assert f"\n{commented}{setting.path[-1]} = " in text, f"{setting.name} is missing from the sample file"


def test_the_s3_chunk_size_is_a_setting_within_bounds() -> None:
    config = load_config(ServerConfig, env={"BLOBSTORE_S3_CHUNK_SIZE": str(4 << 20)})
    assert config.s3.chunk_size == 4 << 20
    BackendConfig(chunk_store="s3", s3=config.s3).validate()
    for size in (64 << 10, 128 << 20):
        with pytest.raises(ValueError, match=r"s3\.chunk_size must be between"):
            BackendConfig(chunk_store="s3", s3=S3Config(bucket="b", chunk_size=size)).validate()
