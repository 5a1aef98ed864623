"""croupier.client.agent: the node agent and a consumer's way to it.

    from croupier.client.agent import NodeAgent, run_agent    # the `croupier agent` process
    from croupier.client.agent import AgentTransport          # a rank's side (RankClient uses it)

The agent (`daemon`) is a composition of `runtime_dir`, `consumers`, `lanes`,
`server_session` and `node_cache`; `protocol` has the frames both sides exchange. The names
load on first use, so a rank importing its transport does not import the agent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AgentLocked", "AgentTransport", "NodeAgent", "run_agent"]


def __getattr__(name: str) -> Any:
    if name in ("AgentLocked", "NodeAgent", "run_agent"):
        from croupier.client.agent import daemon

        return getattr(daemon, name)
    if name == "AgentTransport":
        from croupier.client.agent.transport import AgentTransport

        return AgentTransport
    raise AttributeError(f"module 'croupier.client.agent' has no attribute {name!r}")
