"""The app shell: the four tabs of the studio in one gr.Blocks, over one set of services.

Every event goes through one Registry (studio/ui/registry.py): in demo mode the events the access
policy forbids are not registered at all, and the page has only the Chat and Compare tabs.
"""

from __future__ import annotations

import gradio as gr

from studio.model.generation import StopSignals
from studio.services import Services
from studio.ui.chat_tab import build_chat_tab
from studio.ui.compare_tab import build_compare_tab
from studio.ui.dataset_tab import build_dataset_tab
from studio.ui.history_panel import wire_history
from studio.ui.i18n import DEFAULT, SET_COOKIE_JS, LabelRegistry, request_language, translate
from studio.ui.registry import Choice, Registry, Text

LANGUAGE = Choice("Language", ("en", "zh"), optional=True)
from studio.ui.train_tab import build_train_tab
from studio.ui.strings import strings

# Uploads nobody handed to a handler are deleted after an hour; all of them when the server restarts.
DELETE_CACHE = (600, 3600)
LANGUAGE_CHOICES = [("English", "en"), ("中文", "zh")]


def build_app(services: Services) -> gr.Blocks:
    """Build the studio UI. All mutable state lives in `services` or in per-session gr.State."""
    s = strings("app")
    stops = StopSignals()
    registry = Registry.for_services(services)
    services.registry = registry
    with gr.Blocks(title=s["title"], delete_cache=DELETE_CACHE) as app:
        app.studio_registry = registry
        with gr.Row():
            with gr.Column(scale=4):
                gr.Markdown(f"# {s['title']}")
                gr.Markdown(s["subtitle"])
            with gr.Column(scale=1, min_width=180):
                # usable once the load has set the page's language (a pick before it was overwritten by the load)
                language = gr.Radio(LANGUAGE_CHOICES, value=None, label=strings("header")["language"],
                                    elem_id="language", container=False, interactive=False)
        # a line of its own: beside the title it wrapped to four lines and split the adapter's name
        model_status = gr.Markdown(registry.scrub_text(services.manager.status().describe()), elem_id="model-status")
        with gr.Tabs() as tabs:
            chat = build_chat_tab(services, stops)
            # a demo page has no Dataset or Train tab: none of their events is served there, and their lists
            # would show the owner's documents, datasets, runs and teacher address
            full = not services.policy.is_demo
            dataset = build_dataset_tab(services, app) if full else None
            train = build_train_tab(services, app) if full else None
            compare = build_compare_tab(services, app)
        timer = gr.Timer(2.0)
        registry.on(timer.tick, lambda lang: translate(services.manager.status().describe(), lang or "en"), language,
                    model_status, action="view", args=(LANGUAGE,), scrub=True, show_progress="hidden", queue=False)
        relabelled, switched = _wire_language(app, services, registry, language)
        if train:
            train.wire_language_switch(switched)
            train.wire_after_relabel(relabelled)
        for tab in (dataset, train, compare):
            if tab:
                tab.panel.wake_on(switched.then)  # an ended job's log is redrawn in the new language at the next poll
        fresh_history = (tabs.select,) + ((train.panel.finished.change,) if train else ())  # a run that ended
        wire_history([tab.history for tab in (train, compare) if tab], registry, compare.run_pick, tabs, language,
                     fresh_history)
        for tab in (dataset, compare):
            if tab:
                tab.wire_language(language)
        for tab in (train, compare):
            if tab:
                tab.wire_fresh_lists(app.load, tabs.select, *fresh_history[1:])
        # after the load's relabelling, which writes back the status texts it read when the page opened
        registry.on(relabelled.then, chat.current_model, None, chat.load_outputs, action="view", scrub=True,
                    show_progress="hidden")

        def stop_on_close(request: gr.Request):
            stops.stop(request.session_hash or "")

        registry.unload(app, stop_on_close)
    return app


def _wire_language(app: gr.Blocks, services: Services, registry: Registry, language: gr.Radio):
    """Pick the page's language on load; the switch re-labels every component and remembers the choice.
    Returns the load's relabelling event and the switch's, for what must show after them (the switch's cookie
    is set by then, so a handler chained after it answers in the new language)."""
    labels = LabelRegistry.collect(app)

    def initial(request: gr.Request):
        return request_language(request, services.lang)

    def relabel(lang, *markdown_values):
        return labels.updates(lang or "en", markdown_values)

    switch_at = labels.outputs.index(language)

    def relabel_opened(lang, *markdown_values):
        """A page opened in the language it was built in needs no new texts: every component left alone (a few
        hundred updates cost the browser seconds of redrawing on a slow machine). The switch becomes usable."""
        same = (lang or DEFAULT) == DEFAULT
        updates = [gr.skip()] * len(labels.outputs) if same else relabel(lang, *markdown_values)
        kept = {k: v for k, v in updates[switch_at].items() if k != "__type__"}
        updates[switch_at] = gr.update(**kept, interactive=True)
        return updates

    inputs = [language] + labels.markdown
    specs = (LANGUAGE,) + (Text("Shown text", 100_000),) * len(labels.markdown)
    loaded = registry.on(app.load, initial, None, language, action="view", queue=False)
    relabelled = registry.on(loaded.then, relabel_opened, inputs, labels.outputs, action="view", args=specs,
                             js=SET_COOKIE_JS, show_progress="hidden")
    switched = registry.on(language.input, relabel, inputs, labels.outputs, action="view", args=specs,
                           js=SET_COOKIE_JS, show_progress="hidden")
    return relabelled, switched
