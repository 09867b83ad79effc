"""Test set-up: 8 emulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

_SHARED_DEMO = {"test_demo", "test_notebooks"}  # both read the one session-wide demo run


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`) each test module runs whole on one worker, so its
    module fixtures are built once; the demo and notebook tests share a worker and the demo."""
    for item in items:
        mod = item.module.__name__.rsplit(".", 1)[-1]
        item.add_marker(pytest.mark.xdist_group("demo" if mod in _SHARED_DEMO else mod))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One `jaxttt demo --quick` run per test session, shared by the demo and notebook tests.
    Part two runs on a tiny llama-format checkpoint written here (no download)."""
    from _tiny_hf import write_tiny_instruct

    from jaxttt.demo import run_demo

    root = tmp_path_factory.mktemp("demo")
    hf = write_tiny_instruct(root / "tiny-hf")
    return run_demo(quick=True, out=root / "demo", progress=False, model=f"hf:{hf}")
