"""The HTML run reports: spectra from real weights and a real init adapter, pages gathered
from run records, a real SQLite MLflow registry with several versions, and the pages opened
in a real headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import REPO, stage_settings
from mlflow import MlflowClient
from mlflow.entities import Metric

from milora.reporting.spectrum import pick_layers, weight_spectra
from milora.settings import Settings, load_settings
from tasks import registry
from tasks.html_report import REPORTS_DIR, html_report, main
from tasks.init import init

MODEL = "report-model"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAILURE = "stage validate failed: drop_02/train.jsonl row 3: empty_text (output is empty)"


def _version(
    client: MlflowClient, experiment: str, company: float, recall: float, decision: str
) -> tuple[str, str]:
    """A finished MLflow run with per-step loss and evaluation metrics, registered as a version;
    returns (version, run id)."""
    run = client.create_run(experiment).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("train/loss", 3.0 - 0.4 * step, now, step) for step in range(5)]
    metrics += [
        Metric("company.score", company, now, 0),
        Metric("recall.score", recall, now, 0),
        Metric("recall.base_score", 0.8, now, 0),
        Metric("recall.forgetting", 0.8 - recall, now, 0),
    ]
    client.log_batch(run, metrics=metrics)
    client.set_terminated(run, "FINISHED")
    version = client.create_model_version(MODEL, source=f"runs:/{run}/adapter", run_id=run)
    client.set_model_version_tag(MODEL, version.version, registry.DECISION_TAG, decision)
    return str(version.version), run


def _record(settings: Settings, stamp: str, status: str, run: str | None = None, **facts) -> Path:
    """A run record as the flow's report step writes it (``run``: the flow run's name)."""
    if run is not None:
        facts["flow_run"] = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, run)), "name": run}
    path = settings.path("outputs/runs") / f"{stamp}-{status.split()[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    when = time.mktime(time.strptime(stamp, "%Y%m%dT%H%M%S"))
    path.write_text(json.dumps({"status": status, "seconds": 12.5, "time": when, **facts}))
    return path


def _rows(company: float, recall: float) -> list[dict]:
    return [
        {"suite": "company", "metric": "f1", "n": 6, "base": 0.1, "adapter": company, "forgetting": None},
        {
            "suite": "recall",
            "metric": "starts_with",
            "n": 6,
            "base": 0.8,
            "adapter": recall,
            "forgetting": 0.8 - recall,
        },
    ]


@pytest.fixture(scope="module")
def project(tmp_path_factory, chat_model_dir) -> Settings:
    """A project with a real MiLoRA init adapter, a loss table, a registry of two versions
    (v1 champion, v2 rejected) and three run records (promoted, rejected, failed)."""
    root = tmp_path_factory.mktemp("report-project")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.delenv("MLFLOW_REGISTRY_URI", raising=False)
        settings = stage_settings(
            root,
            chat_model_dir,
            **{
                "train.rank": 4,
                "train.cache_dir": "svd-cache",
                "registry.tracking_uri": "sqlite:///mlflow.db",
                "registry.model_name": MODEL,
                "registry.gate.max_forgetting": 0.3,
            },
        )
        # Every setting written out, so `python -m tasks.html_report --params` sees the same.
        (root / "params.yaml").write_text(yaml.safe_dump(settings.model_dump(by_alias=True, mode="json")))
        settings = load_settings(root / "params.yaml")
        init(settings)
        run_dir = settings.path(settings.train.run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "loss.csv").write_text("step,loss,learning_rate\n1,2.5,0.001\n2,2.1,0.001\n3,1.7,0.001\n")
        client = MlflowClient(registry.tracking_uri(settings))
        experiment = client.get_experiment_by_name(settings.registry.experiment).experiment_id
        client.create_registered_model(MODEL)
        v1, run1 = _version(client, experiment, 0.6, 0.7, "promoted")
        v2, run2 = _version(client, experiment, 0.4, 0.3, "rejected")
        client.set_registered_model_alias(MODEL, registry.CHAMPION, v1)
        lineage = {"data_version": "d" * 32 + ".dir", "git_commit": "0123abcd", "base_model": chat_model_dir}
        _record(
            settings,
            "20261101T030000",
            "promoted",
            "calm-otter",
            stages={"ingest": True, "train": True},
            registration={"version": v1, "run_id": run1, "new": True},
            decision={"decision": "promoted", "reasons": ["first model: no champion yet"], "previous": None},
            lineage=lineage,
            metrics=_rows(0.6, 0.7),
        )
        _record(
            settings,
            "20261102T030000",
            "rejected by the gate",
            "brave-heron",
            registration={"version": v2, "run_id": run2, "new": True},
            decision={
                "decision": "rejected",
                "reasons": ["company score 0.4000 >= champion 0.6000 + min gain 0.0000 = 0.6000: FAILED"],
                "previous": v1,
            },
            lineage=lineage,
            metrics=_rows(0.4, 0.3),
        )
        _record(
            settings,
            "20261103T030000",
            "failed",
            "grumpy-moth",
            stages={"ingest": True},
            error="stage 'validate' failed (exit 1):\n" + FAILURE,
        )
        yield settings


def test_spectrum_marks_the_minor_components_the_init_adapter_holds(project, chat_model_dir, tmp_path):
    init_dir = project.path(project.train.init_dir)
    spectra = weight_spectra(chat_model_dir, ["q_proj", "down_proj"], init_dir, count=4, cache_dir=tmp_path)
    names = [s.name for s in spectra]
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    for spectrum in spectra:
        n = len(spectrum.values)
        assert n == min(spectrum.shape) and spectrum.values == sorted(spectrum.values, reverse=True)
        assert spectrum.method == "milora" and spectrum.adapted == (n - 4, n)
        # The init adapter holds exactly the 4 smallest singular values of the stock weight.
        assert spectrum.adapter_values == pytest.approx(spectrum.values[-4:], rel=1e-5)
    assert len(list(tmp_path.glob("*.json"))) == 4  # cached by content hash
    again = weight_spectra(chat_model_dir, ["q_proj", "down_proj"], init_dir, count=4, cache_dir=tmp_path)
    assert [s.values for s in again] == [s.values for s in spectra]
    plain = weight_spectra(chat_model_dir, ["q_proj"], None, count=2)
    assert all(s.adapted is None and not s.adapter_values for s in plain)


def test_pick_layers_spreads_over_blocks_and_kinds():
    names = [
        f"model.layers.{i}.{kind}"
        for i in range(12)
        for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    assert pick_layers(names, ["q_proj", "v_proj", "down_proj"], 4) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.11.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.11.mlp.down_proj",
    ]
    assert pick_layers(names, ["o_proj"], 4) == []


def _plot_titles(html: str) -> list[str]:
    """The titles of the page's plots, in order (each SVG is labelled with its title)."""
    return re.findall(r'<svg\b[^>]*\baria-label="([^"]*)"', html)


def _svg(html: str, title: str) -> str:
    start = html.index(f'aria-label="{title}"')
    return html[start : html.index("</svg>", start)]


def test_report_pages_and_index_from_records_and_registry(project, capsys):
    assert main(["--params", str(project.root / "params.yaml"), "--rebuild"]) == 0
    index_path = Path(capsys.readouterr().out.strip())
    assert index_path == project.path(REPORTS_DIR) / "index.html"
    index = index_path.read_text()
    pages = sorted((index_path.parent / "runs").glob("*.html"))
    assert [p.stem.split("-", 1)[1] for p in pages] == ["promoted", "rejected", "failed"]
    # Every run is listed with a link to its page; the failed one with its reason.
    for page in pages:
        assert f'href="runs/{page.name}"' in index
    # A failure's whole reason, not just its first line (which says only which stage failed).
    assert "stage &#x27;validate&#x27; failed (exit 1):\n" + FAILURE in index
    assert "company score 0.4000 &gt;= champion" in index  # the gate's failed condition
    assert "Champion: version 1" in index
    assert _plot_titles(index) == ["metrics across model versions", "retraining across model versions"]
    chain = _svg(index, "retraining across model versions")  # cost, truth, stale, forgetting per version
    for panel in ("training seconds", "primary score (current truth)", "max forgetting since the stock base"):
        assert f">{panel}<" in chain, panel
    assert "<th>start</th><th>parent</th>" in index.replace("\n", "")
    # Self-contained: no script, nothing fetched.
    for html in [index, *(p.read_text() for p in pages)]:
        assert "<script" not in html and not re.search(r"(src|href)=\"https?:|url\(http|@import", html)

    promoted, rejected, failed = (p.read_text() for p in pages)
    # loss (from the MLflow run), scores vs champion, forgetting, spectrum, version history
    drawn = [
        "training loss",
        "evaluation scores per suite",
        "forgetting on retention suites",
        "singular-value spectrum",
        "metrics across model versions",
    ]
    assert _plot_titles(promoted) == drawn and _plot_titles(rejected) == drawn
    history = _svg(promoted, "metrics across model versions")
    assert ">company<" in history and ">recall<" in history  # a panel per suite
    ticks = re.findall(r"<text[^>]*>([^<]*)</text>", history)
    assert ticks[: ticks.index("model version")] == ["1", "2"]  # a tick per version, none fractional
    assert "champion v1" in rejected  # compared with the champion it was gated against
    assert "model.layers.1.mlp.down_proj" in promoted and "60..63" in promoted  # minor band of 64, r=4
    # No loss, no evaluation, and no spectrum: it failed before its init stage ran.
    assert _plot_titles(failed) == ["metrics across model versions"]
    assert FAILURE in failed and "no training in this run" in failed
    assert "the run failed before the init stage ran" in failed


def test_report_just_after_a_run_reads_the_workspace(project):
    record = _record(
        project, "20261104T030000", "nothing new", stages={"train": False}, metrics=_rows(0.6, 0.7)
    )
    try:
        page = html_report(project, record)
        html = page.read_text()
        # loss (from loss.csv), scores, forgetting, history; no spectrum: nothing was trained
        assert page.name == f"{record.stem}.html"
        assert _plot_titles(html) == [
            "training loss",
            "evaluation scores per suite",
            "forgetting on retention suites",
            "metrics across model versions",
        ]
        assert "nothing was trained in this run" in html
        assert "champion v1" in html  # no gate in this run: compared with the champion now
        assert "training loss not available" not in html
        index = (project.path(REPORTS_DIR) / "index.html").read_text()
        assert f'href="runs/{page.name}"' in index
    finally:
        record.unlink()
        (project.path(REPORTS_DIR) / "runs" / f"{record.stem}.html").unlink(missing_ok=True)


# --------------------------------------------------------------------------- browser
def _chromium() -> str | None:
    for candidate in (os.environ.get("MILORA_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture
def served(project):
    """The reports folder on a static HTTP server on 127.0.0.1, stopped after the test."""
    html_report(project, rebuild=True)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(project.path(REPORTS_DIR)))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _plots(page) -> list[dict]:
    return page.eval_on_selector_all(
        "figure.plot svg",
        "els => els.map(e => { const r = e.getBoundingClientRect(); return {w: r.width, h: r.height}; })",
    )


@contextlib.contextmanager
def chromium_page(tmp_path: Path):
    """A page of the system's headless Chromium (skipped where there is none)."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium not found (/usr/bin/chromium or MILORA_CHROMIUM); `make test` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_report_renders_in_headless_chromium(served, tmp_path):
    problems: list[str] = []
    with chromium_page(tmp_path) as page:
        page.on(
            "console",
            lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))

        assert page.goto(f"{served}/index.html").status == 200
        assert page.title() == "retrain runs"
        rows = page.locator("table").first.locator("tbody tr")
        assert rows.count() == 3
        assert FAILURE in rows.filter(has_text="grumpy-moth").inner_text()
        plots = _plots(page)
        assert len(plots) == 2 and all(p["w"] > 100 and p["h"] > 100 for p in plots)  # history, retraining

        page.click("text=calm-otter")
        page.wait_for_load_state()
        assert page.url.endswith("-promoted.html")
        assert "promoted" in page.locator("h1").inner_text()
        plots = _plots(page)
        assert len(plots) == 5 and all(p["w"] > 100 and p["h"] > 100 for p in plots)

        page.click("text=all runs")
        page.wait_for_load_state()
        page.click("text=grumpy-moth")
        page.wait_for_load_state()
        assert FAILURE in page.locator("pre").inner_text()
        assert len(_plots(page)) == 1  # the version history; no spectrum: failed before init
    assert problems == []


# --------------------------------------------------------------------------- dvc plots show
def test_dvc_plots_page_is_the_committed_offline_template():
    """`.dvc/config` points `dvc plots show` at the committed page, which is what
    tasks.plots_page writes: the charting scripts inline, DVC's CDN tags with nowhere to go."""
    from dvc.repo import Repo

    from tasks.plots_page import TEMPLATE, render_template

    with Repo(str(REPO)) as repo:
        assert repo.config["plots"]["html_template"] == TEMPLATE.name
    committed = (REPO / TEMPLATE).read_text(encoding="utf-8")
    assert committed == render_template(), "run `python -m tasks.plots_page` and commit the page"
    assert "{plot_divs}" in committed and "{scripts}" not in committed
    assert not re.search(r"<script[^>]+src=", committed)


def test_dvc_plots_show_renders_offline_in_headless_chromium(tmp_path):
    """A real `dvc plots show` with the project's DVC config draws the loss curve in Chromium
    with every network request blocked (and none made)."""
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    for name in ("config", "plots_page.html"):
        shutil.copy(REPO / ".dvc" / name, project / ".dvc" / name)
    (project / "loss.csv").write_text("step,loss\n" + "".join(f"{s},{3 / s:.4f}\n" for s in range(1, 21)))
    (project / "dvc.yaml").write_text("plots:\n  - loss.csv:\n      x: step\n      y: loss\n")
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", "plots"],
        cwd=project,
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    assert done.returncode == 0, done.stderr
    page_file = project / "plots" / "index.html"
    assert "cdn.jsdelivr" not in page_file.read_text(encoding="utf-8")

    requests: list[str] = []
    problems: list[str] = []
    with chromium_page(tmp_path) as page:
        page.route(
            re.compile(r"^(?!file:).*"), lambda route: (requests.append(route.request.url), route.abort())
        )
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(page_file.as_uri())
        drawn = page.wait_for_selector(".vega-embed canvas, .vega-embed svg", timeout=20_000)
        box = drawn.bounding_box()
        assert box and box["width"] > 100 and box["height"] > 100
    assert requests == [] and problems == []
