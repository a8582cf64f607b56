"""Alembic environment of the screening database, packaged inside osteoscreen so that an installed
(non-editable) node finds it. `osteoscreen db upgrade` and `Database(url)` run it through
``osteoscreen.store.db.upgrade``; docs/ARCHITECTURE.md ("Schema migrations") says how to add a revision."""
