"""The Flower ServerApp of a simulated run: hand Flower's Grid to the federated server."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp


def make_server_app(start: Callable[[Grid], None]) -> ServerApp:
    """A ServerApp whose main runs `start(grid)` (e.g. FederatedServer.start)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        start(grid)

    return app
