"""Shared test fixtures.

A local Ray instance is started at most once per test session (it costs several seconds), bound to
loopback only, and shut down at the end. Tests that need it take the `ray_local` fixture.
"""
import os

# Before anything loads OpenMP (torch): with the default active waiting, every parallel op stalls
# when the 2 cores are shared with Ray workers (measured 5-8x slower sparse 4D convolutions).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    # Must be in the environment before ray.init so the local instance listens on loopback only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
