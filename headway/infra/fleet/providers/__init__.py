"""Where replicas run: local processes (the embedded default) or a Ray cluster."""

from headway.infra.fleet.providers.base import Launch, Provider, replica_command, replica_env

__all__ = ["Launch", "Provider", "replica_command", "replica_env"]
