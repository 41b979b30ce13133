"""r1fleet: turn a home-lab fleet into DeepSeek-R1 servers (probe -> hardware -> plan -> roles -> verify)."""

__version__ = "0.1.0"
