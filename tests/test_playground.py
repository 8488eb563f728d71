"""The playground page (GET /) in a real headless Chromium, driven by Playwright: type a prompt, press the button,
read the completion the page streamed in. Debian's `chromium` package is the browser (.ci/run installs it)."""

from __future__ import annotations

import re
import shutil
import urllib.request

import pytest

openai = pytest.importorskip("openai")
playwright = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run does)", allow_module_level=True)

from tests.serve_process import start_server, tiny_model  # noqa: E402 - after the skips

PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground")
    tiny_model(folder)
    server = start_server(folder, "--config.serve.max_batch=4")
    yield server
    assert server.stop() == 0


def test_the_page_streams_a_completion(server):
    with urllib.request.urlopen(server.url + "/") as r:  # one page, nothing from elsewhere
        html = r.read().decode()
    assert "<script>" in html and not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    expected = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent !== ''")
            page.fill("#prompt", PROMPT)
            page.fill("#max_tokens", "12")
            page.fill("#temperature", "0")
            page.click("#generate")
            page.wait_for_selector("#status[data-done='true']", timeout=60_000)
            completion, status = page.text_content("#completion"), page.text_content("#status")
        finally:
            browser.close()
    assert completion == expected
    assert "12 tokens" in status and "tokens/s" in status and "length" in status
