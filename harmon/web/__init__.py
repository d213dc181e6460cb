"""The web page of ``harmon serve`` (standard library server + one static page)."""

from .server import HarmonServer, ServerSettings, add_serve_command, make_server

__all__ = ["HarmonServer", "ServerSettings", "add_serve_command", "make_server"]
