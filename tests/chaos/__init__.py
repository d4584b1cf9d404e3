"""The reliability suite: mixed workloads under killed pool children and broker outages, and bad
input of every kind (``nox -s chaos`` runs it at full size, broker restarts included)."""
