"""Issue 20, proof: ``tunelab board`` in a real headless Chromium against tiny-model runs. The runs table
lists them, a launched run trains to the end, its live curve gains points while it trains, compare shows
two runs' curves and their config diff, chat streams a reply. A screenshot of each view is saved.
(Fails on the old code: there was no board.)"""

from __future__ import annotations

import re
import time


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _pick(page, elem_id: str, value: str) -> None:
    """Choose ``value`` in a Gradio dropdown: type it, click its option."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill("")  # a single-choice dropdown may show a value already
    box.press_sequentially(value, delay=20)
    page.locator(f'li[role=option][aria-label="{value}"]').first.click()
    page.keyboard.press("Escape")


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def _points(page, elem_id: str) -> int:
    match = re.search(r"(\d+) points", page.locator(f"#{elem_id}").inner_text())
    return int(match.group(1)) if match else -1


def test_runs_table_lists_every_run_with_its_status(page, artifacts):
    _tab(page, "Runs")
    table = page.locator("#runs-table")
    text = _wait_for(lambda: (t := table.inner_text()) and "sft-a" in t and "sft-b" in t and t, 60, "both runs")
    assert text.count("finished") >= 2
    assert "lora" in text and "loss" in text and "6/6" in text
    page.screenshot(path=str(artifacts / "runs.png"), full_page=True)


def test_launch_starts_a_run_whose_live_curve_gains_points_and_it_finishes(page, runs_dir, artifacts):
    _tab(page, "Launch")
    config = page.locator("#launch-config input").first
    config.fill(str(runs_dir / "live.yaml"))
    page.keyboard.press("Enter")
    page.locator("#launch-name textarea, #launch-name input").first.fill("live")
    page.locator("#launch-overrides textarea").first.fill("train.max_steps=400 train.log_every=1")
    page.locator("#launch-start").click()
    _wait_for(lambda: "pid" in page.locator("#launch-log textarea").first.input_value(), 30, "the launch's pid")

    _wait_for(lambda: (runs_dir / "live" / "metrics.jsonl").is_file() and
              (runs_dir / "live" / "metrics.jsonl").stat().st_size > 0, 120, "the run's first metrics")
    _tab(page, "Live curves")  # (selecting the tab refreshes its run list)
    _pick(page, "live-run", "live")
    first = _wait_for(lambda: max(_points(page, "live-status"), 0), 60, "the first points")
    _wait_for(lambda: _points(page, "live-status") > first, 60, f"more than {first} points")
    page.locator('#live-plot [aria-roledescription="line mark"]').first.wait_for()
    page.screenshot(path=str(artifacts / "live.png"), full_page=True)
    _tab(page, "Launch")
    _wait_for(lambda: "exited with status 0" in page.locator("#launch-log textarea").first.input_value(), 180,
              "the launched run to finish")
    _wait_for(lambda: "finished" in page.locator("#launch-status").inner_text(), 30, "status finished")
    page.screenshot(path=str(artifacts / "launch.png"), full_page=True)
    assert (runs_dir / "live" / "tunelab.json").is_file()


def test_compare_overlays_two_runs_and_shows_their_config_diff(page, artifacts):
    _tab(page, "Compare")
    _pick(page, "compare-runs", "sft-a")
    _pick(page, "compare-runs", "sft-b")
    page.locator("#compare-go").click()
    diff = page.locator("#compare-diff")
    text = _wait_for(lambda: (t := diff.inner_text()) and "train.lr" in t and t, 60, "the config diff")
    assert "0.001" in text and "0.003" in text and "output_dir" in text
    lines = page.locator('#compare-plot [aria-roledescription="line mark"]')
    _wait_for(lambda: lines.count() == 2, 60, "two overlaid curves")
    legend = page.locator('#compare-plot [aria-roledescription="legend"]').get_attribute("aria-label")
    assert "2 values: sft-a, sft-b" in legend, legend
    assert "loss" in page.locator("#compare-held-out").inner_text()
    page.screenshot(path=str(artifacts / "compare.png"), full_page=True)


def test_chat_streams_a_reply_from_a_finished_run(page, artifacts):
    _tab(page, "Chat")
    _pick(page, "chat-run", "sft-a")
    page.evaluate("""() => {
        window.__chatTexts = [];
        const box = document.querySelector('#chat-box');
        new MutationObserver(() => {
            const bots = box.querySelectorAll('.bot, [data-testid="bot"]');
            const last = bots.length ? bots[bots.length - 1].innerText : '';
            if (last && window.__chatTexts[window.__chatTexts.length - 1] !== last) window.__chatTexts.push(last);
        }).observe(box, {subtree: true, childList: true, characterData: true});
    }""")
    message = page.locator("#chat-input textarea").first
    message.fill("What is 2 plus 2?")
    message.press("Enter")
    texts = _wait_for(lambda: page.evaluate("window.__chatTexts.length > 1 && window.__chatTexts"), 60,
                      "a streamed reply (several partial texts)")
    time.sleep(1.0)
    texts = page.evaluate("window.__chatTexts")
    assert len(texts) >= 2 and len(texts[-1]) > len(texts[0]), texts
    page.screenshot(path=str(artifacts / "chat.png"), full_page=True)
