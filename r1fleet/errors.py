"""Errors a user sees: each names the host (or file), the field, and the fix."""

from __future__ import annotations


class R1FleetError(Exception):
    """A problem with the user's input or environment, printed without a traceback."""

    def __init__(self, message: str, *, host: str | None = None, field: str | None = None, fix: str | None = None):
        self.message, self.host, self.field, self.fix = message, host, field, fix
        parts = []
        if host:
            parts.append(f"host {host}")
        if field:
            parts.append(f"field {field}")
        prefix = (": ".join(parts) + ": ") if parts else ""
        text = prefix + message
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)


class ProbeError(R1FleetError):
    """A probe document that cannot be understood."""


class FleetError(R1FleetError):
    """A fleet file that does not validate."""


class DeployError(R1FleetError):
    """A host cannot be deployed as planned (missing sha256, unsupported arch, ...)."""
