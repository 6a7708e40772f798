"""The Flower ServerApp: run a (metered) stock strategy from an initial adapter for N rounds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy


@dataclass(frozen=True)
class ServerPlan:
    """What the server runs: strategy, starting adapter, rounds and central evaluation."""

    strategy: Strategy
    initial: ArrayRecord
    rounds: int
    round_timeout_s: float
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]


def make_server_app(plan: ServerPlan, on_result: Callable[[Result], None]) -> ServerApp:
    """A ServerApp that runs `plan` and hands Flower's Result to `on_result`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = plan.strategy.start(
            grid=grid,
            initial_arrays=plan.initial,
            num_rounds=plan.rounds,
            timeout=plan.round_timeout_s,
            train_config=ConfigRecord(),
            evaluate_fn=plan.evaluate_fn,
        )
        on_result(result)

    return app
