"""The reports in headless Chromium: no console errors, no broken images, no network, not blank,
tables inside their cards at 1400 px and narrower.

Needs the Debian package ``chromium`` (installed in CI); skipped with the reason otherwise. The
reports come from ``test_reports.build_reports`` (built once per test process). The DevTools client
is ``tests/browser.py`` (a test helper, not part of the package).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from browser import check_report, find_chromium

pytestmark = [pytest.mark.browser, pytest.mark.slow]

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


# ------------------------------------------------------------------------------------------------
# layout: tables stay inside their cards
_LAYOUT_JS = """JSON.stringify((function () {
  var out = {page: document.documentElement.scrollWidth - window.innerWidth, cards: [], scrolls: []};
  document.querySelectorAll('section.card, article.card').forEach(function (c) {
    var r = c.getBoundingClientRect(), worst = 0, what = '';
    c.querySelectorAll('*').forEach(function (e) {
      var b = e.getBoundingClientRect();
      if (b.width > 0 && b.right - r.right > worst) { worst = b.right - r.right; what = e.tagName + '.' + e.className; }
    });
    out.cards.push({id: c.id, overflow: c.scrollWidth - c.clientWidth, beyond: Math.round(worst), what: what});
  });
  document.querySelectorAll('.table-scroll').forEach(function (s) {
    out.scrolls.push({id: s.parentNode.id, hidden: s.scrollWidth - s.clientWidth});
  });
  return out;
})())"""

#: realistic long BIDS names: sessions, acquisitions and runs
_LONG = "ses-baselineVisit01_acq-mprage1mmIsotropic_run-01"


def _long_named_group(built, folder: Path) -> Path:
    from cg3d_bids.reports import write_group_report

    results = []
    for k, r in enumerate(built.results["T2w"]):
        subject = f"healthycontrol{k:03d}"
        results.append(replace(r, subject=subject, session="baselineVisit01",
                               bids_name=f"sub-{subject}_{_LONG}_T2w"))
    results[-1] = replace(results[-1], error="ValueError: image is 4D (64, 64, 30, 2); expected 3D " * 3)
    return write_group_report(folder, "T2w", results, built.batch, [], built.provenance)


def _layout(page: Path, width: int) -> dict:
    check = check_report(page, window_size=(width, 1200), scripts={"layout": _LAYOUT_JS})
    assert check.ok, check.summary()
    return json.loads(check.scripts["layout"])


def test_tables_fit_their_cards_at_1400px(chromium, built, tmp_path):
    """At 1400 px the image tables (long BIDS names included) fit their cards: nothing sticks out,
    nothing needs scrolling sideways."""
    for page in (_long_named_group(built, tmp_path), built.group_reports["T2w"], built.subject_reports["01"]):
        layout = _layout(page, 1400)
        assert layout["page"] <= 0, page.name
        for card in layout["cards"]:
            assert card["overflow"] <= 0 and card["beyond"] <= 0, (page.name, card)
        for box in layout["scrolls"]:
            assert box["hidden"] <= 0, (page.name, box)


@pytest.mark.parametrize("width", [1000, 700, 420])
def test_narrow_windows_scroll_inside_the_card(chromium, built, tmp_path, width):
    """Narrower windows: tables wrap or scroll inside their card; no card overflows, the page never
    scrolls sideways."""
    for page in (_long_named_group(built, tmp_path), built.subject_reports["01"]):
        layout = _layout(page, width)
        assert layout["page"] <= 0, (page.name, width)
        for card in layout["cards"]:
            assert card["overflow"] <= 0, (page.name, width, card)


def test_devtools_client_is_not_in_the_package():
    import cg3d_bids

    package = Path(cg3d_bids.__file__).parent
    assert not (package / "reports" / "browser.py").exists()
    users = [p for p in package.rglob("*.py") if "browser" in p.read_text(encoding="utf-8")]
    assert users == [], users
