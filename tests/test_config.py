"""Config: defaults, YAML, environment precedence, name resolution and the one-line errors."""

from __future__ import annotations

import os

import pytest

from inference.config import ConfigError, load, resolve_env_name


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "inference.yaml"
        path.write_text(text)
        return str(path)
    return write


def test_defaults_match_the_design():
    config = load(None, {})
    http = config.inference.http
    assert (http.timeout_secs, http.connect_timeout_secs, http.keep_alive_secs, http.max_idle_connections,
            http.max_retries) == (60, 10, 30, None, 2)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 3000)
    assert config.inference.provider == "lmstudio"
    assert config.inference.base_url == "http://localhost:1234"
    assert (config.inference.defaults.max_tokens, config.inference.defaults.temperature) == (100, 0.7)


def test_environment_overrides_file_which_overrides_defaults(yaml_file):
    path = yaml_file("server: {port: 4000, host: 0.0.0.0}\ninference:\n  http: {timeout_secs: 5}\n")
    config = load(path, {"INFERENCE_SERVER_PORT": "4001"})
    assert config.server.port == 4001            # env beats file
    assert config.server.host == "0.0.0.0"        # file beats default
    assert config.inference.http.timeout_secs == 5
    assert config.inference.http.connect_timeout_secs == 10  # default kept


@pytest.mark.parametrize("name, keys", [
    ("INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS", ("inference", "http", "timeout_secs")),
    ("INFERENCE_INFERENCE_BASE_URL", ("inference", "base_url")),
    ("INFERENCE_SERVER_PORT", ("server", "port")),
    ("INFERENCE_INFERENCE_HTTP_MAX_IDLE_CONNECTIONS", ("inference", "http", "max_idle_connections")),
    ("INFERENCE_OBSERVABILITY_TRACING_SAMPLE_RATIO", ("observability", "tracing", "sample_ratio")),
    ("INFERENCE_INFERENCE__HTTP__TIMEOUT_SECS", ("inference", "http", "timeout_secs")),
])
def test_env_names_resolve_against_the_schema(name, keys):
    assert resolve_env_name(name) == keys


def test_env_values_are_typed():
    config = load(None, {
        "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "2.5",
        "INFERENCE_INFERENCE_ALLOWED_MODELS": "a, b,c",
        "INFERENCE_OBSERVABILITY_METRICS_ENABLED": "false",
        "INFERENCE_SERVER_API_KEYS": "k1,k2",
        "INFERENCE_INFERENCE_API_KEY": "",
    })
    assert config.inference.http.timeout_secs == 2.5
    assert config.inference.allowed_models == ["a", "b", "c"]
    assert config.observability.metrics.enabled is False
    assert config.server.api_keys == ["k1", "k2"]
    assert config.inference.api_key is None


@pytest.mark.parametrize("env, expected", [
    ({"INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "abc"},
     "inference.http.timeout_secs = 'abc' from INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS: expected a number"),
    ({"INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "0"}, "expected a number > 0"),
    ({"INFERENCE_SERVER_PORT": "70000"}, "server.port = '70000' from INFERENCE_SERVER_PORT: expected a number "
                                         "from 0 to 65535"),
    ({"INFERENCE_SERVER_PORT": "3.5"}, "expected a whole number"),
    ({"INFERENCE_INFERENCE_PROVIDER": "ollama"}, "expected one of lmstudio, openai, mock"),
    ({"INFERENCE_INFERENCE_BASE_URL": "localhost:1234"}, "expected an http:// or https:// URL"),
    ({"INFERENCE_INFERENCE_DEFAULTS_TEMPERATURE": "3"}, "expected a number from 0 to 2"),
    ({"INFERENCE_INFERENCE_HTTP_MAX_IDLE_CONNECTIONS": "-1"}, "expected a number >= 0"),
    ({"INFERENCE_OBSERVABILITY_METRICS_ENABLED": "maybe"}, "expected true or false"),
    ({"INFERENCE_LOGGING_FORMAT": "xml"}, "expected one of text, json"),
    ({"INFERENCE_OBSERVABILITY_TRACING_IMPLEMENTATION": "fast"}, "expected one of lean, sdk"),
    ({"INFERENCE_SERVER_CORS_ORIGINS": "https://app.example.com,app.example.com"},
     "expected origins like https://app.example.com or http://localhost:5173, or * for any (not 'app.example.com')"),
    ({"INFERENCE_OBSERVABILITY_METRICS_PATH": "metrics"}, "expected a path starting with /"),
    ({"INFERENCE_INFERENCE_HTTP_TIMEOUT": "5"},
     "unknown environment variable INFERENCE_INFERENCE_HTTP_TIMEOUT: no such setting; did you mean "
     "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS?"),
    ({"INFERENCE_SERVER__NOPE": "1"}, "unknown environment variable INFERENCE_SERVER__NOPE"),
])
def test_bad_environment_values_fail_with_one_clear_line(env, expected):
    with pytest.raises(ConfigError) as info:
        load(None, env)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("text, expected", [
    ("server: {prot: 3000}\n", "unknown config key server.prot in "),
    ("inference: {http: {timeout_secs: -1}}\n", "inference.http.timeout_secs = -1 in "),
    ("inference: {http: 5}\n", "inference.http must be a section"),
    ("inference: {allowed_models: [1, 2]}\n", "expected a list of strings"),
    ("server: [1, 2\n", "is not valid YAML at line"),
    ("- just\n- a list\n", "must hold a mapping of sections"),
    ("inference: {max_queue: true}\n", "expected a whole number"),
])
def test_bad_file_values_fail_with_one_clear_line(yaml_file, text, expected):
    with pytest.raises(ConfigError) as info:
        load(yaml_file(text), {})
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_error_lists_the_allowed_keys(yaml_file):
    with pytest.raises(ConfigError, match="allowed keys here are host, port, api_keys"):
        load(yaml_file("server: {prot: 3000}\n"), {})


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(str(tmp_path / "missing.yaml"), {})


def test_empty_file_means_defaults(yaml_file):
    assert load(yaml_file(""), {}) == load(None, {})


def test_openai_provider_uses_openai_and_the_standard_key_variable():
    config = load(None, {"INFERENCE_INFERENCE_PROVIDER": "openai", "OPENAI_API_KEY": "sk-test"})
    assert config.inference.base_url == "https://api.openai.com"
    assert config.inference.api_key == "sk-test"


def test_openai_provider_without_a_key_fails_without_echoing_secrets():
    with pytest.raises(ConfigError, match="provider openai needs an API key"):
        load(None, {"INFERENCE_INFERENCE_PROVIDER": "openai"})


def test_secret_values_are_not_echoed_in_errors(yaml_file):
    with pytest.raises(ConfigError) as info:
        load(yaml_file("inference: {api_key: [sk-secret-value]}\n"), {})
    assert "sk-secret-value" not in str(info.value)


@pytest.mark.parametrize("key, value", [
    ("INFERENCE_INFERENCE_USAGE_STORE", "mysql://usage:db-secret@db/usage"),
    ("INFERENCE_INFERENCE_LIMITS_STORE", "memcached://:db-secret@cache:11211"),
])
def test_a_stores_password_is_not_echoed_in_errors(key, value):
    with pytest.raises(ConfigError) as info:
        load(None, {key: value})
    assert "db-secret" not in str(info.value) and "***@" in str(info.value)


def test_tenants_stores_are_read():
    config = load(None, {"INFERENCE_INFERENCE_LIMITS_STORE": "redis://:pw@redis.internal:6379/2",
                         "INFERENCE_INFERENCE_USAGE_STORE": "postgresql://inference@db/usage",
                         "INFERENCE_INFERENCE_SHED_ABOVE": "100"})
    assert config.inference.limits.store == "redis://:pw@redis.internal:6379/2"
    assert (config.inference.usage.store, config.inference.shed_above) == ("postgresql://inference@db/usage", 100)


@pytest.mark.parametrize("name", ["lmstudio.yaml", "mock.yaml"])
def test_the_example_configs_load(name):
    path = os.path.join(os.path.dirname(__file__), "..", "examples", name)
    config = load(path, {})
    assert config.inference.provider == name.split(".")[0]


def test_a_fleet_of_hosts_from_yaml_and_from_one_variable(yaml_file):
    path = yaml_file("inference:\n  upstreams:\n"
                     "    - {name: mac, base_url: 'http://mac.local:1234', max_concurrent: 2, api_key: sk-1}\n"
                     "    - http://pc1:1234\n")
    hosts = load(path, {}).inference.hosts()
    assert [(h.name, h.base_url, h.max_concurrent, h.weight) for h in hosts] == [
        ("mac", "http://mac.local:1234", 2, 1.0), ("pc1:1234", "http://pc1:1234", None, 1.0)]  # None: the host says
    from_env = load(None, {"INFERENCE_INFERENCE_UPSTREAMS": "http://mac:1234, https://pc1"}).inference.hosts()
    assert [h.name for h in from_env] == ["mac:1234", "pc1:443"]
    alone = load(None, {"INFERENCE_INFERENCE_BASE_URL": "http://box:1234"}).inference.hosts()
    assert [(h.name, h.base_url) for h in alone] == [("box:1234", "http://box:1234")]  # the one-host shorthand


@pytest.mark.parametrize("text, message", [
    ("inference:\n  upstreams: [http://a:1, http://a:1]\n", "two hosts are named a:1"),
    ("inference:\n  upstreams: [ftp://a]\n", "inference.upstreams[0].base_url"),
    ("inference:\n  upstreams: [{base_url: 'http://a:1', max_concurrent: 0}]\n",
     "inference.upstreams[0].max_concurrent"),
    ("inference:\n  upstreams: [{url: 'http://a:1'}]\n", "unknown config key inference.upstreams[0].url"),
    ("inference:\n  upstreams: {a: 1}\n", "expected a list of hosts"),
    ("inference:\n  upstreams: [{base_url: 'http://a:1', provider: mock}]\n", "expected one of lmstudio, openai"),
    ("inference:\n  upstreams: [http://a:1, {base_url: 'https://api.openai.com', provider: openai}]\n",
     "inference.upstreams[1].api_key is not set: host api.openai.com:443 (provider openai) needs an API key"),
    ("inference:\n  placement: {mode: on_demand}\n", "it needs two or more inference.upstreams"),
    ("inference:\n  upstreams: [http://a:1, http://b:1]\n  placement: {pinned: {qwen: [c:1]}}\n",
     "inference.placement.pinned.qwen: no host of inference.upstreams is named c:1 (the hosts are a:1, b:1)"),
    ("inference:\n  upstreams: [http://a:1, http://b:1]\n  placement: {pinned: {qwen: 3}}\n",
     "expected a mapping of model to a list of host names"),
    ("inference:\n  upstreams: [http://a:1, http://b:1]\n  placement: {mode: always}\n", "one of off, on_demand"),
])
def test_a_bad_fleet_fails_at_start_with_one_line(yaml_file, text, message):
    with pytest.raises(ConfigError) as raised:
        load(yaml_file(text), {})
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_openai_host_of_a_fleet_takes_the_key_from_openai_api_key(yaml_file):
    text = "inference:\n  upstreams: [http://a:1, {base_url: 'https://api.openai.com', provider: openai}]\n"
    hosts = load(yaml_file(text), {"OPENAI_API_KEY": "sk-env"}).inference.upstreams
    assert [(host.provider, host.api_key) for host in hosts] == [(None, None), ("openai", "sk-env")]


def test_placement_from_yaml_and_from_variables(yaml_file):
    path = yaml_file("inference:\n  upstreams: [{name: mac, base_url: 'http://mac:1234'}, http://pc:1234]\n"
                     "  placement: {mode: on_demand, max_loaded_per_host: 2, pinned: {qwen3-8b: [mac], "
                     "nomic-embed: pc:1234}}\n")
    placement = load(path, {}).inference.placement
    assert (placement.mode, placement.max_loaded_per_host) == ("on_demand", 2)
    assert placement.pinned == {"qwen3-8b": ["mac"], "nomic-embed": ["pc:1234"]}
    env = {"INFERENCE_INFERENCE_UPSTREAMS": "http://mac:1234,http://pc:1234",
           "INFERENCE_INFERENCE_PLACEMENT_MODE": "on_demand",
           "INFERENCE_INFERENCE_PLACEMENT_PINNED": "qwen/qwen3-8b=mac:1234|pc:1234, gemma=pc:1234"}
    assert load(None, env).inference.placement.pinned == {"qwen/qwen3-8b": ["mac:1234", "pc:1234"],
                                                          "gemma": ["pc:1234"]}
    assert load(None, {}).inference.placement.mode == "off"  # off unless asked
