"""The macOS role's names, decided without a host: its LaunchDaemons, service user and paths."""

from __future__ import annotations

LABEL = "com.r1fleet.ollama"
PLIST = f"/Library/LaunchDaemons/{LABEL}.plist"
LOAD_LABEL = "com.r1fleet.ollama-load"
LOAD_PLIST = f"/Library/LaunchDaemons/{LOAD_LABEL}.plist"
WIRED_LABEL = "com.r1fleet.iogpu-wired-limit"
WIRED_PLIST = f"/Library/LaunchDaemons/{WIRED_LABEL}.plist"
USER = "_r1ollama"
REAL_NAME = "r1fleet Ollama"  # the user's and its group's: r1fleet made them
HOME = "/usr/local/var/r1fleet"
LOG_FILE = "/Library/Logs/r1fleet/ollama.log"
RELEASE_ROOT = "/usr/local/lib/r1fleet"
BREW_BINARY = "/opt/homebrew/bin/ollama"     # Homebrew's prefix on Apple Silicon
