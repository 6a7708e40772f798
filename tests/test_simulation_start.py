"""Flower's simulation engine starts even when Ray misses its own start-up deadline once."""

from __future__ import annotations

import pytest

from silotune.federated import simulation


class FlakyRay:
    """Stands in for `ray`: the first `failures` starts fail as Ray does on a loaded machine."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.inits: list[dict[str, object]] = []
        self.shutdowns = 0
        self.up = False

    def is_initialized(self) -> bool:
        return self.up

    def init(self, **kwargs: object) -> None:
        self.inits.append(kwargs)
        if len(self.inits) <= self.failures:
            raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y")
        self.up = True

    def shutdown(self) -> None:
        self.shutdowns += 1
        self.up = False


@pytest.fixture
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(simulation.time, "sleep", lambda _s: None)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # start_ray sets it; restored after


def test_a_failed_ray_start_is_cleaned_up_and_tried_again(
    monkeypatch: pytest.MonkeyPatch, no_wait: None
) -> None:
    fake = FlakyRay(failures=2)
    monkeypatch.setattr(simulation, "ray", fake)
    simulation.start_ray({"num_cpus": 2})
    assert fake.up and len(fake.inits) == 3 and fake.shutdowns == 2
    assert fake.inits[-1]["num_cpus"] == 2 and fake.inits[-1]["include_dashboard"] is False
    assert fake.inits[-1]["runtime_env"] == {
        "env_vars": {"PYTHONPATH": simulation.os.environ["PYTHONPATH"]}
    }
    simulation.start_ray({"num_cpus": 2})  # already running: left as it is
    assert len(fake.inits) == 3


def test_ray_that_never_starts_ends_with_one_clear_message(
    monkeypatch: pytest.MonkeyPatch, no_wait: None
) -> None:
    fake = FlakyRay(failures=99)
    monkeypatch.setattr(simulation, "ray", fake)
    with pytest.raises(RuntimeError, match=r"failed to start 3 times.*gcs_server_port.*run again"):
        simulation.start_ray({"num_cpus": 2})
    assert not fake.up and fake.shutdowns == 3


def test_ray_is_shut_down_even_when_the_simulation_fails(
    monkeypatch: pytest.MonkeyPatch, no_wait: None
) -> None:
    fake = FlakyRay(failures=0)
    monkeypatch.setattr(simulation, "ray", fake)

    def broken(**_kwargs: object) -> None:
        raise RuntimeError("An error was encountered. Ending simulation.")

    monkeypatch.setattr(simulation, "run_simulation", broken)
    with pytest.raises(RuntimeError, match="Ending simulation"):
        simulation.simulate(object(), object(), clients=2)
    assert not fake.up and fake.shutdowns == 1
