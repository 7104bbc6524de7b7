"""The step- vs request-level benchmark (issue 26) at the smallest size: one load, four requests per point, on the
micro model. This checks the script (both modes answered every request on one server, the machine and its load are
recorded, an existing --out is refused); it measures nothing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ddpm_deploy.runtime.errors import MissingDependencyError
from ddpm_deploy.runtime.serve.server import find_triton
from ddpm_deploy.verify.step_bench import main

pytest.importorskip("tritonclient.grpc", reason="the benchmark needs tritonclient[grpc]")
try:
    find_triton()
except MissingDependencyError as e:
    pytest.skip(f"no tritonserver: {e}", allow_module_level=True)


def test_step_bench_runs_both_modes_and_records_the_machine(random_micro_onnx, tmp_path):
    out = tmp_path / "bench"
    args = ["--onnx", str(random_micro_onnx), "--out", str(out), "--steps", "3", "--mix", "2,8", "--max-batch", "2",
            "--requests", "4", "--capacity-requests", "4", "--loads", "0.5"]

    r = CliRunner().invoke(main, args)
    again = CliRunner().invoke(main, args)

    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    rows = doc["results"]
    assert [(x["workload"], x["mode"]) for x in rows] == [("3 steps", "request"), ("3 steps", "step"),
                                                          ("2/8 steps 50/50", "request"), ("2/8 steps 50/50", "step")]
    assert all(x["errors"] == 0 and x["images"] == 4 and x["images_per_s"] > 0 for x in rows), rows
    m = doc["machine"]
    assert isinstance(m["cpu_flags"], list) and len(m["load_average_before"]) == 3 and len(m["capacity"]) == 2
    assert "| 2/8 steps 50/50 | 50% |" in (out / "results.md").read_text()
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert again.exit_code != 0 and "would replace" in again.output
