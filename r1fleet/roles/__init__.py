"""r1fleet's pyinfra roles: one module or folder per role, the pure decisions beside the operations, templates/
beside them; serve.py runs them for a host (serve_r1)."""
