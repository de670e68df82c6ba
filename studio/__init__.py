"""QLoRA Studio: from a private document to a fine-tuned adapter, with the proof side by side.

Services live in plain Python packages (`studio.model`, `studio.data`, `studio.train`); only
`studio.ui` imports gradio. `studio.py` at the project root is the one place that builds them.
"""

__version__ = "0.1.0"
