"""Server-side permission checks.

Every handler the UI registers names one action (studio/ui/registry.py checks it on each call), and
every service entry point that changes state, reads files or calls out checks it again with
`policy.require(action)`. A hidden or disabled button is not access control: Gradio endpoints stay
callable over HTTP (hidden ones by `fn_index`), so the check has to happen on the server, per call.

Demo mode is what a public link without a login gets: chat with the base model and with the adapters
the owner attached, and side by side on those adapters with preset or held-out questions. Nothing that
loads, reads or writes files, calls another server, trains or changes the adapters.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import PermissionDenied

ACTIONS = (
    "view",             # read what the page already shows: model status, preset questions, the prompt preview
    "chat",             # generate with the loaded model (base or an attached adapter)
    "compare",          # side by side on an attached adapter, preset or held-out questions
    "load_model",       # load or unload a base model (a hub id or a folder of the server)
    "read_files",       # read the studio's documents, datasets and runs (split, open, template guard, estimate)
    "upload",           # accept a file from the browser
    "build_dataset",    # run a dataset build, write datasets
    "edit_dataset",     # import or save a dataset
    "train",            # start, stop or resume training
    "manage_adapters",  # attach, detach, delete adapters
    "write_reports",    # score a run and write report files into its folder
    "outbound",         # call a teacher or judge server
    "export",           # write an exported adapter or merged model under exports/
)
DEMO_ACTIONS = frozenset({"view", "chat", "compare"})
DEMO_SUMMARY = ("demo mode: visitors can chat with the base model and the adapters you attached, and compare them "
                "side by side on preset or held-out questions; loading models, files, uploads, datasets, teacher "
                "and judge calls, training, adapter changes and reports are refused")


@dataclass(frozen=True)
class AccessPolicy:
    """Which actions this server allows. `demo` allows chat and compare only (for public links)."""

    allowed: frozenset[str] = field(default_factory=lambda: frozenset(ACTIONS))
    reason: str = ""
    # whether the page may load a model from any folder of the server (the owner at this machine), or
    # only hub ids and the models the owner named (signed-in visitors: see `page_model_source`)
    server_folders: bool = True

    @classmethod
    def full(cls, server_folders: bool = True) -> "AccessPolicy":
        return cls(server_folders=server_folders)

    @classmethod
    def demo(cls) -> "AccessPolicy":
        return cls(allowed=DEMO_ACTIONS,
                   reason="this studio runs in demo mode (shared without a login); only chat and compare are allowed")

    @property
    def is_demo(self) -> bool:
        return self.allowed != frozenset(ACTIONS)

    def allows(self, action: str) -> bool:
        _check_known(action)
        return action in self.allowed

    def require(self, *actions: str) -> None:
        for action in actions:
            if not self.allows(action):
                raise PermissionDenied(f"Not allowed: {action.replace('_', ' ')} ({self.reason}).")


def _check_known(action: str) -> None:
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def policy_for_launch(share: bool, host: str, has_login: bool, demo: bool) -> AccessPolicy:
    """Demo mode for `--demo`, for `--share` without a login, and for a non-loopback host without a login.
    With a login, visitors may do everything but load a model from a server folder the owner did not name."""
    if demo or (not has_login and (share or not is_loopback(host))):
        return AccessPolicy.demo()
    return AccessPolicy.full(server_folders=not has_login)


HUB_ID = re.compile(r"(modelscope:)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def page_model_source(policy: AccessPolicy, name: str, owner_named: tuple[str, ...]) -> str:
    """The model a page may load by `name`: anything for the owner at this machine; for signed-in visitors a
    hub id (ORG/NAME or modelscope:ORG/NAME) or a model the owner named (--model, the presets), never
    another server folder. The refusal is the same whether such a folder exists or not."""
    name = (name or "").strip()
    if policy.server_folders or name in owner_named:
        return name
    if HUB_ID.fullmatch(name) and ".." not in name and not Path(name).exists():
        return name
    raise PermissionDenied(f"Model {name[:200]!r}: signed-in visitors load hub ids (ORG/NAME) or the models in the "
                           "list; other folders of the server are for the owner at this machine.")
