"""pyinfra deploy for r1fleet: probe -> plan -> roles, for every host of the inventory.

    pyinfra inventory.py deploy.py            # show the plan and the changes, ask, apply
    pyinfra inventory.py deploy.py --dry      # show what would change, change nothing
    pyinfra -y inventory.py deploy.py --data rehearsal=true   # stand-in model in the planned slot

The deploy itself is r1fleet.deploy.serve.serve_r1, which a pyinfra user's own deploy file calls the same way.
"""

from r1fleet.deploy.serve import serve_r1

serve_r1()
