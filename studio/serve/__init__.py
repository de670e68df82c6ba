"""The studio as an OpenAI-compatible server: `/v1/models` and `/v1/chat/completions` over the model manager.

`mount_openai_routes(fastapi_app, services)` adds the routes to any FastAPI app: a standalone one
(`studio.py serve`) or the UI's own (`studio.py --api`).
"""

from studio.serve.openai_api import (  # noqa: F401
    attach_named_adapters,
    create_api_app,
    mount_openai_routes,
    run_server,
    server_key,
)
