"""The services one studio process shares between its tabs and commands, built once in studio.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.access import AccessPolicy
from studio.catalog import Catalog
from studio.config import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT, SAMPLE_DOCUMENT, StudioPaths
from studio.jobs import JobBoard
from studio.model.manager import ModelManager


@dataclass
class Services:
    """Everything a tab or a command needs; one instance per process."""

    manager: ModelManager
    policy: AccessPolicy = field(default_factory=AccessPolicy.full)
    jobs: JobBoard = field(default_factory=JobBoard)
    paths: StudioPaths = field(default_factory=StudioPaths)
    default_model: str = DEFAULT_MODEL
    default_quant: str = "4bit"
    default_system_prompt: str = DEFAULT_SYSTEM_PROMPT
    catalog: Catalog | None = None  # built from `paths` when not given
    keys: object = None  # secrets.KeyRouting: where the environment key may go (default: the provider presets)
    max_upload_mb: float = 20.0
    lang: str = ""  # "zh" or "en" forces the UI's language; "" follows each browser

    def __post_init__(self):
        if self.catalog is None:
            self.catalog = Catalog(self.paths, SAMPLE_DOCUMENT)
        if self.keys is None:
            from studio.data.teacher import key_routing

            self.keys = key_routing()
