"""The node's HTTP side: Prometheus metrics (``metrics``), computed from the shared database."""
