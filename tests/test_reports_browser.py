"""The reports in headless Chromium: no console errors, no broken images, no network, not blank.

Needs the Debian package ``chromium`` (installed in CI); skipped with the reason otherwise. The
reports come from ``test_reports.build_reports`` (built once per test process).
"""

from __future__ import annotations

import json
import os

import pytest

from browser import check_report, find_chromium

pytestmark = pytest.mark.browser

CHROMIUM = find_chromium()


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        print("chromium not found: apt-get install chromium")
        pytest.skip("chromium not found: apt-get install chromium")
    return CHROMIUM


@pytest.fixture(scope="module")
def built():
    from test_reports import build_reports

    return build_reports()


def _keep(tmp_path, name):
    """Screenshots go to $CG3D_SCREENSHOT_DIR when set (to look at them), else to tmp_path."""
    folder = os.environ.get("CG3D_SCREENSHOT_DIR")
    return (os.path.join(folder, name) if folder else tmp_path / name)


def test_subject_report_in_browser(chromium, built, tmp_path):
    html = built.subject_reports["01"]
    check = check_report(html, screenshot=_keep(tmp_path, "sub-01.png"))
    assert check.ok, check.summary()
    assert check.console_errors == [] and check.broken_images == [] and check.external_requests == []
    assert not check.screenshot_blank and check.screenshot_nonbackground > 0.05
    assert check.n_images == 6                  # 3 images x (anomaly mosaic + brain-mask check)
    assert check.title.startswith("sub-01")


def test_group_report_in_browser_and_sorting(chromium, built, tmp_path):
    html = built.group_reports["T2w"]
    rows_js = ("JSON.stringify(Array.from(document.querySelectorAll('#group-table tbody tr'))"
               ".map(function (r) { return r.getAttribute('data-bids-name'); }))")
    click_score = ("(function () { var th = Array.from(document.querySelectorAll('#group-table th'))"
                   ".find(function (h) { return h.textContent.trim() === 'score'; }); th.click(); "
                   f"return {rows_js}; }})()")
    click_subject = ("(function () { var th = Array.from(document.querySelectorAll('#group-table th'))"
                     ".find(function (h) { return h.textContent.trim() === 'subject'; }); th.click(); "
                     f"return {rows_js}; }})()")
    check = check_report(html, screenshot=_keep(tmp_path, "group_T2w.png"), scripts={
        "initial": rows_js, "score_desc": click_score, "score_asc": click_score, "subject_asc": click_subject,
    })
    assert check.ok, check.summary()
    assert check.n_images == 0                   # the distribution plot is inline SVG
    results = {r.bids_name: r for r in built.results["T2w"]}
    initial = json.loads(check.scripts["initial"])
    assert [results[n].flagged for n in initial] == sorted((results[n].flagged for n in initial), reverse=True)
    scored = sorted((r for r in results.values() if r.ok), key=lambda r: -r.score)
    desc = json.loads(check.scripts["score_desc"])
    assert desc[:len(scored)] == [r.bids_name for r in scored] and desc[-1] == "sub-03_T2w"  # n/a last
    asc = json.loads(check.scripts["score_asc"])
    assert asc[:len(scored)] == [r.bids_name for r in reversed(scored)] and asc[-1] == "sub-03_T2w"
    subjects = [results[n].subject for n in json.loads(check.scripts["subject_asc"])]
    assert subjects == sorted(subjects)


def test_checker_catches_problems(chromium, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body><h1>Broken page</h1>"
        "<p>Some text so that the page is not blank.</p><img src='missing.png' alt='x'>"
        "<script>console.error('boom from test'); notAFunction();</script></body></html>")
    check = check_report(bad)
    assert not check.ok
    assert any(u.endswith("/missing.png") for u in check.broken_images)
    assert any("boom from test" in e for e in check.console_errors)
    assert any("notAFunction" in e for e in check.console_errors)
    assert not check.screenshot_blank

    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><head><title>blank</title></head><body></body></html>")
    check = check_report(blank)
    assert check.screenshot_blank and not check.ok
    assert check.console_errors == [] and check.broken_images == []

    net = tmp_path / "net.html"
    net.write_text("<!DOCTYPE html><html><body><h1>remote</h1><p>text</p>"
                   "<img src='http://127.0.0.1:9/x.png' alt='remote'></body></html>")
    check = check_report(net)
    assert check.external_requests == ["http://127.0.0.1:9/x.png"] and not check.ok
