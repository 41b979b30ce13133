"""pyinfra job: remove everything r1fleet put on the inventory's hosts; the models stay unless asked.

    pyinfra inventory.py deploy/remove.py --dry                         # what would be removed, nothing changes
    pyinfra inventory.py deploy/remove.py                               # show, confirm, remove
    pyinfra inventory.py deploy/remove.py --limit gpu-3060              # one host
    pyinfra inventory.py deploy/remove.py --data remove_models=true     # the models too

The job itself is r1fleet.deploy.remove.remove_r1 (docs/remove.md says what it removes and what it keeps).
"""

from r1fleet.deploy.remove import remove_r1

remove_r1()
