"""The web demo's speed: time from upload to caption for a 500x375 photo, over real HTTP (a benchmark, not a test).

    python bench/demo_speed.py [--requests 5] [--beam-size 3] [--screenshot assets/demo.png]

Starts demo.py's server with the bundled model on a free loopback port, uploads the same photo (an example photo
resized to 500x375) several times, and prints the median upload-to-answer time, the server's own part of it,
and the load average. --screenshot also drives the page in headless Chromium (selenium and Debian's chromium
and chromium-driver) and saves what it shows after captioning the photo.
"""
import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import demo  # noqa: E402
from test_demo import post  # noqa: E402


def photo_500x375(name):
    buffer = io.BytesIO()
    Image.open(os.path.join(demo.EXAMPLES, name)).convert("RGB").resize((500, 375), Image.BICUBIC).save(
        buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def screenshot(base, photo_bytes, path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    with tempfile.TemporaryDirectory() as folder:
        photo = os.path.join(folder, "coffee_500x375.jpg")
        with open(photo, "wb") as f:
            f.write(photo_bytes)
        try:
            driver.get(base + "/")
            driver.find_element(By.ID, "file").send_keys(photo)
            WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "caption").get_attribute("data-done"))
            buttons = driver.find_elements(By.CSS_SELECTOR, "#words button")
            if len(buttons) > 3:
                buttons[3].click()  # show a content word's attention rather than the first "a"
            time.sleep(0.5)
            driver.save_screenshot(path)
            print(f"screenshot: {path} (caption: {driver.find_element(By.ID, 'caption').text})")
        finally:
            driver.quit()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--photo", default="coffee.jpg", help="which example photo to resize to 500x375")
    p.add_argument("--screenshot", help="also save the page in headless Chromium to this PNG")
    args = p.parse_args()
    server = demo.make_server(demo.create_app(demo.Captioner(demo.DEFAULT_MODEL)), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    data = photo_500x375(args.photo)
    post(base + "/api/caption", {"beam_size": str(args.beam_size)}, {"image": ("warm-up.jpg", data)})  # warm-up
    total, inside = [], []
    for _ in range(args.requests):
        start = time.time()
        status, answer = post(base + "/api/caption", {"beam_size": str(args.beam_size)}, {"image": ("p.jpg", data)})
        total.append(time.time() - start)
        assert status == 200, answer
        inside.append(answer["seconds"])
    load = os.getloadavg()[0]
    print(f"500x375 photo, beam {args.beam_size}, {args.requests} requests after a warm-up: upload to caption "
          f"{statistics.median(total):.3f} s median (server side {statistics.median(inside):.3f} s); "
          f"caption: {answer['caption']!r}; load average {load:.2f} on {os.cpu_count()} CPUs")
    if args.screenshot:
        screenshot(base, data, args.screenshot)
    server.shutdown()


if __name__ == "__main__":
    main()
