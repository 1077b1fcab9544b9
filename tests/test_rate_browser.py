"""The rating page in a real browser: headless Chromium from Debian's packages, driven by selenium.

Nothing is downloaded: selenium is given the system chromedriver and the
chromium binary. The tests skip, saying why, where either is missing.
"""

import os
import shutil
import tempfile

import pytest

from ouroboros_jax.rate import RatingServer, RatingStore

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900")

webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed (pip install -e '.[dev]')")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold?</b>'


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="rate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def store(tmp_path):
    return RatingStore.in_run_dir(tmp_path)


def open_page(browser, store, rater):
    """Serve `store`, open the printed URL (token -> cookie), and sign in as `rater` through the page."""
    server = RatingServer(store, port=0, quiet=True).start()
    browser.get_log("browser")  # start each page with an empty console log
    browser.get(server.page_url)
    assert browser.current_url == f"{server.url}/"  # the token left the address bar
    WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "welcome").is_displayed())
    browser.find_element(By.ID, "rater").send_keys(rater)
    browser.find_element(By.ID, "rater-save").click()
    return server


def cards(browser):
    return WebDriverWait(browser, 10).until(
        lambda b: b.find_elements(By.CSS_SELECTOR, "#completions .completion") or False)


def wait_status(browser, text):
    WebDriverWait(browser, 10).until(lambda b: text in b.find_element(By.ID, "status").text)


def test_pick_the_better_completion(browser, store):
    item = store.enqueue("What is 6 * 7?", ["42", "36", "48"], step=5, judge_confidence=0.4)
    server = open_page(browser, store, "ada")
    try:
        shown = cards(browser)
        assert browser.find_element(By.ID, "prompt").text == "What is 6 * 7?"
        meta = browser.find_element(By.ID, "meta").text
        assert meta == "item 1 · step 5 · priority 0.60 (judge confidence 0.40)"
        order = [int(card.get_attribute("data-index")) for card in shown]
        assert sorted(order) == [0, 1, 2]
        texts = [card.find_element(By.CSS_SELECTOR, ".text").text for card in shown]
        assert texts == [["42", "36", "48"][i] for i in order]
        shown[order.index(0)].find_element(By.CSS_SELECTOR, "button.choose").click()
        wait_status(browser, "Saved rating 1 of item 1.")
        assert "Nothing to rate right now" in browser.find_element(By.ID, "empty").text
        counts = browser.find_element(By.ID, "counts").text
        assert counts == "1 rated by you · 0 waiting for you · 1 rating in all"
        assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []  # no CSP or JS errors
    finally:
        server.close()
    [rating] = store.ratings()
    assert (rating.item_id, rating.rater, rating.choice, rating.order) == (item, "ada", 0, tuple(order))


def test_model_output_with_script_shows_as_text(browser, store):
    store.enqueue("<i>prompt</i> & <script>window.__pwned = 3</script>", [XSS, "plain"])
    server = open_page(browser, store, "bea")
    try:
        shown = cards(browser)
        by_index = {card.get_attribute("data-index"): card for card in shown}
        text = by_index["0"].find_element(By.CSS_SELECTOR, ".text")
        assert text.text == XSS  # the visible text is the markup itself
        assert browser.execute_script("return arguments[0].textContent", text) == XSS
        assert browser.execute_script("return arguments[0].childElementCount", text) == 0
        prompt = browser.find_element(By.ID, "prompt").text
        assert prompt == "<i>prompt</i> & <script>window.__pwned = 3</script>"
        assert browser.execute_script("return typeof window.__pwned") == "undefined"  # no script ran
        assert browser.execute_script("return document.scripts.length") == 1  # only app.js
        assert browser.find_elements(By.CSS_SELECTOR, "#item img, #item b, #item i") == []
        by_index["0"].find_element(By.CSS_SELECTOR, "button.choose").click()
        wait_status(browser, "Saved rating")
        assert browser.execute_script("return typeof window.__pwned") == "undefined"
    finally:
        server.close()
    [rating] = store.ratings()
    assert rating.choice == 0 and rating.rater == "bea"


def test_policy_forbids_html_and_script_sinks(browser, store):
    server = open_page(browser, store, "eli")
    try:
        for code in ("document.getElementById('prompt').innerHTML = '<b>x</b>'",
                     "const s = document.createElement('script'); s.textContent = 'window.__x = 1'; "
                     "document.body.append(s)"):
            outcome = browser.execute_script(
                f"try {{ {code}; return 'allowed'; }} catch (e) {{ return e.name; }}")
            assert outcome == "TypeError", code  # Trusted Types: no HTML or script from strings
        assert browser.execute_script("return typeof window.__x") == "undefined"
    finally:
        server.close()


def test_score_with_buttons_and_skip_with_a_key(browser, store):
    pointwise = store.enqueue("Summarise: the sky is blue.", ["The sky is blue.", ""], mode="pointwise",
                              score_range=(1, 5), priority=2.0)
    skipped = store.enqueue("Which is nicer?", ["a", "b"], priority=1.0)
    server = open_page(browser, store, "cy")
    try:
        shown = cards(browser)
        assert browser.find_element(By.ID, "submit-scores").get_attribute("disabled") is not None
        wanted = {0: 4, 1: 1}
        for card in shown:
            index = int(card.get_attribute("data-index"))
            if index == 1:
                assert card.find_element(By.CSS_SELECTOR, ".text").text == "(empty completion)"
            card.find_elements(By.CSS_SELECTOR, ".scale .score")[wanted[index] - 1].click()
        browser.find_element(By.ID, "submit-scores").click()
        wait_status(browser, f"Saved rating 1 of item {pointwise}.")
        cards(browser)
        assert browser.find_element(By.ID, "prompt").text == "Which is nicer?"
        browser.find_element(By.TAG_NAME, "body").send_keys("s")
        wait_status(browser, f"Skipped item {skipped}.")
    finally:
        server.close()
    first, second = store.ratings()
    assert (first.item_id, first.scores, first.skipped) == (pointwise, (4.0, 1.0), False)
    assert (second.item_id, second.skipped, second.choice) == (skipped, True, None)


def test_page_shows_api_errors_as_text(browser, store):
    item = store.enqueue("p", ["a", "b"])
    server = open_page(browser, store, "dee")
    try:
        cards(browser)
        store.add_rating(item, "dee", choice=1)  # the same rater, from elsewhere, first
        browser.find_elements(By.CSS_SELECTOR, "button.choose")[0].click()
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "error").is_displayed())
        assert (browser.find_element(By.ID, "error").text
                == "The rating was not saved: rater 'dee' has already rated item 1")
    finally:
        server.close()
    assert [(r.rater, r.choice) for r in store.ratings()] == [("dee", 1)]
