"""pyinfra inventory for r1fleet: the fleet file, validated before any host is contacted.

Which fleet: $R1FLEET_FLEET (a fleet file path, an Ansible inventory, or `lab`), else inventory/fleet.yml.
The same inventory from the installed package: `pyinfra r1fleet.deploy.inventory:fleet ...`.
"""

from r1fleet.deploy.inventory import fleet

# Each module-level list is a pyinfra group: `r1fleet` (every host) plus the fleet file's groups.
globals().update(fleet())
