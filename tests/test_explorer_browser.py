"""report.html in a real browser: headless Chromium over the DevTools protocol (tests/_chromium.py).

The page loads from disk with no console errors (the fixture's texts include markup that would log
errors if it ever ran), the principle filter and the search box show exactly the rows they should,
sorting by confidence orders the comparisons, and a screenshot is taken. Without Chromium the test
is skipped, unless CAI_JAX_REQUIRE_CHROMIUM=1 (set by .ci/run, which installs it) makes that a
failure.
"""

from __future__ import annotations

import json
import os
import struct

import pytest

from experiments.explorer import write_explorer
from tests._chromium import Browser, find_chromium
from tests._run_fixture import make_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CAI_JAX_REQUIRE_CHROMIUM") == "1":
            pytest.fail("CAI_JAX_REQUIRE_CHROMIUM=1 but no Chromium found (set CHROMIUM or install chromium)")
        pytest.skip("no Chromium (apt-get install chromium; .ci/run installs it)")
    with Browser(binary) as b:
        yield b


def _visible(b: Browser, selector: str) -> int:
    """Rendered elements matching `selector` (hidden ones have no offsetParent)."""
    return b.eval(
        f"Array.from(document.querySelectorAll({json.dumps(selector)})).filter(e => e.offsetParent !== null).length"
    )


def _set(b: Browser, selector: str, value: str, event: str) -> None:
    b.eval(
        f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.value = {json.dumps(value)}; "
        f"e.dispatchEvent(new Event({json.dumps(event)})); }})()"
    )


def test_report_html_in_chromium(browser, tmp_path):
    wrote = make_run(tmp_path / "run")
    page = write_explorer(tmp_path / "run")
    browser.open(page)
    chains = "#revisions article.chain"
    n_chains = len(wrote["revisions"]) + len(wrote["helpful"])
    assert _visible(browser, chains) == n_chains
    assert _visible(browser, "#feedback tr.item") == len(wrote["comparisons"])
    assert _visible(browser, "#rl .sample") == len(wrote["samples"])

    # Filter by principle: the chains with a round under it, and nothing else.
    for principle in ("privacy", "harm"):
        _set(browser, "#revisions select.principle", principle, "change")
        expected = sum(any(r["principle_id"] == principle for r in row["rounds"]) for row in wrote["revisions"])
        assert 0 < expected < n_chains
        assert _visible(browser, chains) == expected
        assert (
            browser.eval("document.querySelector('#revisions .count').textContent") == f"{expected} of {n_chains} shown"
        )
    _set(browser, "#revisions select.principle", "", "change")
    assert _visible(browser, chains) == n_chains

    # Search (case-insensitive) over every text of a chain: one critique holds this word.
    _set(browser, "#revisions input.search", "UNIQUEWORD2X1", "input")
    assert _visible(browser, chains) == 1
    assert browser.eval("document.querySelector('#revisions article.chain:not([hidden])').dataset.id") == "rt-0002"
    _set(browser, "#revisions input.search", "no such text anywhere", "input")
    assert _visible(browser, chains) == 0
    _set(browser, "#revisions input.search", "", "input")
    assert _visible(browser, chains) == n_chains
    _set(browser, "#feedback input.search", "compare 3", "input")
    assert _visible(browser, "#feedback tr.item") == 1
    _set(browser, "#feedback input.search", "", "input")

    # Sort the comparisons by confidence: descending, then ascending on a second click.
    order = "Array.from(document.querySelectorAll('#feedback tr.item')).map(r => parseFloat(r.dataset.confidence))"
    browser.eval("document.querySelector('#feedback th[data-sort=confidence]').click()")
    confidences = browser.eval(order)
    assert confidences == sorted((max(c["p_a"], 1 - c["p_a"]) for c in wrote["comparisons"]), reverse=True)
    browser.eval("document.querySelector('#feedback th[data-sort=confidence]').click()")
    assert browser.eval(order) == sorted(confidences)

    shot = browser.screenshot(tmp_path / "report.png")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1280, 900)
    assert browser.console_errors() == []
