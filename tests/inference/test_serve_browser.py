"""The web page of `python -m llava_san.serve` in a real headless Chromium (Debian's `chromium`, driven
by Playwright with the system browser): upload an image, ask, and the answer shown equals
`Assistant.answer`; a second question continues the conversation; errors are shown on the page.

Without a Chromium binary the test is skipped, except on CI (`CI` set), where a missing browser is a
failure: `.ci/run` installs it.
"""
import importlib
import os
import shutil

import pytest

from llava_san.inference import Assistant, Turn

MAX_NEW = 12
LIMIT = 64
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: .ci/run)")
    pytest.skip(reason)


def _chromium() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        _missing(f"no Chromium binary on PATH (looked for {', '.join(BROWSERS)}): apt-get install chromium")
    return found


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing(f"{module} is not installed: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def server(trained_run):
    _require("fastapi")
    from llava_san.serve import Engine, create_app
    from llava_san.serve.server import ServerThread

    engine = Engine(Assistant.load(trained_run, device="cpu"), max_new_tokens_limit=LIMIT)
    with ServerThread(create_app(engine)) as running:
        yield running


@pytest.fixture(scope="module")
def browser_tools():
    """The Chromium binary and Playwright's ``sync_playwright``: checked before any model is loaded."""
    return _chromium(), _require("playwright.sync_api").sync_playwright


@pytest.fixture(scope="module")
def page(browser_tools, server):
    executable, sync_playwright = browser_tools
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            yield page
        finally:
            browser.close()


def _ask(page, question: str, max_tokens: int = MAX_NEW) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#question", question)
    page.click("#send")


def _answers(page):
    return page.locator('[data-testid="answer"][data-done="true"] .text')


def test_upload_ask_and_continue(page, trained_run, image_file):
    from llava_san.data.images import load_image

    reference = Assistant.load(trained_run, device="cpu")
    image = load_image(str(image_file))
    assert page.text_content('[data-testid="model"]') == "model: run"

    page.set_input_files("#image-input", str(image_file))
    page.wait_for_selector('#preview[src^="data:image/png;base64,"]', state="visible")
    _ask(page, "What shape is in the image?")
    _answers(page).first.wait_for()
    expected = reference.answer([Turn("user", "What shape is in the image?")], image, MAX_NEW)
    assert expected
    assert _answers(page).first.text_content() == expected

    # the page keeps the conversation: the second question is answered after the first exchange
    _ask(page, "What color is it?")
    _answers(page).nth(1).wait_for()
    turns = [Turn("user", "What shape is in the image?"), Turn("assistant", expected),
             Turn("user", "What color is it?")]
    assert _answers(page).nth(1).text_content() == reference.answer(turns, image, MAX_NEW)

    # a refused request is shown on the page and leaves the conversation as it was
    _ask(page, "Too long?", LIMIT + 1)
    page.wait_for_selector('[data-testid="error"]:not(:empty)')
    assert f"limit of {LIMIT}" in page.text_content('[data-testid="error"]')
    assert page.locator('[data-testid="answer"]').count() == 2

    # reset: an empty page; a new question is a new conversation without the image
    page.click("#reset")
    assert page.locator('[data-testid="answer"]').count() == 0
    assert page.text_content('[data-testid="error"]') == ""
    _ask(page, "Hello")
    _answers(page).first.wait_for()
    assert _answers(page).first.text_content() == reference.answer([Turn("user", "Hello")], None, MAX_NEW)
