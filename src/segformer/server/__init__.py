"""The web app and REST API behind ``segformer serve``.

from segformer.server import Settings, create_app
app = create_app(Settings(models=["city=nvidia/segformer-b0-finetuned-cityscapes-1024-1024"]))
# uvicorn.run(app) — or any ASGI server
"""

from segformer.server.app import create_app
from segformer.server.settings import Settings

__all__ = ["Settings", "create_app"]
