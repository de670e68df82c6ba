"""The app shell: the four tabs of the studio in one gr.Blocks, over one set of services.

Every event goes through one Registry (studio/ui/registry.py): in demo mode the events the access
policy forbids are not registered at all.
"""

from __future__ import annotations

import gradio as gr

from studio.model.generation import StopSignals
from studio.services import Services
from studio.ui.chat_tab import build_chat_tab
from studio.ui.compare_tab import build_compare_tab
from studio.ui.dataset_tab import build_dataset_tab
from studio.ui.registry import Registry
from studio.ui.train_tab import build_train_tab
from studio.ui.strings import strings

# Uploads nobody handed to a handler are deleted after an hour; all of them when the server restarts.
DELETE_CACHE = (600, 3600)


def build_app(services: Services) -> gr.Blocks:
    """Build the studio UI. All mutable state lives in `services` or in per-session gr.State."""
    s = strings("app")
    stops = StopSignals()
    registry = Registry.for_services(services)
    services.registry = registry
    with gr.Blocks(title=s["title"], delete_cache=DELETE_CACHE) as app:
        app.studio_registry = registry
        with gr.Row():
            gr.Markdown(f"# {s['title']}\n{s['subtitle']}")
            model_status = gr.Markdown(registry.scrub_text(services.manager.status().describe()), elem_id="model-status")
        with gr.Tabs():
            build_chat_tab(services, stops)
            build_dataset_tab(services, app)
            build_train_tab(services, app)
            build_compare_tab(services, app)
        timer = gr.Timer(2.0)
        registry.on(timer.tick, lambda: services.manager.status().describe(), None, model_status, action="view",
                    scrub=True, show_progress="hidden", queue=False)

        def stop_on_close(request: gr.Request):
            stops.stop(request.session_hash or "")

        registry.unload(app, stop_on_close)
    return app
