"""The Baseline Chat tab end to end through gradio_client against a launched app."""

from __future__ import annotations

import pytest
from gradio_client import Client

from studio.access import AccessPolicy
from studio.model.manager import ModelManager
from studio.services import Services
from uihelpers import launched


@pytest.fixture()
def empty_services(workspace):
    return Services(manager=ModelManager(), paths=workspace)


def test_load_then_stream_a_reply(empty_services, tiny_model_dir):
    with launched(empty_services) as url:
        client = Client(url, verbose=False)
        status, card, tree, template, _ = client.predict(str(tiny_model_dir), "4bit", api_name="/load")
        assert status.startswith("Loaded") and "| Linear4bit layers | 14 |" in card
        assert "Linear4bit" in tree and "<|im_start|>" in template
        job = client.submit("我该怎么成为守灯人？", [], "你是助手", "", 24, 0.0, 1.0, 1.0, api_name="/chat")
        updates = list(job)
        history, _, prompt = updates[-1]
        assert len(updates) > 2, "the reply was not streamed"
        assert history[0]["role"] == "user" and history[1]["role"] == "assistant"
        reply = history[1]["content"][0]["text"]
        assert reply and prompt.endswith("<|im_start|>user\n我该怎么成为守灯人？<|im_end|>\n<|im_start|>assistant\n")
        from studio.model.generation import GenerationSettings, build_messages

        expected = empty_services.manager.chat(build_messages("你是助手", [], "我该怎么成为守灯人？"),
                                               GenerationSettings.greedy(24))
        assert reply == expected


def test_server_refuses_chat_while_busy(services):
    from studio.model.generation import GenerationSettings, build_messages

    stream = services.manager.stream_chat(build_messages("s", [], "hi"), GenerationSettings.greedy(200))
    next(stream)
    try:
        with launched(services) as url:
            client = Client(url, verbose=False)
            with pytest.raises(Exception, match="busy"):
                client.predict("hi", [], "s", "", 16, 0.0, 1.0, 1.0, api_name="/chat")
    finally:
        stream.close()


def test_demo_mode_has_no_load_endpoint(workspace, tiny_model_dir):
    services = Services(manager=ModelManager(), paths=workspace, policy=AccessPolicy.demo())
    with launched(services) as url:
        with pytest.raises(Exception, match="Cannot find a function with `api_name`: /load"):
            Client(url, verbose=False).predict(str(tiny_model_dir), "4bit", api_name="/load")
    assert not services.manager.is_loaded
