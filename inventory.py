"""pyinfra inventory for r1fleet: the fleet file, validated before any host is contacted.

Which fleet: $R1FLEET_FLEET (a fleet file path, an Ansible inventory, or `lab`), else
inventory/fleet.yml. An invalid file stops the run here with a message naming the host, the
field and the fix; no connection is made.
"""

import sys

from r1fleet.errors import R1FleetError
from r1fleet.fleet.file import load_fleet

try:
    _fleet = load_fleet()
except R1FleetError as _error:
    print(f"r1fleet: the fleet file is invalid, nothing was deployed: {_error}", file=sys.stderr)
    raise SystemExit(2) from None

# Each module-level list is a pyinfra group: `r1fleet` (every host) plus the fleet file's groups.
globals().update(_fleet.pyinfra_groups())
