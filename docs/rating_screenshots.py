"""Screenshots of the rating page for the README: `python docs/rating_screenshots.py`.

Fills a throw-away run directory with a pairwise and a pointwise item, serves
the page, and photographs it in headless Chromium (Debian's ``chromium`` and
``chromium-driver``; nothing is downloaded) into ``docs/img/``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ouroboros_jax.rate import RatingServer, RatingStore

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

PROMPT = ("A train leaves at 14:35 and arrives at 17:10. How long is the journey? "
          "Think step by step and give the answer in hours and minutes.")
GOOD = ("From 14:35 to 17:35 is 3 hours.\n17:10 is 25 minutes before 17:35.\n"
        "3 h - 25 min = 2 h 35 min.\n\nAnswer: 2 hours 35 minutes")
BAD = ("17:10 - 14:35 = 3:75, which is 3 hours and 75 minutes,\nso 4 hours 15 minutes.\n\n"
       "Answer: 4 hours 15 minutes")
SUMMARY_PROMPT = ("Summarise in one sentence: the meeting moved from Tuesday to Thursday "
                  "because the room was booked.")
SUMMARY = "The meeting is now on Thursday, since the room was taken on Tuesday."


def driver(profile: str, width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=820)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as run, tempfile.TemporaryDirectory() as profile:
        store = RatingStore.in_run_dir(run)
        store.enqueue(PROMPT, [GOOD, BAD], step=120, example_id="train-times:17",
                      ensemble_scores=[[0.8, 0.9], [1.1, -0.4], [0.2, 0.7]], judge_confidence=0.58)
        store.enqueue(SUMMARY_PROMPT, [SUMMARY], mode="pointwise", step=120, example_id="summaries:4")
        for i in range(5):
            store.enqueue(f"filler {i}", ["a", "b"], priority=-1.0)
        web = driver(profile, args.width, args.height)
        with RatingServer(store, port=0, quiet=True) as server, web:
            web.get(server.page_url)
            web.execute_script("localStorage.setItem('rater', 'ada')")
            web.refresh()
            wait = WebDriverWait(web, 10)
            wait.until(lambda w: w.find_elements(By.CSS_SELECTOR, "#completions .completion"))
            web.save_screenshot(str(args.out / "rating_pairwise.png"))
            good = next(c for c in web.find_elements(By.CSS_SELECTOR, ".completion")
                        if c.get_attribute("data-index") == "0")
            good.find_element(By.CSS_SELECTOR, "button.choose").click()
            wait.until(lambda w: w.find_elements(By.CSS_SELECTOR, ".completion .scale"))
            web.find_elements(By.CSS_SELECTOR, ".scale .score")[3].click()
            web.save_screenshot(str(args.out / "rating_pointwise.png"))
    print(f"wrote {args.out / 'rating_pairwise.png'} and {args.out / 'rating_pointwise.png'}")


if __name__ == "__main__":
    main()
