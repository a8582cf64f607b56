"""Watching the model in service: drift per scanner group (signals: the statistics; watch: the database side)."""
