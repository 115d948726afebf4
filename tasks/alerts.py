"""Failure alerting: the Prefect automations of ``automations.yaml`` applied to a server.

``python -m tasks.alerts [--file automations.yaml] [--url URL] [--dry-run]`` (``make alerts``)

Prefect's server watches flow-run events and runs an automation's actions itself; a
``call-webhook`` action posts to a saved Webhook block. Applying saves that block with the
URL from ``$MILORA_ALERT_WEBHOOK_URL`` (or ``--url``; kept as a secret on the server), puts
its id into every action that names it, and creates each automation, replacing one of the
same name, so applying twice leaves one copy. Needs ``PREFECT_API_URL`` of a long-running
server (``make ui`` starts one): the temporary server of a plain ``make run`` has no one to
alert.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from milora.yamlfile import YamlBudgetError, safe_load_bounded
from tasks import run_command

logger = logging.getLogger(__name__)

DEFAULT_FILE = "automations.yaml"


class AlertsError(ValueError):
    """The automations file or the alert settings cannot be applied as they are."""


def load_definitions(path: Path) -> dict[str, Any]:
    """``automations.yaml``: the webhook block to save and the automations that use it."""
    try:
        data = safe_load_bounded(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, YamlBudgetError) as error:
        raise AlertsError(f"{path}: cannot read automations ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("automations"), list) or not data["automations"]:
        raise AlertsError(f"{path}: expected a mapping with a non-empty 'automations' list")
    webhook = data.get("webhook") or {}
    if not webhook.get("block") or not webhook.get("url_env"):
        raise AlertsError(f"{path}: 'webhook' needs 'block' (a block name) and 'url_env' (a variable name)")
    return data


def resolve(automations: list[dict[str, Any]], blocks: dict[str, str]) -> list[Any]:
    """Validated Prefect automations, each action's ``webhook: <block>`` replaced by that
    block's ``block_document_id``."""
    from prefect.events.schemas.automations import AutomationCore

    resolved = []
    for automation in automations:
        actions = []
        for action in automation.get("actions") or []:
            action = dict(action)
            name = action.pop("webhook", None)
            if name is not None:
                if name not in blocks:
                    raise AlertsError(
                        f"automation {automation.get('name')!r}: no webhook block {name!r} to use"
                    )
                action["block_document_id"] = blocks[name]
            actions.append(action)
        try:
            resolved.append(AutomationCore.model_validate({**automation, "actions": actions}))
        except ValueError as error:
            raise AlertsError(f"automation {automation.get('name')!r}: {error}") from None
    return resolved


def apply(path: Path, url: str | None = None) -> list[dict[str, str]]:
    """Save the webhook block and create (or replace) every automation of ``path`` on the
    server at ``PREFECT_API_URL``; returns each automation's name and id."""
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    data = load_definitions(path)
    webhook = data["webhook"]
    url = url or os.environ.get(webhook["url_env"])
    if not url:
        raise AlertsError(
            f"set {webhook['url_env']} (or --url) to the webhook that should receive the alerts"
        )
    if not PREFECT_API_URL.value():
        raise AlertsError(
            "PREFECT_API_URL is not set: automations live on a running Prefect server "
            "(make ui starts one on http://127.0.0.1:4200/api)"
        )
    automations = data["automations"]
    resolve(automations, {webhook["block"]: "00000000-0000-0000-0000-000000000000"})  # check before saving
    block_id = Webhook(url=url, method="POST", headers={"Content-Type": "application/json"}).save(
        webhook["block"], overwrite=True
    )
    applied = []
    with get_client(sync_client=True) as client:
        for automation in resolve(automations, {webhook["block"]: str(block_id)}):
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            automation_id = client.create_automation(automation)
            logger.info("automation %s applied (%s)", automation.name, automation_id)
            applied.append({"name": automation.name, "id": str(automation_id)})
    return applied


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.alerts", description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=Path(DEFAULT_FILE), help="automations file")
    parser.add_argument("--url", help="webhook URL (default: the variable the file names)")
    parser.add_argument("--dry-run", action="store_true", help="validate the file; change nothing")
    args = parser.parse_args(argv)
    try:
        if args.dry_run:
            data = load_definitions(args.file)
            for automation in resolve(data["automations"], {data["webhook"]["block"]: "0" * 32}):
                print(f"{automation.name}: valid")
            return 0
        for automation in apply(args.file, args.url):
            print(f"{automation['name']}: applied ({automation['id']})")
    except AlertsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_command(main)
