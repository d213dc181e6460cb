"""harmon serve: the JSON / event-stream API on a live server (tiny model, 32 px, a few steps), bad
input (each a clear error, the server answering the next request), the command's startup errors,
and the page itself in headless Chromium."""

import argparse
import base64
import io
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from harmon.web.server import add_serve_command, make_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
BODY_LIMIT = 2 * 2 ** 20  # small, so the 413 test stays cheap


@pytest.fixture(scope="module")
def server(tiny_harmon):
    srv = make_server(tiny_harmon, "127.0.0.1", 0, steps=2, size=32, max_new_tokens=8,
                      preview_interval=0.0, max_body_bytes=BODY_LIMIT)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


# ---- helpers --------------------------------------------------------------------------------

def call(server, path, body=None, content_type="application/json", method=None):
    """(status, parsed JSON or raw bytes) of one request; HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, ctype, raw = r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        status, ctype, raw = e.code, e.headers.get("Content-Type", ""), e.read()
    return status, json.loads(raw) if ctype == "application/json" else raw


def events(raw: bytes) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in raw.decode().split("\n\n")
            if line.startswith("data: ")]


def png(width=48, height=40, fmt="PNG") -> bytes:
    im = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(im).ellipse((width // 5, height // 5, width // 2, height // 2), fill="red")
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def multipart(fields: dict) -> tuple[bytes, str]:
    """fields: name -> str, or name -> (filename, bytes) for a file."""
    boundary = "harmon-test-boundary-7f3a"
    out = b""
    for name, value in fields.items():
        if isinstance(value, tuple):
            head = (f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n'
                    "Content-Type: application/octet-stream\r\n")
            data = value[1]
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"\r\n', value.encode()
        out += f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2])))


def still_up(server) -> None:
    status, info = call(server, "/api/info")
    assert status == 200 and info["name"].startswith("tiny")


# ---- the API ----------------------------------------------------------------------------------

def test_info_and_static_files(server):
    status, info = call(server, "/api/info")
    assert status == 200 and info["trained"] is False and "random weights" in info["warning"]
    assert info["defaults"]["size"] == 32 and info["defaults"]["steps"] == 2
    status, page = call(server, "/")
    assert status == 200 and b"<title>Harmon</title>" in page and b"app.js" in page
    assert call(server, "/app.js")[0] == 200 and call(server, "/style.css")[0] == 200
    for path in ("/nope.html", "/../server.py", "/api/nothing"):
        status, body = call(server, path)
        assert status == 404 and "no " in body["error"]
    status, body = call(server, "/api/generate")  # GET on a POST endpoint
    assert status == 405 and "POST" in body["error"]


def test_requests_default_to_the_models_own_sampling(server, tiny_harmon, monkeypatch):
    """A request naming no cfg / temperature / candidates gets the model's (config.json
    "sampling"), unless harmon serve set the page's cfg; /api/info shows the page what it will
    get."""
    from harmon.web.server import ServerSettings, parse_generate

    monkeypatch.setitem(tiny_harmon.sampling, "temperature", 0.8)
    monkeypatch.setitem(tiny_harmon.sampling, "cfg", 2.0)
    monkeypatch.setitem(tiny_harmon.sampling, "candidates", 3)
    req = parse_generate({"prompt": "a red circle"}, tiny_harmon, ServerSettings())
    assert (req.cfg, req.temperature, req.candidates) == (2.0, 0.8, 3)
    # a server whose limit is below the model's own gets its limit, not an error
    req = parse_generate({"prompt": "a red circle"}, tiny_harmon, ServerSettings(max_candidates=2))
    assert req.candidates == 2
    req = parse_generate({"prompt": "a red circle", "temperature": 1.0}, tiny_harmon,
                         ServerSettings(cfg=4.0))
    assert (req.cfg, req.temperature) == (4.0, 1.0)
    defaults = call(server, "/api/info")[1]["defaults"]  # a server given no cfg of its own
    assert (defaults["cfg"], defaults["temperature"], defaults["candidates"]) == (2.0, 0.8, 3)


def test_generate_streams_previews_then_the_images(server, tiny_harmon):
    status, raw = call(server, "/api/generate", {"prompt": "a red circle", "n": 2, "seed": 3,
                                                 "cfg": 2.0, "steps": 3})
    assert status == 200
    evs = events(raw)
    progress = [e for e in evs if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3] and progress[0]["steps"] == 3
    # a preview after every step but the last (whose picture is the final image)
    assert [len(e.get("previews", [])) for e in progress] == [2, 2, 0]
    assert decode_data_url(progress[0]["previews"][1]).size == (32, 32)
    done = evs[-1]
    assert done["type"] == "done" and done["seed"] == 3 and len(done["images"]) == 2
    # the server passes the settings through: the same images as the Python API
    direct = tiny_harmon.generate("a red circle", num_images_per_prompt=2, size=32, steps=3,
                                  cfg=2.0, seed=3)
    for url, im in zip(done["images"], direct, strict=True):
        assert decode_data_url(url).convert("RGB").tobytes() == im.tobytes()


def test_generate_best_of_candidates(server, tiny_harmon):
    status, raw = call(server, "/api/generate", {"prompt": "a red circle", "seed": 1, "steps": 2,
                                                 "candidates": 3})
    evs = events(raw)
    assert status == 200 and evs[-1]["type"] == "done" and evs[-1]["candidates"] == 3
    assert len(evs[0]["previews"]) == 3  # every candidate fills in live
    direct = tiny_harmon.generate("a red circle", size=32, steps=2, seed=1, candidates=3)
    assert [decode_data_url(u).convert("RGB").tobytes() for u in evs[-1]["images"]] == \
        [im.tobytes() for im in direct]


def test_generate_names_free_colours_and_reports_the_texts(server, tiny_harmon, monkeypatch):
    status, raw = call(server, "/api/generate", {"prompt": "two stars", "n": 2, "seed": 1,
                                                 "steps": 2, "name_colors": True})
    done = events(raw)[-1]
    assert status == 200 and done["type"] == "done"
    direct = tiny_harmon.generate("two stars", num_images_per_prompt=2, size=32, steps=2, seed=1,
                                  name_colors=True)
    assert done["prompts"] == [im.info["prompt"] for im in direct] and "stars" in done["prompts"][0]
    assert [decode_data_url(u).convert("RGB").tobytes() for u in done["images"]] == \
        [im.tobytes() for im in direct]
    # naming none gets the model's own default
    from harmon.web.server import ServerSettings, parse_generate

    assert parse_generate({"prompt": "a"}, tiny_harmon, ServerSettings()).name_colors is False
    monkeypatch.setitem(tiny_harmon.sampling, "name_colors", True)
    assert parse_generate({"prompt": "a"}, tiny_harmon, ServerSettings()).name_colors is True
    assert call(server, "/api/info")[1]["defaults"]["name_colors"] is True


def test_generate_with_self_correction(server, tiny_harmon):
    status, raw = call(server, "/api/generate", {"prompt": "a red circle", "seed": 2, "steps": 2,
                                                 "refine": 2})
    evs = events(raw)
    assert status == 200 and evs[-1]["type"] == "done" and evs[-1]["refine"] == 2
    progress = [e for e in evs if e["type"] == "progress"]
    # 4 tokens: one re-masked and re-drawn in one step per round
    assert [e["step"] for e in progress] == [1, 2, 3, 4] and progress[0]["steps"] == 4
    direct = tiny_harmon.generate("a red circle", size=32, steps=2, seed=2, refine=2)
    assert [decode_data_url(u).convert("RGB").tobytes() for u in evs[-1]["images"]] == \
        [im.tobytes() for im in direct]


def test_long_prompt_is_truncated_with_a_warning_and_seed_reported(server):
    status, raw = call(server, "/api/generate", {"prompt": "a red circle " * 40, "seed": "",
                                                 "size": 16, "steps": 1})
    assert status == 200
    evs = events(raw)
    warns = [e["message"] for e in evs if e["type"] == "warning"]
    assert len(warns) == 1 and "truncated to 128" in warns[0]
    assert evs[-1]["type"] == "done" and isinstance(evs[-1]["seed"], int)  # random, reported


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": ""}, 400, "empty prompt"),
    ({"prompt": "   \n"}, 400, "empty prompt"),
    ({}, 400, "empty prompt"),
    ({"prompt": 7}, 400, "prompt must be a string"),
    ({"prompt": "a", "steps": 99}, 400, "steps must be between 1 and 4"),
    ({"prompt": "a", "cfg": 0.5}, 400, "cfg must be between 1"),
    ({"prompt": "a", "n": 50}, 400, "n must be between 1 and 4"),
    ({"prompt": "a", "candidates": 0}, 400, "candidates must be between 1 and 8"),
    ({"prompt": "a", "refine": 9}, 400, "refine must be between 0 and 8"),
    ({"prompt": "a", "seed": "abc"}, 400, "seed must be an integer"),
    ({"prompt": "a", "size": 40}, 400, "multiple of 16"),
    ({"prompt": "a", "cfg_schedule": "cubic"}, 400, "cfg_schedule"),
    ({"prompt": "a", "name_colors": "yes"}, 400, "name_colors must be true or false"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
])
def test_generate_bad_input(server, body, status, message):
    got, reply = call(server, "/api/generate", body)
    assert got == status and message in reply["error"]
    still_up(server)


def test_answer_multipart_and_json(server):
    body, ctype = multipart({"image": ("circle.png", png()), "question": "What colour is it?"})
    status, reply = call(server, "/api/answer", body, ctype)
    assert status == 200 and isinstance(reply["answer"], str) and reply["warnings"] == []
    url = "data:image/jpeg;base64," + base64.b64encode(png(fmt="JPEG")).decode()
    status, reply = call(server, "/api/answer", {"image": url, "question": "Describe it."})
    assert status == 200 and reply["image_size"] == [48, 40]


def test_huge_upload_is_resized(server):
    body, ctype = multipart({"image": ("big.png", png(3000, 1500)), "question": "What is it?"})
    status, reply = call(server, "/api/answer", body, ctype)
    assert status == 200 and reply["image_size"] == [2048, 1024]
    assert "3000x1500 pixels resized to 2048x1024" in reply["warnings"][0]


@pytest.mark.parametrize("fields, status, message", [
    ({"image": ("notes.txt", b"hello, I am not a picture"), "question": "What?"}, 400,
     "not an image"),
    ({"image": ("cut.png", png()[:60]), "question": "What?"}, 400, "not an image"),
    ({"image": ("empty.png", b""), "question": "What?"}, 400, "no image uploaded"),
    ({"question": "What?"}, 400, "no image uploaded"),
    ({"image": ("circle.png", png()), "question": " "}, 400, "empty question"),
    ({"image": ("circle.png", png()), "question": "why? " * 500}, 400, "too long"),
])
def test_answer_bad_input(server, fields, status, message):
    got, reply = call(server, "/api/answer", *multipart(fields))
    assert got == status and message in reply["error"]
    still_up(server)


def test_answer_bad_encodings_and_oversized_body(server):
    status, reply = call(server, "/api/answer", {"image": "@@not base64@@", "question": "What?"})
    assert status == 400 and "base64" in reply["error"]
    status, reply = call(server, "/api/answer", b"hello", "text/plain")
    assert status == 415 and "multipart/form-data or JSON" in reply["error"]
    body, ctype = multipart({"image": ("big.bin", b"\0" * (BODY_LIMIT + 4096)), "question": "?"})
    status, reply = call(server, "/api/answer", body, ctype)
    assert status == 413 and "too large" in reply["error"]
    still_up(server)


def test_jobs_wait_their_turn(server):
    """A request arriving while the model is busy is told so, then served."""
    server.lock.acquire()  # stands in for another job
    try:
        req = urllib.request.Request(server.url + "api/generate", method="POST",
                                     data=json.dumps({"prompt": "x", "size": 16}).encode())
        stream = urllib.request.urlopen(req, timeout=60)
        first = json.loads(stream.readline().decode()[len("data: "):])
        assert first["type"] == "queued"
    finally:
        server.lock.release()
    with stream:
        assert events(stream.read())[-1]["type"] == "done"


def test_a_failing_model_reports_and_the_server_survives(server, tiny_harmon, capsys):
    class Broken:
        def __getattr__(self, name):
            return getattr(tiny_harmon, name)

        def generate(self, *args, **kwargs):
            raise RuntimeError("the accelerator caught fire")

    server.model = Broken()
    try:
        status, raw = call(server, "/api/generate", {"prompt": "a red circle"})
    finally:
        server.model = tiny_harmon
    assert status == 200  # the stream had started: the error is its last event
    last = events(raw)[-1]
    assert last == {"type": "error",
                    "message": "internal error: RuntimeError: the accelerator caught fire"}
    assert "Traceback" in capsys.readouterr().err  # logged on the server side
    still_up(server)


# ---- the command --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--device", "quantum"], "unknown device 'quantum'"),
    (["--device", "cpu", "--checkpoint", "/no/such/harmon_1.5b.pth"], "no model at"),
    (["--checkpoint", "tiny", "--device", "cpu", "--cfg", "0.5"], "--cfg must be >= 1"),
])
def test_serve_startup_errors_are_one_line(argv, message, capsys):
    parser = argparse.ArgumentParser(prog="harmon")
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *argv])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("harmon: error:") and message in err and len(err.splitlines()) == 1


def test_serve_port_in_use(server, capsys):
    parser = argparse.ArgumentParser(prog="harmon")
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--checkpoint", "tiny", "--device", "cpu",
                              "--port", str(server.server_address[1])])
    assert args.func(args) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


# ---- the page in a browser -----------------------------------------------------------------------

@pytest.mark.skipif(not CHROMIUM.exists(),
                    reason="needs Debian's chromium at /usr/bin/chromium "
                           "(apt-get install -y chromium)")
def test_page_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright

    upload = tmp_path / "circle.png"
    upload.write_bytes(png(120, 90))
    shot = tmp_path / "page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            errors = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.set_default_timeout(60_000)
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")
            assert "random weights" in page.inner_text("#model-warning")

            page.click("#generate")  # empty prompt: the server's message is shown
            page.wait_for_selector("#gen-messages .error")
            assert "empty prompt" in page.inner_text("#gen-messages")

            page.fill("#prompt", "a red circle to the left of a blue square")
            page.fill("#seed", "5")
            page.fill("#candidates", "2")
            page.fill("#refine", "1")
            page.click("#generate")
            page.wait_for_selector("#images img.final")
            assert page.locator("#images img").count() == 1  # the pick of the two candidates
            assert page.locator("#gen-messages .error").count() == 0
            assert int(page.get_attribute("#images", "data-previews")) >= 1  # live preview seen
            assert page.eval_on_selector("#images img.final", "img => img.naturalWidth") == 32
            assert "seed 5" in page.inner_text("#gen-status")
            assert "1 round(s) of self-correction" in page.inner_text("#gen-status")
            assert "best of 2" in page.inner_text("#gen-status")
            assert "drawn as" not in page.inner_text("#images")  # the prompt names its colours

            # a shape without a colour, with "Name colours" ticked: the text drawn is shown
            assert not page.is_checked("#name-colors")  # the tiny model's default
            page.fill("#prompt", "two stars")
            page.fill("#candidates", "1")
            page.fill("#refine", "0")
            page.check("#name-colors")
            page.click("#generate")
            page.wait_for_selector("#images .drawn-as")
            assert re.search(r"drawn as “two \w+ stars”", page.inner_text("#images"))

            page.set_input_files("#image", str(upload))
            page.fill("#question", "What colour is the circle?")
            page.click("#ask")
            page.wait_for_selector("#answer[data-state='done']")
            assert page.inner_text("#answer").strip()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    # no script errors, no blocked resources (the empty prompt's 400 is logged; it is expected)
    assert [e for e in errors if "status of 400" not in e] == []
    im = Image.open(shot)
    assert im.format == "PNG" and im.width == 1000 and im.height > 800
    assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 200  # text, images: not blank
