"""Execute every notebook headless (nbclient) against the session's quick demo run."""
import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 600


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks/*.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    """nbformat v4, kernel python3, a papermill parameters cell, and no outputs."""
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == KERNEL
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RUN_DIR = None" in params[0].source
    assert any(c.cell_type == "markdown" for c in nb.cells)


@pytest.fixture
def kernel_env(demo_run, monkeypatch):
    """The kernel inherits this process's environment: the run, CPU, one plain device."""
    from jupyter_client.kernelspec import find_kernel_specs

    assert KERNEL in find_kernel_specs(), (
        f"no {KERNEL!r} kernel: run `python -m ipykernel install --user`")
    monkeypatch.setenv("JAXTTT_RUN", str(demo_run))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend makes PNGs
    return demo_run


@pytest.mark.timeout(1500)  # may pay for the session's demo run too (~3 min)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    images = [o for o in outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 4, f"{path.name}: only {len(images)} PNG outputs"
    assert list(tmp_path.iterdir()) == [], "the notebook wrote into its working directory"
