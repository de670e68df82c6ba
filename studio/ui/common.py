"""Helpers shared by the tabs: turning studio errors into Gradio messages, permission checks."""

from __future__ import annotations

import functools
import inspect

import gradio as gr

from studio.errors import StudioError


def user_errors(fn):
    """Show a StudioError (busy, not loaded, bad input, not allowed) as a Gradio error toast.

    Works for plain functions and generators; the message is the error's own text, which never
    holds a secret.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except StudioError as exc:
                raise gr.Error(str(exc)) from exc
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudioError as exc:
            raise gr.Error(str(exc)) from exc
    return wrapper
