"""`r1fleet status` and `r1fleet endpoints`: what each host serves right now, and where clients reach it.

The room sits between verify and the CLI: it reaches and plans hosts with verify's own code
(r1fleet/verify/connect.py), so "what should this host serve" has one answer (r1fleet/lock/served.py).
"""
