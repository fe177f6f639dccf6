"""demo.py: the caption API over real HTTP on a loopback port, bad uploads, and the page in headless Chromium."""
import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("flask", reason="the demo's tests need Flask: pip install -r requirements-demo.txt")

import demo  # noqa: E402


def multipart(fields, files):
    """A multipart/form-data body: fields {name: text}, files {name: (filename, bytes)} -> (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post(url, fields=None, files=None):
    """POST a form; returns (status, JSON answer), for error statuses too."""
    body, content_type = multipart(fields or {}, files or {})
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def jpeg(width=500, height=375, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[60:200, 100:300] = (220, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    """The demo app around the bundled model (the tiny test model often writes no word at all on a new
    photo), served on a free loopback port for this module's tests."""
    app = demo.create_app(demo.Captioner(demo.DEFAULT_MODEL), max_upload_mb=1)
    srv = demo.make_server(app, 0)
    assert srv.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    thread.join(timeout=10)


def healthy(base):
    with urllib.request.urlopen(base + "/health", timeout=30) as response:
        return json.load(response)["status"] == "ok"


def test_caption_api_answers_a_real_request(server):
    status, answer = post(server + "/api/caption", {"beam_size": "3"}, {"image": ("photo.jpg", jpeg())})
    assert status == 200, answer
    assert answer["caption"] == " ".join(answer["words"]) and answer["words"]
    grid = answer["grid"]
    assert len(answer["attention"]) == len(answer["words"])
    for row in answer["attention"]:  # one map per word over the grid, summing to 1
        assert len(row) == grid * grid and abs(sum(row) - 1) < 1e-3
    assert 1 <= len(answer["beams"]) <= 3 and answer["beams"][0]["caption"] == answer["caption"]
    scores = [b["score"] for b in answer["beams"]]  # they rank the beams; with a length penalty log_prob may not
    assert scores == sorted(scores, reverse=True) and all(b["log_prob"] <= 0 for b in answer["beams"])
    assert answer["image"].startswith("data:image/jpeg;base64,")


def test_page_and_examples_are_served(server):
    with urllib.request.urlopen(server + "/", timeout=30) as response:
        page = response.read().decode()
    assert "/api/caption" in page and "<canvas" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere else
    with urllib.request.urlopen(server + "/api/examples", timeout=30) as response:
        names = json.load(response)
    assert "astronaut.jpg" in names
    status, answer = post(server + "/api/caption", {"example": names[0], "beam_size": "1"})
    assert status == 200 and answer["words"]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server + "/examples/..%2Fdemo.py", timeout=30)
    assert err.value.code == 404


def decompression_bomb():
    """A 1-bit PNG of 25,000 x 25,000 pixels: a few kB on the wire, 625 million pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (25000, 25000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, data, fields, status, message", [
    ("notes.txt", b"this is not a photo\n" * 20, {}, 400, "not an image"),
    ("bomb.png", None, {}, 400, "decompression bomb"),
    ("big.jpg", os.urandom(3 * 2**20), {}, 413, "larger than 1 MB"),
    ("photo.jpg", jpeg(64, 48), {"beam_size": "0"}, 400, "beam size"),
    ("cut.jpg", jpeg()[:3000], {}, 400, "cut.jpg"),
])
def test_bad_uploads_get_their_error_and_the_server_stays_healthy(server, name, data, fields, status, message):
    data = decompression_bomb() if data is None else data
    got, answer = post(server + "/api/caption", fields, {"image": (name, data)})
    assert got == status, answer
    assert message in answer["error"], answer["error"]
    assert "Traceback" not in answer["error"] and "/tmp" not in answer["error"]
    assert healthy(server)
    got, answer = post(server + "/api/caption", {"beam_size": "2"}, {"image": ("next.jpg", jpeg(seed=1))})
    assert got == 200 and answer["words"]  # the next upload works


def test_missing_photo_and_unknown_example(server):
    assert post(server + "/api/caption")[0] == 400
    status, answer = post(server + "/api/caption", {"example": "../demo.py"})
    assert status == 400 and "no example photo" in answer["error"]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_page_in_headless_chromium(server, tmp_path):
    """Load the page, upload a photo through its file input, wait for the caption, save a screenshot."""
    browser, driver_path = find_chromium(), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no Chromium and chromedriver installed (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test drives Chromium with selenium "
                                                                "(pip install -r requirements-demo.txt)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg())
    shot = screenshot_page(webdriver, By, WebDriverWait, browser, driver_path, server, str(photo), tmp_path)
    image = Image.open(shot)
    assert image.size[0] >= 1000
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10  # a page was drawn, not a blank screen


def screenshot_page(webdriver, By, WebDriverWait, browser, driver_path, base, photo, out_dir):
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                 "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(base + "/")
        driver.find_element(By.ID, "file").send_keys(photo)
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "caption").get_attribute("data-done"))
        caption = driver.find_element(By.ID, "caption").text
        assert caption and not driver.find_element(By.ID, "error").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#words button")) == len(caption.split())
        path = os.path.join(str(out_dir), "demo.png")
        driver.save_screenshot(path)
        return path
    finally:
        driver.quit()


def test_a_port_out_of_range_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--port", "99999"])
    assert "expected a port number from 0 to 65535" in capsys.readouterr().err
