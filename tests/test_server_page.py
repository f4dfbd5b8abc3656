"""The live page in a real headless browser (Debian's chromium driven by Playwright): it loads, draws
the residency heatmap, and updates the tok/s and hit-rate charts while a stream runs.

Set-up: `apt-get install -y chromium` and `pip install playwright` (no `playwright install`: the
system chromium is used). Skipped when either is missing. The screenshot goes to the test's tmp dir
(printed, and recorded as the `screenshot` property), or to $TILEMEM_ARTIFACTS when set.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import openai
import pytest

from tilemem.engine.llm import LLM
from tilemem.loader.checkpoint import Checkpoint
from tilemem.models.topology import Topology
from tilemem.server import BackgroundServer, ServerConfig

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing; `pip install playwright` (no browser download needed)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(make_ckpt):
    path = make_ckpt("olmoe")
    topo = Topology.from_config(Checkpoint.open(path).config, "fp32")
    budget = topo.non_expert_bytes + int(0.3 * topo.routed_expert_bytes)
    llm = LLM(path, dtype="fp32", budget=f"cpu={budget}B", policy="tilepo_fine", tile=16, max_batch=4)
    with BackgroundServer(llm, ServerConfig(port=0, max_batch=4, api_key="sk-page", log_level="warning")) as srv:
        yield srv


def canvas_png(page, canvas_id: str) -> str:
    return page.evaluate(f"document.getElementById('{canvas_id}').toDataURL()")


def test_page_shows_the_heatmap_and_live_charts(browser, server, tmp_path, record_property):
    context = browser.new_context(
        viewport={"width": 1280, "height": 760}, extra_http_headers={"Authorization": "Bearer sk-page"}
    )
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda err: problems.append(str(err)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    page.goto(f"{server.url}/?interval=200")

    page.wait_for_function("window.tilemem && window.tilemem.heatmapDrawn && window.tilemem.polls >= 2", timeout=20000)
    info = page.evaluate("({plan: window.tilemem.plan, text: document.body.innerText})")
    assert info["plan"]["plan"]["policy"] == "tilepo_fine"
    assert "plan" in info["text"] and "tilepo_fine" in info["text"]
    shares = [v for row in info["plan"]["residency"]["cpu"] for v in row]
    assert 0 < sum(shares) < len(shares)  # part of the experts resident, part on disk
    # The heatmap has colour where the residency says so (not a blank canvas).
    colours = page.evaluate(
        """(() => { const c = document.getElementById('heatmap'), d = c.getContext('2d')
            .getImageData(0, 0, c.width, c.height).data; const s = new Set();
            for (let i = 0; i < d.length; i += 16) s.add(d[i] + ',' + d[i + 1] + ',' + d[i + 2]); return s.size; })()"""
    )
    assert colours >= 3
    idle_chart = canvas_png(page, "toks")

    # A stream runs: the charts must move while it does.
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-page", max_retries=0, timeout=120)
    done = threading.Event()

    def stream() -> None:
        try:
            for _ in client.completions.create(
                model="ckpt", prompt="Once upon a time", max_tokens=300, stream=True, extra_body={"ignore_eos": True}
            ):
                pass
        finally:
            done.set()

    threading.Thread(target=stream, daemon=True).start()
    page.wait_for_function(
        "window.tilemem.samples.some(s => s.tokS > 0) && window.tilemem.samples.some(s => s.hit !== null)",
        timeout=30000,
    )
    assert not done.is_set(), "the stream ended before the charts were seen to move; lengthen it"
    moving = canvas_png(page, "toks")
    assert moving != idle_chart
    time.sleep(0.5)
    assert canvas_png(page, "toks") != moving or done.is_set()  # still redrawing
    kpi = page.inner_text("#k-toks")
    assert kpi != "–"
    shot = tmp_path / "tilemem_page.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("TILEMEM_ARTIFACTS"):
        out = Path(os.environ["TILEMEM_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, out / shot.name))
    record_property("screenshot", str(shot))
    print(f"screenshot: {shot}")
    done.wait(120)
    assert not problems, problems
    context.close()
