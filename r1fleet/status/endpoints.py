"""`r1fleet endpoints`: the fleet's endpoints in the configuration formats of the tools people point at it. Pure:
endpoint records (r1fleet/roles/exposure/endpoint.py) in, text out.

Formats, each checked against the tool's own source or documentation (docs/status.md cites them):
  * table, json: every endpoint, host-only ones with the ssh tunnel that reaches them;
  * openwebui: Open WebUI's `OLLAMA_BASE_URLS`, `OPENAI_API_BASE_URLS` and `OPENAI_API_KEYS`, each a `;`-separated
    list, the keys in the order of the URLs (open-webui backend/open_webui/config.py splits them on ";");
  * litellm: a LiteLLM proxy `config.yaml` `model_list`: Ollama hosts as `ollama_chat/<name>` on the server's root
    (LiteLLM's Ollama provider page recommends ollama_chat), llama-server as `openai/<name>` on `/v1` with its key
    as `os.environ/VAR` (docs.litellm.ai/docs/proxy/configs), so the file holds no secret;
  * env: shell variables per host (`R1FLEET_<HOST>_BASE_URL`, `_MODEL`, `_API_KEY`), and the openai client's own
    `OPENAI_BASE_URL` / `OPENAI_API_KEY` when one host is chosen.
With a gateway (the fleet file's `gateway:`, docs/gateway.md) it comes first in every format: one URL and key for
every model it routes. A key is printed only when the caller passes it (`--show-keys`, read from the controller's
key file); otherwise the output names where it is.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Mapping

import yaml

from r1fleet.errors import R1FleetError
from r1fleet.roles.exposure.endpoint import Endpoint
from r1fleet.roles.gateway.decide import GatewayEndpoint

FORMATS = ("table", "json", "openwebui", "litellm", "env")
GATEWAY_PREFIX = "R1FLEET_GATEWAY"
LAN_DOCS = "docs/deploy.md#opening-a-host-to-the-lan"


def env_prefix(host: str) -> str:
    """R1FLEET_<HOST>: the host name upper-cased, every character a shell name cannot hold as `_`."""
    return "R1FLEET_" + re.sub(r"[^A-Za-z0-9]", "_", host).upper()


def _check_names(endpoints: list[Endpoint]) -> None:
    seen: dict[str, str] = {}
    for e in endpoints:
        prefix = env_prefix(e.host)
        if prefix in seen:
            raise R1FleetError(f"hosts {seen[prefix]} and {e.host} get the same variable names ({prefix}_...)",
                               host=e.host, field="hosts", fix="rename one of them in the fleet file")
        seen[prefix] = e.host


def placeholder(e: Endpoint) -> str:
    if e.key_file:
        return f"<key in {e.key_file}>"
    return f"<key on {e.host} in {e.host_key_file}>"


def _model(e: Endpoint) -> str:
    return f"{e.model} (for {e.stands_for})" if e.stands_for else e.model


def _host_only_note(e: Endpoint) -> str:
    return f"# {e.host} ({e.model}) listens on 127.0.0.1 only; reach it through: {e.tunnel}"


def _gateway_key(g: GatewayEndpoint) -> str:
    return f"<key in {g.key_file}>" if g.key_file else f"<key on {g.host} in {g.host_key_file}>"


def _reach(lan: bool, allow: tuple[str, ...], tunnel: str) -> str:
    return f"allow {', '.join(allow)}" if lan else f"this host only; tunnel: {tunnel}"


def table(endpoints: list[Endpoint], keys: Mapping[str, str], gateway: GatewayEndpoint | None = None,
          gateway_key: str | None = None) -> str:
    header = ("HOST", "MODEL", "URL", "KEY", "REACH")
    rows = [header]
    if gateway is not None:
        key = "shown below" if gateway_key else gateway.key_where
        reach = _reach(gateway.lan, gateway.allow, f"ssh -N -L {gateway.port}:127.0.0.1:{gateway.port} {gateway.host}")
        rows += [(f"gateway ({gateway.host})", model, gateway.url, key, reach) for model in gateway.models or ("-",)]
    for e in endpoints:
        key = "-" if not e.key_needed else ("shown below" if e.host in keys else e.key_where)
        reach = f"allow {', '.join(e.allow)}" if e.lan else f"this host only; tunnel: {e.tunnel}"
        rows.append((e.host, _model(e), e.url, key, reach))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"gateway: key {gateway_key}"] if gateway_key else []
    lines += [f"{host}: key {key}" for host, key in keys.items()]
    return "\n".join(lines)


def as_json(endpoints: list[Endpoint], keys: Mapping[str, str], gateway: GatewayEndpoint | None = None,
            gateway_key: str | None = None) -> str:
    docs = []
    for e in endpoints:
        doc = e.document()
        if e.host in keys:
            doc["api_key"] = keys[e.host]
        docs.append(doc)
    document: dict = {}
    if gateway is not None:
        document["gateway"] = {**gateway.document(), **({"api_key": gateway_key} if gateway_key else {})}
    return json.dumps({**document, "endpoints": docs}, indent=2)


def _no_lan(endpoints: list[Endpoint]) -> list[str]:
    if any(e.lan for e in endpoints):
        return []
    return [f"# no endpoint is open to the LAN: give a host `listen` and `allow` in the fleet file ({LAN_DOCS})"]


def openwebui(endpoints: list[Endpoint], keys: Mapping[str, str], gateway: GatewayEndpoint | None = None,
              gateway_key: str | None = None) -> str:
    lines = ["# Open WebUI's connections (r1fleet endpoints --format openwebui). Open WebUI reads them on its first",
             "# start; later, edit them under Admin Panel > Settings > Connections, or start it with",
             "# ENABLE_PERSISTENT_CONFIG=False."]
    if gateway is not None and gateway.lan:
        # the gateway alone: every model once, one key; the hosts behind it would list each model again
        _no_semicolon(gateway_key or _gateway_key(gateway), gateway.host, "gateway.api_key_source")
        lines.append(f"# the fleet's gateway on {gateway.host}: every model it routes, one key")
        lines.append(f"OPENAI_API_BASE_URLS={gateway.url}")
        lines.append(f"OPENAI_API_KEYS={gateway_key or _gateway_key(gateway)}")
        return "\n".join(lines)
    ollama = [e for e in endpoints if e.lan and e.backend == "ollama"]
    openai = [e for e in endpoints if e.lan and e.backend != "ollama"]
    if ollama:
        lines.append("OLLAMA_BASE_URLS=" + ";".join(e.base for e in ollama))
    if openai:
        values = []
        for e in openai:
            key = keys.get(e.host, placeholder(e)) if e.key_needed else ""
            _no_semicolon(key, e.host, "api_key_source")
            values.append(key)
        lines.append("OPENAI_API_BASE_URLS=" + ";".join(e.url for e in openai))
        lines.append("OPENAI_API_KEYS=" + ";".join(values))
    lines += [_host_only_note(e) for e in endpoints if not e.lan]
    return "\n".join(lines + _no_lan(endpoints))


def _no_semicolon(key: str, host: str, field: str) -> None:
    if ";" in key:
        raise R1FleetError("its API key holds a ';', which Open WebUI reads as the end of a key in OPENAI_API_KEYS",
                           host=host, field=field, fix="use a key without ';', e.g. `head -c 32 /dev/urandom | base64`")


def litellm(endpoints: list[Endpoint], keys: Mapping[str, str], gateway: GatewayEndpoint | None = None,
            gateway_key: str | None = None) -> str:
    lines = ["# LiteLLM proxy config.yaml (r1fleet endpoints --format litellm): `litellm --config config.yaml`.",
             "# Hosts that serve the same model name share a model_name, so the proxy balances between them."]
    model_list = []
    if gateway is not None and gateway.lan:
        # through the gateway only: it balances and fails over itself
        lines[1] = f"# Every model through the fleet's gateway on {gateway.host}, which balances and fails over itself."
        variable = f"{GATEWAY_PREFIX}_API_KEY"
        if not gateway_key:
            where = f"\"$(cat {gateway.key_file})\"" if gateway.key_file else _gateway_key(gateway)
            lines.append(f"# before starting the proxy: export {variable}={where}")
        model_list = [{"model_name": model, "litellm_params": {"model": f"openai/{model}", "api_base": gateway.url,
                                                               "api_key": gateway_key or f"os.environ/{variable}"}}
                      for model in gateway.models]
        body = yaml.safe_dump({"model_list": model_list}, sort_keys=False, default_flow_style=False, width=200)
        return "\n".join(lines) + "\n" + body.rstrip("\n")
    for e in endpoints:
        if not e.lan:
            continue
        if e.backend == "ollama":
            params = {"model": f"ollama_chat/{e.model}", "api_base": e.base}
        else:
            params = {"model": f"openai/{e.model}", "api_base": e.url}
            if e.key_needed:
                variable = f"{env_prefix(e.host)}_API_KEY"
                params["api_key"] = keys.get(e.host, f"os.environ/{variable}")
                if e.host not in keys:
                    where = f"\"$(cat {e.key_file})\"" if e.key_file else placeholder(e)
                    lines.append(f"# before starting the proxy: export {variable}={where}")
        model_list.append({"model_name": e.model, "litellm_params": params})
    lines += [_host_only_note(e) for e in endpoints if not e.lan]
    lines += _no_lan(endpoints)
    body = yaml.safe_dump({"model_list": model_list}, sort_keys=False, default_flow_style=False, width=200)
    return "\n".join(lines) + "\n" + body.rstrip("\n")


def env(endpoints: list[Endpoint], keys: Mapping[str, str], gateway: GatewayEndpoint | None = None,
        gateway_key: str | None = None) -> str:
    lines = ['# r1fleet endpoints as shell variables: eval "$(r1fleet endpoints --format env)"']
    if gateway is not None:
        lines.append(f"{GATEWAY_PREFIX}_BASE_URL={shlex.quote(gateway.url)}")
        lines.append(f"{GATEWAY_PREFIX}_MODELS={shlex.quote(' '.join(gateway.models))}")
        if gateway_key:
            lines.append(f"{GATEWAY_PREFIX}_API_KEY={shlex.quote(gateway_key)}")
        else:
            lines.append(f"# {GATEWAY_PREFIX}_API_KEY: {_gateway_key(gateway)} (--show-keys prints it)")
    for e in endpoints:
        prefix = env_prefix(e.host)
        if not e.lan:
            lines.append(_host_only_note(e))
        lines.append(f"{prefix}_BASE_URL={shlex.quote(e.url)}")
        lines.append(f"{prefix}_MODEL={shlex.quote(e.model)}")
        if e.key_needed:
            if e.host in keys:
                lines.append(f"{prefix}_API_KEY={shlex.quote(keys[e.host])}")
            else:
                lines.append(f"# {prefix}_API_KEY: {placeholder(e)} (--show-keys prints it)")
    if gateway is not None:  # the openai client's own variables: the gateway, every model behind one URL
        lines.append(f"OPENAI_BASE_URL={shlex.quote(gateway.url)}")
        lines.append(f"OPENAI_API_KEY={shlex.quote(gateway_key)}" if gateway_key else
                     f"# OPENAI_API_KEY: {_gateway_key(gateway)}")
    elif len(endpoints) == 1:  # what the openai client reads by itself; it wants a key even where none is checked
        e = endpoints[0]
        key = keys.get(e.host) if e.key_needed else "none"
        lines.append(f"OPENAI_BASE_URL={shlex.quote(e.url)}")
        lines.append(f"OPENAI_API_KEY={shlex.quote(key)}" if key else f"# OPENAI_API_KEY: {placeholder(e)}")
    return "\n".join(lines)


RENDER = {"table": table, "json": as_json, "openwebui": openwebui, "litellm": litellm, "env": env}


def render(endpoints: list[Endpoint], fmt: str, keys: Mapping[str, str] | None = None,
           gateway: GatewayEndpoint | None = None, gateway_key: str | None = None) -> str:
    """The endpoints in format `fmt`, the gateway first when the fleet has one; `keys` (host -> key) and
    `gateway_key` only when the user asked for them."""
    if fmt not in RENDER:
        raise R1FleetError(f"unknown format {fmt!r}", field="--format", fix=f"use one of: {', '.join(FORMATS)}")
    _check_names(endpoints)
    return RENDER[fmt](endpoints, keys or {}, gateway, gateway_key)
