"""The automation that docs/prefect.md shows is one Prefect accepts, and it triggers on ipaflow's failed-rows
event."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

DOCS = Path(__file__).resolve().parents[2] / "docs" / "prefect.md"


def test_the_documented_automation_is_valid_and_expects_the_failed_rows_event():
    from prefect.events.schemas.automations import AutomationCore

    from ipaflow.flows.monitoring import FAILED_ROWS_EVENT

    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S) if "failed-rows.yaml" in b]
    automation = AutomationCore.model_validate(yaml.safe_load(block))
    assert automation.trigger.expect == {FAILED_ROWS_EVENT}
    assert [action.type for action in automation.actions] == ["send-notification"]
