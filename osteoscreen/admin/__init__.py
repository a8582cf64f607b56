"""Administration: the queries coordinators and administrators run (CLI `osteoscreen db`, dashboard)."""
