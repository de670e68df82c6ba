"""Server-side permission checks.

Every UI handler and every service entry point that changes state calls `policy.require(action)`.
A hidden or disabled button is not access control: Gradio endpoints stay callable over HTTP, so the
check has to happen here, on the server, for each call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.errors import PermissionDenied

ACTIONS = (
    "chat",          # generate with the loaded model
    "load_model",    # load or unload a base model
    "build_dataset", # call the teacher, write datasets
    "edit_dataset",  # save an edited dataset
    "train",         # start, stop or resume training
    "manage_adapters",  # attach, detach, delete adapters
)


@dataclass(frozen=True)
class AccessPolicy:
    """Which actions this server allows. `demo` allows chatting only (for public links)."""

    allowed: frozenset[str] = field(default_factory=lambda: frozenset(ACTIONS))
    reason: str = ""

    @classmethod
    def full(cls) -> "AccessPolicy":
        return cls()

    @classmethod
    def demo(cls) -> "AccessPolicy":
        return cls(
            allowed=frozenset({"chat"}),
            reason="this studio runs in demo mode (shared link without --auth); only chat is allowed",
        )

    def allows(self, action: str) -> bool:
        return action in self.allowed

    def require(self, action: str) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        if action not in self.allowed:
            raise PermissionDenied(f"Not allowed: {action.replace('_', ' ')} ({self.reason}).")
