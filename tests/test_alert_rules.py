"""The example alerting rules parse, and every metric they use is one /metrics serves."""
from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from osteoscreen.config import Drift
from osteoscreen.monitor import watch
from osteoscreen.store.db import Database
from osteoscreen.web.metrics import render

from .seed import seed

RULES = Path(__file__).resolve().parent.parent / "docker" / "prometheus-alerts.yaml"


def test_alert_rules_use_served_metrics(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    seed(url, tmp_path / "outbox")
    db = Database(url)
    with db.session() as s:
        watch.check_all(s, Drift(), ["Acme|FP-1"])  # a configured group: its first check
    body, _ = render(db, ["osteoporosis"])
    db.dispose()
    served = {s.name for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}
    rules = yaml.safe_load(RULES.read_text())
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
            used |= set(re.findall(r"osteoscreen_[a-z_]+", rule["expr"]))
    assert {"osteoscreen_drift_status", "osteoscreen_database_up"} <= used
    assert used <= served, used - served
