"""Failure alerting on a real Prefect server on 127.0.0.1: ``automations.yaml`` applied by
``python -m tasks.alerts``, read back, and a failed ``retrain`` flow run posting to a webhook
receiver on 127.0.0.1 (a failed run of another flow posts nothing)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import BIN, free_port, stop, wait_healthy

from milora.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]
FAILING_FLOWS = """
from prefect import flow

@flow(name="other")
def other():
    raise RuntimeError("not a retrain")

@flow(name="retrain", flow_run_name="alert-check")
def retrain():
    raise RuntimeError("stage validate failed: bad drop")

for run in (other, retrain):
    try:
        run()
    except RuntimeError:
        pass
"""


@pytest.fixture
def receiver():
    """A webhook endpoint on 127.0.0.1 that queues every POSTed JSON body."""
    bodies: queue.Queue = queue.Queue()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.put(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def prefect_server(tmp_path):
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    port = free_port()
    with open(tmp_path / "prefect.log", "w") as log:
        server = subprocess.Popen(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            wait_healthy(f"http://127.0.0.1:{port}/api/health", server)
            yield {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        finally:
            stop(server)


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_failed_retrain_run_posts_to_the_alert_webhook(prefect_server, receiver, tmp_path):
    url, bodies = receiver
    env = {**prefect_server, "MILORA_ALERT_WEBHOOK_URL": url}
    missing = _run({**prefect_server}, "-m", "tasks.alerts")
    assert missing.returncode == 2 and "MILORA_ALERT_WEBHOOK_URL" in missing.stderr
    for _ in range(2):  # applying again replaces, never duplicates
        done = _run(env, "-m", "tasks.alerts")
        assert done.returncode == 0 and "milora-retrain-failed: applied" in done.stdout, done.stderr[-2000:]

    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            found = client.read_automations_by_name("milora-retrain-failed")
        block = Webhook.load("milora-alerts")
    assert len(found) == 1 and found[0].enabled
    trigger, action = found[0].trigger, found[0].actions[0]
    assert {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"} <= set(trigger.expect)
    assert action.type == "call-webhook" and str(action.block_document_id) == str(block._block_document_id)
    assert block.url.get_secret_value() == url

    started = time.time()
    flows = _run(env, "-c", FAILING_FLOWS)
    assert flows.returncode == 0, flows.stderr[-3000:]
    alert = bodies.get(timeout=60)
    assert alert["flow_run"] == "alert-check" and alert["state"] == "Failed"
    assert "bad drop" in alert["message"] and "alert-check" in alert["text"]
    time.sleep(max(0.0, 5 - (time.time() - started)))
    assert bodies.empty()  # the other flow's failure is not a retrain failure
