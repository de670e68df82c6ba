"""The Gradio user interface: the only package of the studio that imports gradio."""
