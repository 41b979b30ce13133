"""Gateway role: the fleet's one OpenAI endpoint, an HAProxy from the distribution's own package on the host the fleet
file names (`gateway:`), configured from what every host serves (decide.py).

Install: Debian's or Ubuntu's `haproxy` (and nftables when the gateway is opened to the LAN); the package's own
haproxy.service stopped and disabled, since r1fleet's unit runs the gateway. Configure: the gateway's client key
(from the controller's `gateway.api_key_source`, else generated on the host once; root's 0600, handed to HAProxy as
a systemd credential), `/v1/models`, haproxy.cfg (root:haproxy 0640: it holds the hosts' keys), the firewall's rules
and unit when opened (the exposure role's templates, in a table of its own), and the hardened
r1fleet-gateway.service, which checks the configuration before each start (`haproxy -c`). Activate: the firewall,
then the gateway, restarted only when one of its files changed, healthy once `/v1/models` answers with the key.
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.files import Link
from pyinfra.facts.server import Which
from pyinfra.operations import apt, files, systemd

from r1fleet.fleet.config import GatewaySettings, HostConfig
from r1fleet.net import host_port, is_loopback
from r1fleet.operations.common import TEMPLATES as SHARED_TEMPLATES, converge_service, converge_service_reads, refuse, unit_file
from r1fleet.operations.fact_batch import FactRequest, directory_reads, file_reads, service_reads
from r1fleet.operations.stages import HostContext, Role
from r1fleet.records import HostPlan
from r1fleet.render.formats import haproxy_settings, nft_settings, unit_settings
from r1fleet.render.systemd_unit import UNIT_DIR, unit_context
from r1fleet.roles.exposure.decide import rules_fingerprint
from r1fleet.roles.exposure.role import TEMPLATES as EXPOSURE_TEMPLATES, api_key, api_key_from_controller, load_rules
from r1fleet.roles.gateway.decide import (
    CLIENT_KEY_CREDENTIAL,
    CLIENT_KEY_FILE,
    CONFIG_FILE,
    DISTRO_UNIT,
    DISTRO_UNIT_MASK,
    FIREWALL_UNIT,
    GATEWAY_DIR,
    GATEWAY_UNIT,
    MODELS_FILE,
    NFT_TABLE,
    PACKAGE,
    RULES_FILE,
    SERVICE_USER,
    GatewayPlan,
    models_document,
    server_command,
    start_check_command,
    template_context,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
FIREWALL_UNIT_PATH = f"{UNIT_DIR}/{FIREWALL_UNIT}"
HEALTH_S = 30  # HAProxy starts in well under a second; the hosts behind it are not waited for


class GatewayRole(Role):
    """HAProxy in front of the fleet's hosts, on the gateway host (after that host's own roles)."""

    def __init__(self, settings: HostConfig, gateway: GatewayPlan):
        self.settings, self.gateway = settings, gateway

    @classmethod
    def prepare(cls, ctx: HostContext, gateway: GatewayPlan | None = None) -> "GatewayRole":
        """The role for the gateway host, with its plan decided by the deploy from every host's served plan
        (r1fleet/deploy/gateway_peers.py)."""
        if gateway is None:
            raise ValueError("the gateway role is prepared with the gateway's plan (r1fleet/deploy/gateway_peers.py)")
        return cls(ctx.settings, gateway)

    @property
    def exposed(self) -> bool:
        return not is_loopback(self.gateway.settings.listen)

    def reads(self) -> list[FactRequest]:
        reads: list[FactRequest] = [(Which, {"command": "apt-get"}), (Which, {"command": "nft"}),
                                    (Link, {"path": DISTRO_UNIT_MASK}),
                                    *service_reads(DISTRO_UNIT), *directory_reads(GATEWAY_DIR),
                                    *file_reads(CLIENT_KEY_FILE), *file_reads(MODELS_FILE), *file_reads(CONFIG_FILE),
                                    *converge_service_reads(GATEWAY_UNIT, (CONFIG_FILE, MODELS_FILE, CLIENT_KEY_FILE))]
        if self.exposed:
            reads += [*file_reads(RULES_FILE), *file_reads(FIREWALL_UNIT_PATH), *service_reads(FIREWALL_UNIT)]
        return reads

    def install(self) -> None:
        _install(self.gateway, self.exposed)

    def configure(self) -> None:
        self.changed = _configure(self.settings, self.gateway, self.exposed)

    def activate(self) -> None:
        _activate(self.gateway, self.exposed, *self.changed)


@deploy("Gateway")
def _install(gateway: GatewayPlan, exposed: bool) -> None:
    if not host.get_fact(Which, command="apt-get"):
        refuse(name="Refuse the gateway", message=(
            f"host {host.name}: field gateway.host: the gateway installs the distribution's HAProxy, which r1fleet "
            "does on Debian and Ubuntu only (fix: name a Debian or Ubuntu host as gateway.host)"))
        return
    # The package's own service runs /etc/haproxy/haproxy.cfg, and its installation starts it: masked first, so
    # neither the installation nor a boot starts it (r1fleet's unit runs the gateway), and stopped where it ran.
    files.link(name=f"Mask {DISTRO_UNIT} (r1fleet-gateway runs HAProxy)", path=DISTRO_UNIT_MASK, target="/dev/null")
    apt.packages(name="HAProxy (the distribution's package)", packages=[PACKAGE, *(["nftables"] if exposed else [])])
    systemd.service(name=f"Keep {DISTRO_UNIT} stopped", service=DISTRO_UNIT, running=False)


@deploy("Gateway")
def _configure(settings: HostConfig, gateway: GatewayPlan, exposed: bool):
    """The key, /v1/models, haproxy.cfg, the firewall and the unit; returns (unit, files, firewall rules)."""
    files.directory(name="Gateway configuration directory", path=GATEWAY_DIR, user="root", group=SERVICE_USER,
                    mode="750")
    if gateway.settings.api_key_source:
        key = api_key_from_controller(name="Gateway client key (from gateway.api_key_source on the controller)",
                                      source=gateway.settings.api_key_source, host_name=settings.name,
                                      path=CLIENT_KEY_FILE)
    else:
        key = api_key(name="Gateway client key (generated on the host, once)", path=CLIENT_KEY_FILE)
    models = files.put(name=f"Gateway /v1/models: {len(gateway.models)} models",
                       src=StringIO(models_document(gateway)), dest=MODELS_FILE, user="root", group=SERVICE_USER,
                       mode="640")
    config = files.template(
        name=f"HAProxy configuration: {', '.join(m.name for m in gateway.models) or 'no models yet'}",
        src=str(TEMPLATES / "haproxy.cfg.j2"), dest=CONFIG_FILE, user="root", group=SERVICE_USER, mode="640",
        jinja_env_kwargs=haproxy_settings(), **template_context(gateway))
    rules = _firewall(gateway.settings) if exposed else None
    context = unit_context(
        HostPlan(host=settings.name, model=None), settings,  # no GPU, no model: a plain network service
        description=f"r1fleet gateway: one OpenAI endpoint for the fleet on port {gateway.settings.port}",
        user=SERVICE_USER,
        exec_start=server_command(),
        exec_start_pre=start_check_command(),
        environment={},
        read_write_paths=[],
        read_only_paths=[GATEWAY_DIR],
        restrict_ip=False,  # it reaches the fleet's hosts and answers the gateway's allow-list (its firewall)
        credential=f"{CLIENT_KEY_CREDENTIAL}:{CLIENT_KEY_FILE}",
        requires=[FIREWALL_UNIT] if exposed else [],
    )
    return unit_file(GATEWAY_UNIT, context), [key, models, config], rules


def _rules_context(settings: GatewaySettings) -> dict:
    return {"port": settings.port, "allow4": list(settings.allow4), "allow6": list(settings.allow6),
            "service": "the gateway"}


def _fingerprint(settings: GatewaySettings) -> str:
    """The gateway rules' fingerprint (exposure's rules_fingerprint): the deploy reloads a table without it."""
    return rules_fingerprint((EXPOSURE_TEMPLATES / "nftables.conf.j2").read_text(), _rules_context(settings))


def _firewall(settings: GatewaySettings):
    """The exposure role's rules and firewall unit for the gateway's port, in the table inet r1fleet-gateway."""
    nft = host.get_fact(Which, command="nft") or "/usr/sbin/nft"
    rules = files.template(
        name=f"Gateway firewall rules: port {settings.port} from {', '.join(settings.allow)} only",
        src=str(EXPOSURE_TEMPLATES / "nftables.conf.j2"), dest=RULES_FILE, user="root", group="root", mode="600",
        table=NFT_TABLE, fingerprint=_fingerprint(settings), **_rules_context(settings),
        jinja_env_kwargs=nft_settings(whitespace=False))
    unit = files.template(
        name="Gateway firewall unit", src=str(SHARED_TEMPLATES / "r1fleet-firewall.service.j2"),
        dest=FIREWALL_UNIT_PATH, user="root", group="root", mode="644", port=settings.port, rules_path=RULES_FILE,
        nft=nft, service_unit=GATEWAY_UNIT, table=NFT_TABLE, jinja_env_kwargs=unit_settings(whitespace=False))
    systemd.daemon_reload(name="Reload systemd for the gateway firewall unit", _if=unit.did_change)
    return rules


@deploy("Gateway")
def _activate(gateway: GatewayPlan, exposed: bool, unit, used: list, rules) -> None:
    """The firewall before the gateway binds the LAN; the gateway restarted only when one of its files changed."""
    if exposed:
        systemd.service(name="Load the gateway firewall", service=FIREWALL_UNIT, running=True, enabled=True)
        systemd.service(name="Reload the changed gateway firewall", service=FIREWALL_UNIT, reloaded=True,
                        _if=rules.did_change)
        load_rules(name="Reload the gateway firewall unless it holds the planned rules",
                   fingerprint=_fingerprint(gateway.settings), table=NFT_TABLE, unit=FIREWALL_UNIT)
    address = "127.0.0.1" if is_loopback(gateway.settings.listen) or gateway.settings.listen in ("0.0.0.0", "::") \
        else gateway.settings.listen
    converge_service(GATEWAY_UNIT, unit, used, f"http://{host_port(address, gateway.settings.port)}/health",
                     health_timeout_s=HEALTH_S, files_used=(CONFIG_FILE, MODELS_FILE, CLIENT_KEY_FILE))
