"""The MLflow UI shows what a training run sent to the tracking server: the run page,
its artifacts, the logged model's files and the registered model with its alias, in
headless Chromium driven by Playwright.

Needs `/usr/bin/chromium` (`apt-get install chromium`; `.ci/run` installs it) and the
`playwright` package; never `playwright install`. Every page visited is screenshotted
into the test's tmp_path; a failed check also saves the page's text there.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_program
from mlflow_server import ServerRun

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The first page also loads the app's JavaScript; on a busy 2-core machine that takes a while.
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    require_program(str(CHROMIUM), "apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def visit(page, server_run: ServerRun, tmp_path: Path):
    """`with visit(name, fragment) as page:` opens `<server>/#/<fragment>`; on leaving, the
    page is saved as `tmp_path/<name>.png`, or, if a check failed, as `<name>-failed.png`
    with its visible text in `<name>-failed.txt`."""

    @contextlib.contextmanager
    def _visit(name: str, fragment: str) -> Iterator:
        # Never wait for "networkidle": the app keeps polling. Each check waits for its content.
        page.goto(f"{server_run.url}/#/{fragment}", wait_until="domcontentloaded")
        try:
            yield page
        except Exception:
            page.screenshot(path=tmp_path / f"{name}-failed.png", full_page=True)
            (tmp_path / f"{name}-failed.txt").write_text(page.locator("body").inner_text(timeout=5_000))
            print(f"{page.url}: see {tmp_path / name}-failed.png and .txt")  # shown with the failure
            raise
        page.screenshot(path=tmp_path / f"{name}.png", full_page=True)

    return _visit


def shown(locator, what: str) -> None:
    """Wait until `locator` is visible; fail naming `what` was missing."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.first.wait_for(state="visible")
    except PlaywrightTimeout:
        raise AssertionError(f"{what} not shown within {WAIT_MS / 1000:.0f} s") from None


def assert_artifacts_listed(page, names: list[str]) -> None:
    """Every artifact path in `names` (e.g. `config.yaml`, `plots/confusion_matrix.png`)
    appears in the page's artifact tree; collapsed directories on the way are expanded."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for path in names:
        scope = page  # the tree, then the <li> of each directory on the path
        for depth, part in enumerate(path.split("/")):
            node = scope.locator(f'[data-testid="artifact-tree-node"][artifact-name="{part}"]').first
            try:
                # Actionability, not mere visibility: a folder expands with an animation,
                # during which its children exist but are clipped. A trial hover waits until
                # the node is visible, stable and on top at its own position.
                node.hover(trial=True)
            except PlaywrightTimeout:
                listed = page.get_by_test_id("artifact-tree-node").all_inner_texts()
                raise AssertionError(f"artifact {path!r}: {part!r} not listed; the tree shows {listed}") from None
            if depth < path.count("/"):  # a directory: its <li> holds child <li>s once expanded
                scope = node.locator("xpath=ancestor::li[1]")
                if scope.locator("li").count() == 0:
                    node.click()


def test_run_page_shows_name_params_and_metrics(visit, server_run: ServerRun) -> None:
    params = {param["key"] for param in server_run.run["data"]["params"]}
    metrics = {metric["key"] for metric in server_run.run["data"]["metrics"]}
    # The counts the page must show are those of a whole run: the resolved config and what the run adds,
    # the per-epoch metrics and gradient norms, the exported model's scores.
    assert {"optimizer.lr", "trainer.epochs", "dataset.batch_size", "data.version", "data.train_examples",
            "model.parameters", "precision.resolved_policy"} <= params, sorted(params)
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "train_grad_norm_max",
            "final_val_accuracy", "final_val_loss", "test_accuracy", "test_loss"} <= metrics, sorted(metrics)
    n_params, n_metrics = len(params), len(metrics)
    with visit("run", f"experiments/{server_run.experiment_id}/runs/{server_run.run_id}") as page:
        shown(page.get_by_test_id("runs-header").get_by_text(server_run.run["info"]["run_name"]), "the run name")
        shown(page.get_by_text(f"Parameters ({n_params})", exact=True), f"Parameters ({n_params})")
        shown(page.get_by_text(f"Metrics ({n_metrics})", exact=True), f"Metrics ({n_metrics})")
        shown(page.get_by_role("row").filter(has_text="optimizer.lr").filter(has_text="0.001"),
              "the optimizer.lr row")
        shown(page.get_by_role("cell", name="test_accuracy", exact=True), "the test_accuracy metric")
        shown(page.get_by_text("Logged models (1)", exact=True), "the logged model")


def test_run_artifacts_tab_lists_files_and_plots(visit, server_run: ServerRun) -> None:
    # Every figure pipeline/tracking/report.py logs under plots/; architecture.png needs Graphviz.
    require_program("dot", "apt-get install graphviz")
    plots = ["learning_curves", "confusion_matrix", "grad_norm", "learning_rate", "architecture"]
    expected = ["config.yaml", "model_summary.txt", "train.log", *(f"plots/{name}.png" for name in plots)]
    with visit("run_artifacts", f"experiments/{server_run.experiment_id}/runs/{server_run.run_id}/artifacts") as page:
        assert_artifacts_listed(page, expected)


def test_logged_model_artifacts_list_the_saved_model(visit, server_run: ServerRun) -> None:
    # MLflow 3 shows a model's files on its LoggedModel page, not on the run's Artifacts tab.
    (output,) = server_run.run["outputs"]["model_outputs"]
    with visit("model_artifacts", f"experiments/{server_run.experiment_id}/models/{output['model_id']}/artifacts") \
            as page:
        assert_artifacts_listed(page, ["MLmodel", "requirements.txt", "data/model/saved_model.pb"])


def test_registered_model_shows_version_1_as_champion(visit, server_run: ServerRun) -> None:
    # An alias renders as "@<non-breaking space>champion".
    champion = re.compile(r"@\s*champion")
    with visit("registered_model", "models/digits-mlp") as page:
        version_row = page.get_by_role("row").filter(has_text="Version 1")
        shown(version_row, "the row of version 1")
        shown(version_row.get_by_text(champion), "@champion on version 1")
    with visit("model_version", "models/digits-mlp/versions/1") as page:
        shown(page.get_by_text(champion), "@champion on the version page")
        shown(page.get_by_role("link", name=server_run.run["info"]["run_name"]), "the source run link")
        # The model card (the version's Markdown description), rendered: its heading and its serving line.
        shown(page.get_by_role("heading", name="digits-mlp v1"), "the model card's heading")
        shown(page.get_by_text(re.compile(r"mlflow models serve -m models:/digits-mlp/1 --env-manager local")),
              "the model card's serving command")
