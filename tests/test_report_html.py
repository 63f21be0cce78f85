"""report.html: the same blocks as report.md, self-contained, and opened in a real headless
browser (Debian's Chromium through Playwright) with no console errors."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dynalm.interpret import write_token_html
from dynalm.report import write_report


def _side(reward, kl, completion, **extra):
    return {"reward": reward, "distinct2": 0.9 if kl < 10 else 0.5, "kl": kl, "mean_length": 40.0 if kl < 10 else 10.0,
            "eos_rate": 0.8 if kl < 10 else 0.1, "samples": [{"prompt": "Once <b>upon</b> a time", "completion": completion,
                                                            "reward": reward}], **extra}


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "demo-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": 0.1 * s, "kl": 0.5 * s}) + "\n" for s in (1, 2, 3)))
    write_token_html([{"prompt": "Once", "score": 0.5, "tokens": ["a", " cat"], "advantage": [0.1, -0.2],
                       "kl": [0.0, 0.3], "reward": [0.0, 0.5]}], run / "tokens.html")
    mcts = _side(0.95, 24.0, "mcts text", planner="mcts", seconds_per_sample=1.5, forward_calls=120)
    (run / "eval-mcts.json").write_text(json.dumps({"trained": mcts}))
    result = {"n_prompts": 1, "base": _side(0.1, 0.0, "a plain | piped text"),
              "trained": _side(0.9, 25.0, "<script>alert(1)</script> the end"), "delta_reward": 0.8}
    write_report(run, result)
    return run


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables, self.cell, self.alerts, self.imgs, self.iframes = [], None, 0, [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "iframe":
            self.iframes.append(a)
        if a.get("role") == "alert":
            self.alerts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def _md_tables(text: str) -> list[list[list[str]]]:
    out, cur = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if cur is None:
                cur = []
                out.append(cur)
            if not line.startswith("|---"):
                cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
                cur.append(cells)
        else:
            cur = None
    return out


def test_report_html_shows_what_report_md_shows(tmp_path):
    run = make_run(tmp_path)
    md = (run / "report.md").read_text()
    page = (run / "report.html").read_text()
    p = _Tables()
    p.feed(page)
    assert p.tables == _md_tables(md)  # the eval table and the planner table, cell for cell
    assert len(p.tables) == 2 and p.tables[1][0][0] == "planner" and [r[0] for r in p.tables[1][1:]] == ["sample", "mcts"]
    assert p.alerts == md.count("> **Warning — possible reward hacking:**") == 4
    assert p.imgs and all(src.startswith("data:image/png;base64,") for src in p.imgs)  # nothing beside it needed
    assert len(p.iframes) == 1 and "class='tok'" in p.iframes[0]["srcdoc"]
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; the end" in page
    assert "Eval reward, trained − base: <b>+0.8000</b>." in page


def _browser():
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("no headless Chromium on this machine (apt-get install chromium; .ci/run installs it where it can)")
    return sync, exe


def _open(sync, exe, url: str):
    """Load the page; returns (console errors and page errors, tables' text, image widths, token spans in the iframe)."""
    with sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="load")
            tables = page.locator("table").all_inner_texts()
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
            spans = page.frame_locator("iframe").locator(".tok").count() if page.locator("iframe").count() else 0
            return errors, tables, widths, spans
        finally:
            browser.close()


def test_report_html_opens_in_a_headless_browser_without_errors(tmp_path):
    sync, exe = _browser()
    run = make_run(tmp_path)
    errors, tables, widths, spans = _open(sync, exe, (run / "report.html").as_uri())
    assert errors == []
    assert len(tables) == 2 and "delta_reward" not in tables[0] and "distinct2" in tables[0] and "mcts" in tables[1]
    assert widths and all(w == 1000 for w in widths)  # curves.png decoded: 10 in × 100 dpi
    assert spans == 3 * 2  # the per-token view: 2 tokens × (advantage, KL, reward)
    # the check can fail: a page with a missing image logs a console error
    (tmp_path / "broken.html").write_text("<!doctype html><title>x</title><img src='missing.png'>")
    assert _open(sync, exe, (tmp_path / "broken.html").as_uri())[0] != []
