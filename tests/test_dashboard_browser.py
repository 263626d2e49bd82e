"""The live dashboard in a real headless Chromium, on a real run (Ray, vLLM on CPU, FSDP2 over gloo); two
runs overlaid and the exported file, on run directories written by tests/test_dashboard.py's `write_run`.

Needs Debian's chromium and chromedriver (`apt-get install -y chromium chromium-driver`) and selenium (the
test extra). Saves screenshots to each test's tmp dir (and to docs/dashboard.png and docs/dashboard-compare.png
with STREAMRL_UPDATE_SCREENSHOT=1).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from rl.core.config import load_recipe
from rl.controller import Controller
from rl.dashboard.labels import metric_label
from rl.metrics import read_metrics, read_status

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
INSTALL = ("install them with: apt-get install -y chromium chromium-driver (Debian's packages; root or sudo), "
           "and selenium with: pip install -e '.[test]'")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1500,1000",
                # a desktop's mouse: headless Chromium reports no hover (`(hover: none)`), and plotly then shows
                # every chart's toolbar always, as no user with a mouse sees it
                "--blink-settings=primaryHoverType=2,availableHoverTypes=2,primaryPointerType=4,availablePointerTypes=4"]
TOTAL_STEPS = 60  # enough steps that the page is open while the run goes on (a step is ~0.2 s on 2 cores)

TRACES = "return (document.getElementById(arguments[0]).data || []).map(t => [t.name, (t.x || []).length]);"
STATE = "const s = window.streamrlDashboard; return s && {snapshots: s.snapshots, deltas: s.deltas, " \
        "renders: s.renders, metrics: s.runs.map(r => r.metrics.length), samplesShown: s.samplesShown};"
# the right-hand axis of a chart as drawn: its tick mode, tick step and tick values
RIGHT_AXIS = "const a = document.getElementById(arguments[0])._fullLayout.yaxis2; " \
             "return [a.tickmode, a.dtick, a._vals.map(v => v.x)];"
# the toolbar's setting, and how visible its buttons are while the mouse is elsewhere
TOOLBAR = "const g = document.getElementById(arguments[0]); return [g._context.displayModeBar, " \
          "[...g.querySelectorAll('.modebar-group')].map(e => getComputedStyle(e).opacity)];"


def start_chromium(profile: Path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(f"the dashboard browser test needs Debian's chromium and chromedriver on PATH "
                    f"(found chromium={chromium}, chromedriver={driver}); {INSTALL}")
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail(f"the dashboard browser test needs selenium; {INSTALL}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    browser = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
    browser.set_page_load_timeout(60)
    browser.set_script_timeout(30)
    return browser


def until(browser, timeout: float, what: str, fn) -> Any:
    """Selenium's wait, failing with what was awaited and the page's state."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda b: fn(b))
    except TimeoutException:
        raise AssertionError(f"waited {timeout} s for {what}; page state: {browser.execute_script(STATE)}, "
                             f"console: {browser.get_log('browser')[-5:]}") from None


def dashboard_url(run_dir: Path, runner: threading.Thread, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        url = read_status(run_dir).get("dashboard_url")
        if url:
            return url
        assert runner.is_alive(), "the run ended before MetricsLogger wrote status.json with the dashboard URL"
        time.sleep(0.1)
    raise AssertionError(f"no dashboard_url in {run_dir / 'status.json'} within {timeout} s of the run starting")


def traces(browser, chart: str) -> dict[str, int]:
    return dict(browser.execute_script(TRACES, chart))


def assert_round_ticks(browser, chart: str) -> None:
    """The right axis has its own round ticks: multiples of 1, 2 or 5 times a power of ten."""
    mode, dtick, ticks = browser.execute_script(RIGHT_AXIS, chart)
    assert mode == "auto" and ticks, (chart, mode, ticks)
    mantissa = float(dtick) / 10 ** math.floor(math.log10(float(dtick)))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 5)), (chart, dtick, ticks)
    assert all(math.isclose(t / float(dtick), round(t / float(dtick)), abs_tol=1e-6) for t in ticks), (chart, dtick, ticks)


def assert_toolbar_on_hover_only(browser, chart: str) -> None:
    mode, opacities = browser.execute_script(TOOLBAR, chart)
    assert mode == "hover" and opacities and set(opacities) == {"0"}, (chart, mode, opacities)


def screenshot(browser, tmp_path: Path, name: str) -> Path:
    """The whole page (the window grown until it fits) to tmp_path/name, and to docs/ on request."""
    for _ in range(3):  # grow the window until the whole page fits (the window's frame takes some height)
        fit = browser.execute_script("return [document.documentElement.scrollHeight, window.innerHeight]")
        if fit[1] >= fit[0]:
            break
        browser.set_window_size(1500, browser.get_window_size()["height"] + fit[0] - fit[1] + 20)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(1.0)  # plotly re-lays out the charts for the new size (a bounded pause, nothing awaited)
    shot = tmp_path / name
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 50_000
    if os.environ.get("STREAMRL_UPDATE_SCREENSHOT"):  # refresh the docs' picture on request only
        shutil.copyfile(shot, DOCS / name)
    print(f"dashboard screenshot: {shot}" + (f" and {DOCS / name}" if os.environ.get("STREAMRL_UPDATE_SCREENSHOT") else ""))
    return shot


def expected_points(records: list[dict], key: str) -> int:
    return sum(1 for r in records if isinstance(r.get(key), (int, float)) and r[key] == r[key])


@pytest.mark.slow
def test_live_dashboard_in_chromium(ray_session, tiny_model, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    run_dir = tmp_path / "run"
    recipe = load_recipe("recipes/cpu_default.yaml", [
        f"model.path={tiny_model}", f"logging.run_dir={run_dir}", "logging.progress=false", "logging.name=browser-test",
        "logging.dashboard=true", "logging.dashboard_host=127.0.0.1", f"trainer.total_steps={TOTAL_STEPS}",
        "trainer.batch_groups=2", "rollout.group_size=4", "algorithm.eta=1", "resources.wait_timeout_s=300",
        "eval.every=20", "eval.prompts=8", "eval.samples_per_prompt=2"])
    browser = start_chromium(tmp_path / "chrome-profile")  # before the run, so the page opens while it goes on
    ctl = Controller(recipe)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["records"] = ctl.run()
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    runner = threading.Thread(target=run, name="controller-run", daemon=True)
    try:
        ctl.build()
        runner.start()
        browser.get(dashboard_url(run_dir, runner, timeout=120))
        first = until(browser, 60, "the page's first snapshot over /events, drawn",
                      lambda b: (b.execute_script(STATE) or {}).get("renders", 0) >= 1 and b.execute_script(STATE))
        step0 = int(browser.find_element(By.ID, "step").text)
        points0 = traces(browser, "chart-reward").get("reward/mean", 0)
        print(f"page connected at step {step0} of {TOTAL_STEPS}")
        assert step0 < TOTAL_STEPS, (f"the run had finished ({step0} steps) before the page connected; "
                                     "raise TOTAL_STEPS so the page sees it live")
        assert browser.find_element(By.ID, "state").text == "running"
        # live: the step counter and the reward chart grow while the page stays open (no reload)
        until(browser, 120, f"the step counter to pass {step0 + 2} through live updates",
              lambda b: int(b.find_element(By.ID, "step").text) >= step0 + 2)
        live = browser.execute_script(STATE)
        assert live["deltas"] >= 1 and live["snapshots"] == first["snapshots"] == 1
        # the counter comes from status.json and the chart from metrics.jsonl: the chart may arrive a delta later
        until(browser, 60, f"the reward chart to grow past its {points0} points through live updates",
              lambda b: traces(b, "chart-reward").get("reward/mean", 0) > points0)

        runner.join(timeout=300)
        assert not runner.is_alive(), "the run did not finish within 300 s"
        assert "error" not in outcome, f"the run failed: {outcome.get('error')!r}"
        until(browser, 30, "the page to show the run finished",
              lambda b: b.find_element(By.ID, "state").text == "finished")
        assert browser.find_element(By.ID, "step").text == str(TOTAL_STEPS)
        assert browser.find_element(By.ID, "total").text == str(TOTAL_STEPS)

        # every chart holds the run's data: as many points as metrics.jsonl has values of its key
        records = read_metrics(run_dir)
        assert len(records) == TOTAL_STEPS
        for chart, key in [("chart-reward", "reward/mean"), ("chart-length", "response/len_mean"),
                           ("chart-kl", "actor/kl_behaviour"), ("chart-entropy", "actor/entropy"),
                           ("chart-clip", "actor/clip_frac"), ("chart-gradnorm", "actor/grad_norm"),
                           ("chart-loss", "actor/loss"), ("chart-steptime", "time/train_s")]:
            assert expected_points(records, key) == TOTAL_STEPS, f"metrics.jsonl lacks {key}"
            assert traces(browser, chart).get(metric_label(key)) == TOTAL_STEPS, (chart, key, traces(browser, chart))
        evals = expected_points(records, "eval/reward_mean")  # at least the rounds at version 0 and on the final weights
        assert evals >= 2 and traces(browser, "chart-eval").get(metric_label("eval/reward_mean")) == evals
        throughput = traces(browser, "chart-throughput")
        assert throughput["samples/s trained"] == throughput["tokens/s generated"] == TOTAL_STEPS
        queues = traces(browser, "chart-queues")  # the legend in words (rl/dashboard/labels.py), no raw keys
        assert queues and all("/" not in name for name in queues), queues
        assert traces(browser, "chart-errors").get("errors") == expected_points(records, "reward/errors")
        for chart in ("chart-throughput", "chart-queues"):
            assert_round_ticks(browser, chart)
        assert_toolbar_on_hover_only(browser, "chart-reward")
        staleness = traces(browser, "chart-staleness")
        if any("staleness/hist" in r for r in records):
            assert sum(staleness.values()) > 0
        else:
            assert staleness.get("staleness/mean") == TOTAL_STEPS

        # the timeline, whole run: one bar per span in timeline.jsonl, a row per actor
        spans = [json.loads(x) for x in (run_dir / "timeline.jsonl").read_text().splitlines() if x.strip()]
        Select(browser.find_element(By.ID, "timeline-window")).select_by_value("0")
        until(browser, 10, "the timeline to show the whole run",
              lambda b: sum(traces(b, "chart-timeline").values()) == len(spans))
        kinds = traces(browser, "chart-timeline")
        assert {s["kind"] for s in spans} == set(kinds) and {"train", "sync"} <= set(kinds)
        rows = browser.execute_script("return [...new Set(document.getElementById('chart-timeline').data"
                                      ".flatMap(t => t.y))];")
        assert {r.split(" · ")[0] for r in rows} == {s["actor"] for s in spans}
        assert all(r.endswith("% busy") for r in rows)

        # the samples table agrees with the rollout log (when the controller writes one)
        log_dir = run_dir / "datastore"
        until(browser, 20, "the samples table to load",
              lambda b: (b.execute_script(STATE) or {}).get("samplesShown") is not None)
        shown = browser.execute_script(STATE)["samplesShown"]
        if log_dir.exists():
            from datastore.log import read_rows

            assert shown == min(100, read_rows(log_dir, "train").num_rows) > 0
        else:
            assert shown == 0 and "no rollout log" in browser.find_element(By.ID, "samples-info").text

        screenshot(browser, tmp_path, "dashboard.png")
    finally:
        browser.quit()
        if hasattr(ctl, "rollouts"):  # build got as far as starting actors
            ctl.shutdown()
        if runner.ident is not None:
            runner.join(timeout=60)


def test_samples_search_and_reward_distribution_in_chromium(tmp_path):
    """The panels fed by the rollout log, on a run directory written by the log's real writer (a run's
    controller may not write one yet): the reward heatmap per version and the sample search."""
    import pyarrow as pa
    from selenium.webdriver.common.by import By

    from datastore.log import RowLog
    from rl.dashboard import DashboardServer

    log = RowLog(tmp_path / "datastore", 0, "s1")
    for version in range(3):  # 8 samples per version; version v answers v+1 of them right
        idx = list(range(8 * version, 8 * version + 8))
        log.append("train", pa.table({
            "index": idx, "prompt": [f"{i}+{i}=" for i in idx], "response": [str(2 * i) for i in idx],
            "response_ids": [[1, 2]] * 8, "reward": [1.0 if k <= version else 0.0 for k in range(8)],
            "version": [version] * 8}))
    log.close()
    steps = [0, 1, 2, 1, 2]  # resumed after step 0: steps 1 and 2 again, the later records count
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": k / 4}) + "\n"
                                                    for k, s in enumerate(steps)))
    server = DashboardServer(tmp_path, "127.0.0.1", 0).start()
    browser = start_chromium(tmp_path / "chrome-profile")
    try:
        browser.get(server.url)
        until(browser, 30, "the samples table to fill", lambda b: (b.execute_script(STATE) or {}).get("samplesShown") == 24)
        reward = browser.execute_script("const t = document.getElementById('chart-reward').data[2]; return [t.x, t.y];")
        assert reward == [[0, 1, 2], [0, 0.75, 1]]
        heat = browser.execute_script("const t = document.getElementById('chart-reward-dist').data[0]; "
                                      "return [t.type, t.x, t.y, t.z];")
        assert heat[0] == "heatmap" and heat[1] == [0, 1, 2] and heat[2] == ["0", "1"]
        assert heat[3][1] == [1 / 8, 2 / 8, 3 / 8]  # share of reward 1 per version
        browser.find_element(By.ID, "search").send_keys("13+13")
        until(browser, 10, "the search to narrow the table to one sample",
              lambda b: len(b.find_elements(By.CSS_SELECTOR, "#samples tbody tr")) == 1)
        cells = [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#samples tbody tr td")]
        assert cells[:5] == ["1", "0.000", "2", "13+13=", "26"]
    finally:
        browser.quit()
        server.stop()


def test_two_runs_overlaid_in_chromium(tmp_path):
    """Two run directories on one page: every curve once per run, the legend naming the run; the header,
    heatmap, errors and samples follow the run picked. Run A is still going: its time left is its recent
    pace (2 s a step) times the steps left, not the whole-run average (which counts a 30 s start-up)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from rl.dashboard import DashboardServer
    from test_dashboard import QUEUE_KEYS, write_run

    a = write_run(tmp_path / "a", "lr-1e-6", steps=80, total_steps=180, versions=300, skill=0.6, state="running", seed=1)
    b = write_run(tmp_path / "b", "lr-3e-6", steps=120, versions=100, skill=1.0, seed=2)
    server = DashboardServer([a, b], "127.0.0.1", 0).start()
    browser = start_chromium(tmp_path / "chrome-profile")
    try:
        browser.get(server.url)
        until(browser, 30, "both runs' reward curves", lambda b: traces(b, "chart-reward") == {"lr-1e-6": 80, "lr-3e-6": 120})
        assert traces(browser, "chart-kl") == {"lr-1e-6": 80, "lr-3e-6": 120}
        assert set(traces(browser, "chart-queues")) == {
            f"{run} · {metric_label(k)}" for run in ("lr-1e-6", "lr-3e-6") for k in QUEUE_KEYS}
        assert traces(browser, "chart-errors") == {"lr-1e-6": 80, "lr-3e-6": 120}
        for chart in ("chart-throughput", "chart-queues"):
            assert_round_ticks(browser, chart)
        assert_toolbar_on_hover_only(browser, "chart-queues")

        # run A (shown first): 300 versions pooled 3 a column; its time left at the recent pace
        heat = browser.execute_script("const t = document.getElementById('chart-reward-dist').data[0]; return t.x;")
        assert len(heat) == 100 and heat[:2] == [1, 4], heat[:5]
        assert browser.find_element(By.ID, "run-name").text == "lr-1e-6 vs lr-3e-6"
        eta = browser.find_element(By.ID, "eta").text  # 100 steps left at 2 s: 3m 18s..3m 20s (average: ~3m 55s)
        assert re.fullmatch(r"3m (1[89]|20)s", eta), eta
        errors = browser.find_elements(By.CSS_SELECTOR, "#errors-list li")
        assert len(errors) == 20 and "raised ValueError: no number in sample 2397" in errors[0].text
        until(browser, 20, "run A's samples", lambda b: (b.execute_script(STATE) or {}).get("samplesShown") == 100)

        Select(browser.find_element(By.ID, "run-select")).select_by_visible_text("lr-3e-6")
        first_version = "const td = document.querySelector('#samples tbody tr td'); return td && td.textContent;"
        until(browser, 20, "run B's newest sample on top of the table", lambda b: b.execute_script(first_version) == "99")
        heat = browser.execute_script("return document.getElementById('chart-reward-dist').data[0].x;")
        assert heat == list(range(100))  # 100 versions: one column each
        assert browser.find_element(By.ID, "state").text == "finished" and browser.find_element(By.ID, "eta").text == "–"
        Select(browser.find_element(By.ID, "run-select")).select_by_visible_text("lr-1e-6")
        screenshot(browser, tmp_path, "dashboard-compare.png")
    finally:
        browser.quit()
        server.stop()


def test_exported_file_opens_without_a_server_in_chromium(tmp_path):
    """`streamrl dashboard RUN_DIR --export FILE`, opened from disk: the charts, the timeline and the samples
    (searched in the page) come from the file alone; the page asks nothing of any server."""
    from selenium.webdriver.common.by import By

    from rl.cli import main as cli_main
    from test_dashboard import QUEUE_KEYS, write_run

    run = write_run(tmp_path / "run", "exported", steps=40, seed=3)
    out = tmp_path / "report.html"
    assert cli_main(["dashboard", str(run), "--export", str(out)]) == 0
    browser = start_chromium(tmp_path / "chrome-profile")
    try:
        browser.get(out.as_uri())
        until(browser, 30, "the exported page drawn", lambda b: (b.execute_script(STATE) or {}).get("renders", 0) >= 1)
        assert traces(browser, "chart-reward").get("reward/mean") == 40
        assert traces(browser, "chart-queues") == {metric_label(k): 40 for k in QUEUE_KEYS}
        assert sum(traces(browser, "chart-timeline").values()) == 5 * 40
        heat = browser.execute_script("const t = document.getElementById('chart-reward-dist').data[0]; return [t.type, t.x];")
        assert heat == ["heatmap", list(range(40))]
        assert browser.find_element(By.ID, "state").text == "finished"
        assert "exported" in browser.find_element(By.ID, "conn").text
        until(browser, 10, "the samples table from the file", lambda b: (b.execute_script(STATE) or {}).get("samplesShown") == 100)
        browser.find_element(By.ID, "search").send_keys("13+6=")
        prompts = "return [...document.querySelectorAll('#samples tbody tr td:nth-child(4)')].map(td => td.textContent);"
        until(browser, 10, "the in-page search to narrow the table", lambda b: set(b.execute_script(prompts)) == {"13+6="})
        assert len(browser.find_elements(By.CSS_SELECTOR, "#errors-list li .msg")) == 20
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
        assert all(not name.startswith("http") for name in fetched), fetched
        assert_toolbar_on_hover_only(browser, "chart-reward")
        screenshot(browser, tmp_path, "dashboard-export.png")
    finally:
        browser.quit()
