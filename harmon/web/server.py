"""``harmon serve``: one web page for text to image (with a live preview) and image questions.

Standard library only: a :class:`http.server.ThreadingHTTPServer` serves the static page in
``harmon/web/static`` and three JSON endpoints (docs/web.md has the protocol and the reasons):

    GET  /                  the page (index.html, app.js, style.css)
    GET  /api/info          model name, device, dtype, ``trained``, page defaults and limits
    POST /api/generate      JSON {prompt, n, seed, cfg, steps, candidates?, refine?,
                            name_colors?, size?} -> text/event-stream:
                            queued?, warning*, progress (with previews)*, then done or error
    POST /api/answer        multipart/form-data (image, question) or JSON {image: base64 or
                            data URL, question} -> {"answer": ...}

One model serves every request, so model work is serialised by one lock: a second job waits
(its stream says "queued"). A bad request gets JSON ``{"error": message}`` with 400/404/405/411/
413, a failure inside the model 500 (or an ``error`` event once a stream has started); the
server itself keeps running either way.

    >>> server = make_server(Harmon.from_pretrained("tiny"), "127.0.0.1", 0)
    >>> threading.Thread(target=server.serve_forever, daemon=True).start(); server.url
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import random
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

STATIC_DIR = Path(__file__).parent / "static"
# the only files served: a whitelist, so no request path ever reaches the file system
STATIC_FILES = {"index.html": "text/html; charset=utf-8",
                "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
# the page loads nothing from elsewhere; images arrive as data: URLs, uploads show as blob: URLs
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'"


@dataclass
class ServerSettings:
    """Page defaults and request limits (``harmon serve`` flags set the first few)."""

    steps: int = 64  # default K shown on the page
    cfg: float | None = None  # default guidance scale shown on the page; None = the model's
    size: int | None = None  # generation size; None = the model's image_size
    max_new_tokens: int = 256  # answer length unless the request asks for less
    max_images: int = 4  # images per generate request
    max_candidates: int = 8  # draws per image kept (best of N by the model's own score)
    max_refine: int = 8  # rounds of self-correction per image
    max_size: int = 1024  # largest generation size a request may ask for
    max_body_bytes: int = 20 * 2 ** 20  # larger request bodies get 413
    max_image_side: int = 2048  # uploads with a longer side are downscaled before answering
    max_image_pixels: int = 80_000_000  # larger uploads are refused (decompression bombs)
    max_question_chars: int = 2000
    preview_interval: float = 0.25  # seconds between live previews (each one decodes the VAE)
    preview_side: int = 256  # previews are shrunk to at most this many pixels a side
    compile: bool = False  # compile the diffusion head (``harmon serve --compile``)


class RequestError(Exception):
    """A bad request: answered with ``{"error": message}`` and ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ClientGone(Exception):
    """The browser closed the stream; raised from ``on_step`` to stop generating for nobody."""


# ---- the server -------------------------------------------------------------------------------

class HarmonServer(ThreadingHTTPServer):
    """An HTTP server holding one :class:`harmon.Harmon` and the lock that serialises its use."""

    daemon_threads = True  # a stuck client never blocks shutdown

    def __init__(self, model, address: tuple[str, int], settings: ServerSettings | None = None,
                 log: bool = False):
        self.model = model
        self.settings = settings or ServerSettings()
        self.lock = threading.Lock()
        self.log = log
        super().__init__(address, HarmonHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"

    def handle_error(self, request, client_address):
        # errors inside a handler are answered there; this only sees broken connections
        if self.log:
            print(f"harmon serve: connection from {client_address[0]} failed: "
                  f"{sys.exc_info()[1]!r}", file=sys.stderr)


def make_server(model, host: str = "127.0.0.1", port: int = 7860, *, log: bool = False,
                **settings) -> HarmonServer:
    """A :class:`HarmonServer` bound to ``host:port`` (port 0: any free port; see ``.url``).

    Keyword arguments set :class:`ServerSettings` fields (``steps``, ``size``, limits, ...).
    Call ``serve_forever()`` (in a thread for tests) and ``shutdown()`` / ``server_close()``.
    """
    return HarmonServer(model, (host, port), ServerSettings(**settings), log=log)


# ---- request parsing --------------------------------------------------------------------------

def _number(body: dict, key: str, default, lo, hi, integer: bool):
    """``body[key]`` as an int/float in [lo, hi]; missing, null or "" gives ``default``."""
    v = body.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        return default
    kind = "an integer" if integer else "a number"
    try:
        if isinstance(v, bool):
            raise ValueError
        x = float(v)
    except (TypeError, ValueError):
        raise RequestError(400, f"{key} must be {kind}, got {v!r}") from None
    if not math.isfinite(x) or (integer and not x.is_integer()):
        raise RequestError(400, f"{key} must be {kind}, got {v!r}")
    if not lo <= x <= hi:
        raise RequestError(400, f"{key} must be between {lo} and {hi}, got {v!r}")
    return int(x) if integer else x


@dataclass
class GenerateRequest:
    prompt: str
    n: int
    seed: int
    cfg: float
    steps: int
    size: int
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    candidates: int = 1
    refine: int = 0
    name_colors: bool = False


def page_cfg(model, settings: ServerSettings) -> float:
    """The guidance scale a request gets when it names none: the server's, else the model's."""
    return settings.cfg if settings.cfg is not None else model.sampling["cfg"]


def page_candidates(model, settings: ServerSettings) -> int:
    """The draws per image a request gets when it names none: the model's, within the limit."""
    return min(model.sampling["candidates"], settings.max_candidates)


def parse_generate(body: dict, model, settings: ServerSettings) -> GenerateRequest:
    """Check a /api/generate body; every problem is a 400 naming the field and the bad value."""
    prompt = body.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise RequestError(400, "empty prompt: describe the image to generate")
    if not isinstance(prompt, str):
        raise RequestError(400, f"prompt must be a string, got {type(prompt).__name__}")
    default_size = settings.size or model.cfg.image_size
    size = _number(body, "size", default_size, 1, max(settings.max_size, default_size), True)
    try:
        h, w = model.model.grid_for(size)
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    schedule = body.get("cfg_schedule") or "constant"
    if schedule not in ("constant", "linear"):
        raise RequestError(400, f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")
    seed = _number(body, "seed", None, 0, 2 ** 31 - 1, True)
    name_colors = body.get("name_colors")
    if name_colors is None:
        name_colors = model.sampling["name_colors"]
    if not isinstance(name_colors, bool):
        raise RequestError(400, f"name_colors must be true or false, got {name_colors!r}")
    return GenerateRequest(
        prompt=prompt,
        n=_number(body, "n", 1, 1, settings.max_images, True),
        seed=random.randrange(2 ** 31 - 1) if seed is None else seed,  # chosen here, reported back
        cfg=_number(body, "cfg", page_cfg(model, settings), 1.0, 50.0, False),
        steps=_number(body, "steps", min(settings.steps, h * w), 1, h * w, True),
        size=size, cfg_schedule=schedule,
        temperature=_number(body, "temperature", model.sampling["temperature"], 1e-3, 10.0, False),
        candidates=_number(body, "candidates", page_candidates(model, settings), 1,
                           settings.max_candidates, True),
        refine=_number(body, "refine", 0, 0, settings.max_refine, True), name_colors=name_colors)


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """multipart/form-data -> {field name: raw bytes} (files and plain fields alike)."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not boundary:
        raise RequestError(400, "multipart/form-data body without a boundary")
    fields = {}
    for part in body.split(b"--" + str(boundary).encode())[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = BytesHeaderParser().parsebytes(head).get_param("name", header="content-disposition")
        if sep and name:
            fields[str(name)] = content.removesuffix(b"\r\n")
    return fields


def _decode_base64_image(value) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, "image must be a base64 string or a data: URL")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise RequestError(400, "image is not valid base64") from None


def open_upload(data: bytes, settings: ServerSettings) -> tuple[Image.Image, list[str]]:
    """Upload bytes -> an RGB image no larger than ``max_image_side``, and warnings for the user."""
    if not data:
        raise RequestError(400, "no image uploaded: choose an image file")
    try:
        im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > settings.max_image_pixels:
            raise RequestError(400, f"image of {w}x{h} pixels is too large; at most "
                                    f"{settings.max_image_pixels / 1e6:g} megapixels")
        side = settings.max_image_side
        im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale when that suffices
        im.load()
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError(400, "image is too large (Pillow refuses it as a decompression bomb)") \
            from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise RequestError(400, f"not an image: the upload could not be read as PNG, JPEG, WebP, "
                                f"GIF or BMP ({type(e).__name__})") from None
    im = ImageOps.exif_transpose(im)
    notes = []
    if max(im.size) > side:
        before = "x".join(map(str, (w, h)))
        im.thumbnail((side, side), Image.LANCZOS)
        notes.append(f"image of {before} pixels resized to {im.size[0]}x{im.size[1]} "
                     f"(longer side at most {side}) before answering")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)  # transparent areas become white, not black
    return im.convert("RGB"), notes


def png_data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _warning_texts(caught) -> list[str]:
    return [str(w.message) for w in caught]


# ---- request handling -------------------------------------------------------------------------

class HarmonHandler(BaseHTTPRequestHandler):
    server: HarmonServer
    server_version = "harmon"
    # HTTP/1.0: one request per connection, so an event stream simply ends when the server closes

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._streaming = False
        path = urlsplit(self.path).path
        routes = {"/api/info": ("GET", self.api_info),
                  "/api/generate": ("POST", self.api_generate),
                  "/api/answer": ("POST", self.api_answer)}
        try:
            if path in routes:
                allowed, handler = routes[path]
                if method != allowed:
                    raise RequestError(405, f"{path} takes {allowed}, not {method}")
                handler()
            elif method == "GET":
                self.static(path)
            else:
                raise RequestError(404, f"no endpoint {path}")
        except RequestError as e:
            self._fail(e.status, e.message)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left
        except Exception as e:  # never let one request take the server down
            traceback.print_exc(file=sys.stderr)
            self._fail(500, f"internal error: {type(e).__name__}: {e}")

    # -- responses

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _fail(self, status: int, message: str) -> None:
        try:
            if self._streaming:  # headers are out: the error becomes the stream's last event
                self._event({"type": "error", "message": message})
            else:
                self.close_connection = True
                self._json(status, {"error": message})
        except OSError:
            pass

    def _event(self, obj) -> None:
        """One Server-Sent Event: ``data: <json>`` and a blank line."""
        self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
        self.wfile.flush()

    def log_message(self, format, *args):
        if self.server.log:
            sys.stderr.write(f"harmon serve: {self.address_string()} {format % args}\n")

    # -- request bodies

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "Content-Length header required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        limit = self.server.settings.max_body_bytes
        if n > limit:
            if n <= 4 * limit:  # read it away, so the client sees the 413 and not a reset
                while n > 0:
                    chunk = self.rfile.read(min(n, 1 << 20))
                    n = n - len(chunk) if chunk else 0
            raise RequestError(413, f"request of {int(length) / 2 ** 20:.1f} MB is too large; "
                                    f"the limit is {limit / 2 ** 20:g} MB")
        return self.rfile.read(n)

    def _json_body(self) -> dict:
        raw = self._body()
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        return body

    # -- endpoints

    def static(self, path: str) -> None:
        name = path.lstrip("/") or "index.html"
        if name not in STATIC_FILES:
            raise RequestError(404, f"no page {path}")
        self._send(200, (STATIC_DIR / name).read_bytes(), STATIC_FILES[name],
                   {"Content-Security-Policy": CSP})

    def api_info(self) -> None:
        model, s = self.server.model, self.server.settings
        info = model.info()
        info["warning"] = None if model.trained else \
            "random weights: images and answers are noise until trained weights are loaded"
        info["defaults"] = {"n": 1, "seed": 0, "cfg": page_cfg(model, s), "steps": s.steps,
                            "temperature": model.sampling["temperature"],
                            "candidates": page_candidates(model, s),
                            "refine": 0, "size": s.size or model.cfg.image_size,
                            "name_colors": model.sampling["name_colors"]}
        info["limits"] = {"max_images": s.max_images, "max_candidates": s.max_candidates,
                          "max_refine": s.max_refine, "max_body_bytes": s.max_body_bytes,
                          "max_image_side": s.max_image_side, "max_prompt_tokens": 128,
                          "size_multiple": model.cfg.mar.vae_stride,
                          "max_question_chars": s.max_question_chars}
        self._json(200, info)

    def api_generate(self) -> None:
        server, model = self.server, self.server.model
        req = parse_generate(self._json_body(), model, server.settings)
        grid = model.model.grid_for(req.size)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # proxies: do not hold events back
        self.end_headers()
        self._streaming = True
        if not server.lock.acquire(blocking=False):
            self._event({"type": "queued", "message": "waiting for the job before this one"})
            server.lock.acquire()
        try:
            self._run_generation(req, grid)
        finally:
            server.lock.release()

    def _run_generation(self, req: GenerateRequest, grid: tuple[int, int]) -> None:
        model, s = self.server.model, self.server.settings
        t0 = last_preview = time.perf_counter()
        seen, sent = set(), 0

        def flush_warnings():
            # each new message once (the tokenizer warns once per image of a prompt)
            nonlocal sent
            for text in _warning_texts(caught[sent:]):
                if text not in seen:
                    seen.add(text)
                    self._event({"type": "warning", "message": text})
            sent = len(caught)

        def on_step(info) -> None:
            nonlocal last_preview
            try:
                flush_warnings()
                event = {"type": "progress", "step": info.step + 1, "steps": info.num_steps}
                now = time.perf_counter()
                # the last step's preview would be the final image, which comes next anyway
                if info.step + 1 < info.num_steps and (
                        info.step == 0 or now - last_preview >= s.preview_interval):
                    previews = model.preview(info, grid)
                    for im in previews:
                        im.thumbnail((s.preview_side, s.preview_side))
                    event["previews"] = [png_data_url(im) for im in previews]
                    last_preview = time.perf_counter()
                self._event(event)
            except OSError as e:
                raise ClientGone() from e

        # the lock makes this the only thread using the model, so catching warnings (process-
        # global state) here sees exactly this job's, e.g. the tokenizer's prompt truncation
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                images = model.generate(req.prompt, num_images_per_prompt=req.n, size=req.size,
                                        steps=req.steps, cfg=req.cfg,
                                        cfg_schedule=req.cfg_schedule,
                                        temperature=req.temperature, seed=req.seed,
                                        candidates=req.candidates, refine=req.refine,
                                        name_colors=req.name_colors, compile=s.compile,
                                        on_step=on_step)
            except ClientGone:
                return
            except (ValueError, TypeError) as e:
                self._fail(400, str(e))
                return
            except Exception as e:
                if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
                    _free_accelerator_memory()
                    self._fail(500, "out of accelerator memory: ask for fewer images, a "
                                    "smaller size, or run on a larger device")
                    return
                raise
            try:
                flush_warnings()
                self._event({"type": "done", "images": [png_data_url(im) for im in images],
                             "prompts": [im.info.get("prompt", req.prompt) for im in images],
                             "seed": req.seed, "size": req.size, "steps": req.steps,
                             "cfg": req.cfg, "candidates": req.candidates,
                             "refine": req.refine,
                             "seconds": round(time.perf_counter() - t0, 2)})
            except OSError:
                return

    def api_answer(self) -> None:
        s = self.server.settings
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            fields = parse_multipart(self._body(), ctype)
            image = fields.get("image", b"")
            question = fields.get("question", b"").decode("utf-8", "replace")
            max_new = fields.get("max_new_tokens", b"").decode("ascii", "replace")
        elif ctype.startswith("application/json") or not ctype:
            body = self._json_body()
            image = _decode_base64_image(body.get("image", ""))
            question, max_new = body.get("question", ""), body.get("max_new_tokens")
        else:
            raise RequestError(415, f"send the image as multipart/form-data or JSON, not {ctype}")
        if not isinstance(question, str) or not question.strip():
            raise RequestError(400, "empty question: ask something about the image")
        if len(question) > s.max_question_chars:
            raise RequestError(400, f"question of {len(question)} characters is too long; at "
                                    f"most {s.max_question_chars}")
        max_new = _number({"max_new_tokens": max_new}, "max_new_tokens", s.max_new_tokens, 1,
                          max(s.max_new_tokens, 1024), True)
        im, notes = open_upload(image, s)
        t0 = time.perf_counter()
        with self.server.lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                text = self.server.model.answer(im, question, max_new_tokens=max_new)[0]
            except (ValueError, TypeError) as e:
                raise RequestError(400, str(e)) from None
            except Exception as e:
                if type(e).__name__ == "OutOfMemoryError":
                    _free_accelerator_memory()
                    raise RequestError(500, "out of accelerator memory while answering") from None
                raise
        notes += [w for w in dict.fromkeys(_warning_texts(caught)) if w not in notes]
        self._json(200, {"answer": text, "warnings": notes,
                         "image_size": list(im.size),
                         "seconds": round(time.perf_counter() - t0, 2)})


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the command --------------------------------------------------------------------------------

def add_serve_command(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``harmon`` subparsers; the handler is ``args.func(args)``."""
    from ..cli import _add_model_args, examples

    p = subparsers.add_parser(
        "serve", help="web page: text to image with a live preview, and image questions",
        description="Serve a local web page: type a prompt and watch the image fill in, or upload "
                    "an image and ask about it. Standard library HTTP server; nothing is fetched "
                    "from the internet.",
        **examples("harmon serve", "harmon serve --port 0 --steps 32",
                   "harmon serve --checkpoint /models/harmon_1.5b.pth --tokenizer /models/qwen "
                   "--device cuda --host 0.0.0.0"))
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    p.add_argument("--steps", type=int, default=64, help="default steps shown on the page")
    p.add_argument("--cfg", type=float, default=None,
                   help="default guidance scale shown on the page (default: the model's, see "
                        "harmon info)")
    p.add_argument("--size", type=int, default=None,
                   help="generation size, a multiple of 16 (default: the model's)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--quiet", action="store_true", help="do not log requests")
    p.add_argument("--compile", action="store_true",
                   help="compile the diffusion head before serving (up to a minute on a small "
                        "CPU, once; every image is faster afterwards)")
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    """Load the model, then serve until Ctrl+C. Startup errors: one line and exit code 2."""
    from ..pipeline import Harmon

    try:
        model = Harmon.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                       vae=args.vae, tokenizer=args.tokenizer)
        if args.size is not None:
            model.model.grid_for(args.size)
        if args.cfg is not None and not args.cfg >= 1:
            raise ValueError(f"--cfg must be >= 1 (1 disables guidance), got {args.cfg}")
        server = make_server(model, args.host, args.port, log=not args.quiet, steps=args.steps,
                             cfg=args.cfg, size=args.size, max_new_tokens=args.max_new_tokens,
                             compile=args.compile)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"harmon: error: {e}", file=sys.stderr)
        return 2
    except (OSError, OverflowError) as e:
        print(f"harmon: error: cannot listen on {args.host}:{args.port}: "
              f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    if args.compile:
        print("harmon serve: compiling the diffusion head (once)...", file=sys.stderr)
        for cfg in (model.sampling["cfg"], 1.0):  # one graph with guidance, one without
            model.generate("warm-up", steps=2, size=args.size, cfg=cfg, compile=True)
    i = model.info()
    print(f"harmon serve: {i['name']} on {i['device']} ({i['dtype']}) at {server.url}  "
          "(Ctrl+C stops)", file=sys.stderr)
    if not model.trained:
        print("note: random weights: images and answers are noise until you load trained ones",
              file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


__all__ = ["HarmonServer", "ServerSettings", "make_server", "add_serve_command", "cmd_serve"]
