"""Endpoints: where a client reaches each host's model (decided once, from the exposure role's decisions), and the
configuration formats of the tools people point at a fleet."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from r1fleet.errors import FleetError, R1FleetError
from r1fleet.fleet.config import HostConfig
from r1fleet.records import HostPlan
from r1fleet.roles.exposure.endpoint import endpoint_of
from r1fleet.status.endpoints import env_prefix, render

LAN = ["192.168.1.0/24"]


def plan(host: str, backend: str = "ollama", tag: str = "deepseek-r1:14b", **more) -> HostPlan:
    return HostPlan(host=host, model="deepseek-r1-distill-qwen-14b", ollama_tag=tag, backend=backend, fits=True, **more)


def fleet(tmp_path):
    """Four hosts: an exposed Ollama, an exposed llama-server with its key on the controller, one whose key the
    host generated, and a host-only Ollama."""
    key = tmp_path / "big.key"
    key.write_text("c2VjcmV0LWtleS1mb3ItYmln\n")
    return [
        endpoint_of(HostConfig(name="gpu-3060", address="192.168.1.21", listen="192.168.1.21", allow=LAN), plan("gpu-3060")),
        endpoint_of(HostConfig(name="dual-3090", address="192.168.1.23", listen="192.168.1.23", allow=LAN,
                               api_key_source=str(key)),
                    plan("dual-3090", "llama.cpp", "deepseek-r1:70b-llama-distill-q4_K_M")),
        endpoint_of(HostConfig(name="big.box", address="192.168.1.24", listen="0.0.0.0", allow=LAN),
                    plan("big.box", "llama.cpp", "deepseek-r1:70b-llama-distill-q4_K_M")),
        endpoint_of(HostConfig(name="mini", address="192.168.1.30", ssh_user="me", ssh_port=2222),
                    plan("mini", rehearsal=True, target_model="deepseek-r1-distill-qwen-14b",
                         tag="r1fleet/smollm2:135m-instruct-q4_1")),
    ]


# ---------------------------------------------------------------- the record


def test_each_endpoint_comes_from_the_hosts_settings_and_exposure(tmp_path):
    ollama, llama, generated, local = fleet(tmp_path)
    assert (ollama.url, ollama.base, ollama.model, ollama.lan, ollama.key_needed) == (
        "http://192.168.1.21:11434/v1", "http://192.168.1.21:11434", "deepseek-r1:14b", True, False)
    assert llama.url == "http://192.168.1.23:8080/v1" and llama.key_needed and llama.key_file == str(tmp_path / "big.key")
    assert generated.address == "192.168.1.24"  # a wildcard bind: clients use the host's address
    assert generated.key_where.startswith("on big.box only, in /etc/r1fleet/api-key")
    assert local.url == "http://127.0.0.1:11434/v1" and not local.lan and local.stands_for == "deepseek-r1-distill-qwen-14b"
    assert local.tunnel == "ssh -N -L 11434:127.0.0.1:11434 -p 2222 me@192.168.1.30"


def test_a_worker_or_a_host_without_a_model_has_no_endpoint_and_a_refused_exposure_is_an_error():
    entry = HostConfig(name="w", address="10.0.0.2")
    assert endpoint_of(entry, plan("w", "llama.cpp"), role="worker") is None
    assert endpoint_of(entry, HostPlan(host="w", model=None)) is None
    public = HostConfig(name="pub", address="203.0.113.5", listen="203.0.113.5", allow=["0.0.0.0/0"])
    with pytest.raises(FleetError, match="host pub: field allow: an exposed Ollama has no authentication"):
        endpoint_of(public, plan("pub"))


def test_the_deploy_summary_line(tmp_path):
    ollama, llama, _, local = fleet(tmp_path)
    assert llama.describe() == (f"dual-3090: http://192.168.1.23:8080/v1  model deepseek-r1:70b-llama-distill-q4_K_M  "
                                f"key: {tmp_path / 'big.key'}")
    assert "no key (Ollama: the allow-list is its only guard)" in ollama.describe()
    assert local.describe() == ("mini: http://127.0.0.1:11434/v1  model r1fleet/smollm2:135m-instruct-q4_1 (rehearsal "
                                "for deepseek-r1-distill-qwen-14b)  on the host only; from here: "
                                "ssh -N -L 11434:127.0.0.1:11434 -p 2222 me@192.168.1.30")


# ---------------------------------------------------------------- the formats


def test_openwebui_lists_are_semicolon_separated_with_keys_in_url_order(tmp_path):
    second = endpoint_of(HostConfig(name="gpu-4090", address="192.168.1.22", listen="192.168.1.22", allow=LAN),
                         plan("gpu-4090"))
    text = render([*fleet(tmp_path), second], "openwebui")
    env = dict(line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    assert env["OLLAMA_BASE_URLS"] == "http://192.168.1.21:11434;http://192.168.1.22:11434"  # Ollama's own API root
    assert env["OPENAI_API_BASE_URLS"].split(";") == ["http://192.168.1.23:8080/v1", "http://192.168.1.24:8080/v1"]
    assert env["OPENAI_API_KEYS"].split(";") == [f"<key in {tmp_path / 'big.key'}>", "<key on big.box in /etc/r1fleet/api-key>"]
    assert "# mini (r1fleet/smollm2:135m-instruct-q4_1) listens on 127.0.0.1 only" in text
    shown = render(fleet(tmp_path), "openwebui", {"dual-3090": "c2VjcmV0LWtleS1mb3ItYmln"})
    assert "OPENAI_API_KEYS=c2VjcmV0LWtleS1mb3ItYmln;<key on big.box" in shown


def test_a_key_with_a_semicolon_cannot_go_into_open_webuis_key_list(tmp_path):
    with pytest.raises(R1FleetError, match="host dual-3090: field api_key_source: its API key holds a ';'"):
        render(fleet(tmp_path), "openwebui", {"dual-3090": "abc;def"})


def test_litellm_model_list(tmp_path):
    text = render(fleet(tmp_path), "litellm")
    config = yaml.safe_load(text)
    models = config["model_list"]
    assert [m["model_name"] for m in models] == ["deepseek-r1:14b", "deepseek-r1:70b-llama-distill-q4_K_M",
                                                 "deepseek-r1:70b-llama-distill-q4_K_M"]  # one group: balanced
    assert models[0]["litellm_params"] == {"model": "ollama_chat/deepseek-r1:14b", "api_base": "http://192.168.1.21:11434"}
    assert models[1]["litellm_params"] == {"model": "openai/deepseek-r1:70b-llama-distill-q4_K_M",
                                           "api_base": "http://192.168.1.23:8080/v1",
                                           "api_key": "os.environ/R1FLEET_DUAL_3090_API_KEY"}
    assert f'# before starting the proxy: export R1FLEET_DUAL_3090_API_KEY="$(cat {tmp_path / "big.key"})"' in text
    assert "c2VjcmV0" not in text  # no key unless asked
    shown = yaml.safe_load(render(fleet(tmp_path), "litellm", {"dual-3090": "c2VjcmV0LWtleS1mb3ItYmln"}))
    assert shown["model_list"][1]["litellm_params"]["api_key"] == "c2VjcmV0LWtleS1mb3ItYmln"


def test_env_variables_per_host_and_the_openai_clients_own_for_one_host(tmp_path):
    text = render(fleet(tmp_path), "env")
    assert "R1FLEET_DUAL_3090_BASE_URL=http://192.168.1.23:8080/v1" in text
    assert "R1FLEET_BIG_BOX_MODEL=deepseek-r1:70b-llama-distill-q4_K_M" in text
    assert f"# R1FLEET_DUAL_3090_API_KEY: <key in {tmp_path / 'big.key'}> (--show-keys prints it)" in text
    assert "OPENAI_BASE_URL" not in text
    one = render(fleet(tmp_path)[1:2], "env", {"dual-3090": "k e y"})
    assert "OPENAI_BASE_URL=http://192.168.1.23:8080/v1" in one and "OPENAI_API_KEY='k e y'" in one
    [line] = [line for line in one.splitlines() if line.startswith("R1FLEET_DUAL_3090_API_KEY")]
    assert shlex.split(line) == ["R1FLEET_DUAL_3090_API_KEY=k e y"]  # quoted for the shell that evaluates it
    assert "OPENAI_API_KEY=none" in render(fleet(tmp_path)[:1], "env")  # the client wants one even where none is checked


def test_json_and_table_never_print_a_key_unless_given(tmp_path):
    doc = json.loads(render(fleet(tmp_path), "json"))
    assert [e["host"] for e in doc["endpoints"]] == ["gpu-3060", "dual-3090", "big.box", "mini"]
    assert all("api_key" not in e for e in doc["endpoints"]) and doc["endpoints"][3]["reach"] == "host"
    shown = json.loads(render(fleet(tmp_path), "json", {"dual-3090": "sekrit"}))
    assert shown["endpoints"][1]["api_key"] == "sekrit"
    table = render(fleet(tmp_path), "table")
    assert table.splitlines()[0].split() == ["HOST", "MODEL", "URL", "KEY", "REACH"]
    assert "this host only; tunnel: ssh -N -L 11434:127.0.0.1:11434 -p 2222 me@192.168.1.30" in table


def test_two_hosts_whose_names_make_the_same_variables_are_refused():
    a = endpoint_of(HostConfig(name="gpu-1", address="10.0.0.1"), plan("gpu-1"))
    b = endpoint_of(HostConfig(name="gpu.1", address="10.0.0.2"), plan("gpu.1"))
    assert env_prefix("gpu-1") == env_prefix("gpu.1") == "R1FLEET_GPU_1"
    with pytest.raises(R1FleetError, match="host gpu.1: field hosts: hosts gpu-1 and gpu.1 get the same variable names"):
        render([a, b], "env")
    with pytest.raises(R1FleetError, match="field --format: unknown format 'xml'"):
        render([a], "xml")


# ---------------------------------------------------------------- the gateway first


def gateway_of(tmp_path, endpoints, key_source: bool = True):
    from r1fleet.fleet.config import GatewaySettings
    from r1fleet.roles.gateway.decide import gateway_endpoint

    key = tmp_path / "gateway.key"
    key.write_text("Z2F0ZXdheS1jbGllbnQta2V5LTAxMjM0NTY3OA==\n")
    settings = GatewaySettings(host="gpu-3060", listen="192.168.1.21", allow=LAN, port=8000,
                               api_key_source=str(key) if key_source else None)
    return gateway_endpoint(settings, HostConfig(name="gpu-3060", address="192.168.1.21"), endpoints)


def test_the_gateway_routes_the_models_it_reaches_and_comes_first_in_every_format(tmp_path):
    endpoints = fleet(tmp_path)
    gateway = gateway_of(tmp_path, endpoints)
    # big.box's key was generated on its host and mini serves on 127.0.0.1 only: only what the gateway reaches
    assert gateway.models == ("deepseek-r1:14b", "deepseek-r1:70b-llama-distill-q4_K_M")
    ollama, _, generated, local = endpoints
    assert gateway_of(tmp_path, [ollama, generated, local]).models == ("deepseek-r1:14b",)
    assert gateway.url == "http://192.168.1.21:8000/v1"
    for fmt in ("table", "json", "env"):
        text = render(endpoints, fmt, gateway=gateway)
        assert text.index("192.168.1.21:8000/v1") < text.index("192.168.1.21:11434"), fmt
    table = render(endpoints, "table", gateway=gateway).splitlines()
    assert table[1].startswith("gateway (gpu-3060)") and f"<key in {tmp_path / 'gateway.key'}>" not in table[1]
    assert str(tmp_path / "gateway.key") in table[1]
    document = json.loads(render(endpoints, "json", gateway=gateway))
    assert list(document) == ["gateway", "endpoints"] and document["gateway"]["models"] == list(gateway.models)
    assert "api_key" not in document["gateway"]


def test_open_webui_and_litellm_take_the_gateway_alone(tmp_path):
    endpoints = fleet(tmp_path)
    gateway = gateway_of(tmp_path, endpoints)
    webui = render(endpoints, "openwebui", gateway=gateway, gateway_key="gw-key")
    assert "OPENAI_API_BASE_URLS=http://192.168.1.21:8000/v1\nOPENAI_API_KEYS=gw-key" in webui
    assert "OLLAMA_BASE_URLS" not in webui and "192.168.1.23" not in webui  # each model once, through the gateway
    config = yaml.safe_load(render(endpoints, "litellm", gateway=gateway))
    assert [m["model_name"] for m in config["model_list"]] == list(gateway.models)
    assert {m["litellm_params"]["api_base"] for m in config["model_list"]} == {"http://192.168.1.21:8000/v1"}
    assert {m["litellm_params"]["api_key"] for m in config["model_list"]} == {"os.environ/R1FLEET_GATEWAY_API_KEY"}
    with pytest.raises(R1FleetError, match="field gateway.api_key_source"):
        render(endpoints, "openwebui", gateway=gateway, gateway_key="a;b")


def test_the_openai_clients_variables_point_at_the_gateway(tmp_path):
    endpoints = fleet(tmp_path)
    text = render(endpoints, "env", gateway=gateway_of(tmp_path, endpoints, key_source=False))
    assert "R1FLEET_GATEWAY_BASE_URL=http://192.168.1.21:8000/v1" in text
    assert "OPENAI_BASE_URL=http://192.168.1.21:8000/v1" in text
    assert "# OPENAI_API_KEY: <key on gpu-3060 in /etc/r1fleet/gateway/api-key>" in text
    shown = render(endpoints, "env", gateway=gateway_of(tmp_path, endpoints), gateway_key="k ey")
    assert f"OPENAI_API_KEY={shlex.quote('k ey')}" in shown and "R1FLEET_GATEWAY_API_KEY='k ey'" in shown
