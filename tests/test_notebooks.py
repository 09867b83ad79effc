"""Execute every notebook headless (nbclient, CPU) against run directories made in the session.

pretrain / discover / sdft read the session's quick demo run (fixture `demo_run`); seal, ponder
and codeeval read small outputs from tests/_nb_runs.py; the quickstart runs its own sharded
pretraining and TTT-Discover on the tiny fallback model. Parameters are injected after the cell
tagged `parameters`, as papermill does. Each notebook's tables must show numbers read from its
run's files, and it must draw figures and write nothing into its working directory.
"""
import json
import os
from pathlib import Path

import nbformat
import pytest

import _nb_runs

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 900  # generous: a loaded machine slows compilation many times over
MIN_FIGURES = {"pretrain": 4, "discover": 4, "sdft": 2, "seal": 2, "ponder": 2, "codeeval": 2,
               "quickstart": 3}


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert set(MIN_FIGURES) <= names, f"missing notebooks: {set(MIN_FIGURES) - names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    """nbformat v4, kernel python3, one papermill parameters cell with RUN_DIR, no outputs."""
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == KERNEL
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "RUN_DIR = None" in params[0].source
    assert nb.cells[0].cell_type == "markdown"


def inject(nb, params: dict) -> None:
    """papermill's injected-parameters cell, right after the `parameters` cell."""
    i = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]}))


@pytest.fixture(scope="module")
def kernel_env(demo_run):
    """The kernel inherits this environment: the demo run, CPU, one plain device, the repo."""
    from jupyter_client.kernelspec import find_kernel_specs

    assert KERNEL in find_kernel_specs(), (
        f"no {KERNEL!r} kernel: run `python -m ipykernel install --user`")
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXTTT_RUN", str(demo_run))
    mp.setenv("JAX_PLATFORMS", "cpu")
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    mp.setenv("XLA_FLAGS", flags)
    mp.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    mp.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend makes PNGs
    yield demo_run
    mp.undo()


@pytest.fixture(scope="module")
def runs(kernel_env, tmp_path_factory):
    """Per notebook: its parameters and what its tables must show (read from the run files)."""
    demo = kernel_env
    tmp = tmp_path_factory.mktemp("nb_runs")
    seal = _nb_runs.seal_report(tmp / "bench.json")
    ponder = _nb_runs.ponder_eval(tmp / "ponder")
    codeeval = _nb_runs.codeeval_run(tmp)
    metrics = [json.loads(x) for x in (demo / "pretrain-mhc" / "metrics.jsonl").read_text().splitlines()]
    discover = json.loads((demo / "discover" / "result.json").read_text())
    gate = json.loads((demo / "continual" / "block_000" / "gate_decision.json").read_text())
    ce = json.loads((codeeval / "summary.json").read_text())
    ponder_res = json.loads((ponder / "budget-2.5" / "results.json").read_text())
    passed = sum(c for r in seal["requests"] for c in r["adapter_correct"])
    return {
        "pretrain": ({}, [f"{[m['loss'] for m in metrics if 'loss' in m][-1]:.3f}", "|row sum"]),
        "discover": ({}, [f"{discover['best_reward']:.4f}", f"{discover['baseline_best_reward']:.4f}"]),
        "sdft": ({}, [f"{gate['perplexity_before']:.3f} → {gate['perplexity_after']:.3f}"]),
        "seal": ({"RUN_DIR": str(tmp / "bench.json")}, [f"{passed}/9 = {passed / 9:.3f}", "0/9"]),
        "ponder": ({"RUN_DIR": str(ponder)},
                   [f"| {m} | {r['loss']:.4f} |" for m, r in ponder_res["methods"].items()]),
        "codeeval": ({"RUN_DIR": str(codeeval)},
                     [f"pass@1 {ce['pass@1']:.3f}", f"pass@2 {ce['pass@2']:.3f}", "| 3 | 6 | 3 | 0 |"]),
        "quickstart": ({"RUN_DIR": str(tmp / "quickstart"), "INSTALL": False, "MODEL": "tiny",
                        "CPU_DEVICES": 2, "PRETRAIN_STEPS": 4, "DISCOVER_STEPS": 1, "ROLLOUTS": 4},
                       ["mesh: {'data': 1, 'fsdp': 2, 'tensor': 1}", "TTT-Discover best reward"]),
    }


def test_a_directory_without_runs_is_one_clear_line(kernel_env, tmp_path):
    """RUN_DIR holding no codeeval output stops the notebook with one line naming the path."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    empty = tmp_path / "empty"
    empty.mkdir()
    nb = nbformat.read(REPO / "notebooks" / "codeeval.ipynb", as_version=4)
    inject(nb, {"RUN_DIR": str(empty)})
    with pytest.raises(CellExecutionError):
        NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "SystemExit"
    msg = errors[0].evalue
    assert str(empty) in msg and "no codeeval output here" in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any(empty.iterdir())


def _text(outputs) -> str:
    parts = []
    for o in outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        elif o.output_type in ("display_data", "execute_result"):
            parts.append(o.get("data", {}).get("text/markdown", ""))
    return "\n".join(parts)


@pytest.mark.timeout(1500)  # may pay for the session's demo run too (~3 min)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, runs, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    params, expected = runs.get(path.stem, ({}, []))
    nb = nbformat.read(path, as_version=4)
    inject(nb, params)
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
    assert len(images) >= MIN_FIGURES.get(path.stem, 1), f"{path.name}: {len(images)} figures"
    text = _text(outputs)
    for needle in expected:
        assert needle in text, f"{path.name}: {needle!r} not in its output"
    assert list(tmp_path.iterdir()) == [], "the notebook wrote into its working directory"
    if path.stem == "quickstart":
        out = Path(params["RUN_DIR"])
        assert (out / "pretrain" / "metrics.jsonl").is_file()
        result = json.loads((out / "discover" / "result.json").read_text())
        assert result["samples"] == result["baseline_samples"] == 4
