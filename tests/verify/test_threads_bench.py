"""The --threads measurement (issue 24): results.json records the machine (cores, CPU flags), the load average
before and after, per run, and a warning when the load exceeds the cores. Run here at the smallest size (one
thread count, two ε calls): this checks the script, it measures nothing."""

from __future__ import annotations

import json
import os
import time

from ddpm_deploy.verify.bench import load_text, load_warning, record_load
from ddpm_deploy.verify.threads_bench import busy, main, summarise


def test_threads_bench_writes_load_flags_and_rows(random_micro_onnx, tmp_path):
    out = tmp_path / "bench"
    assert main(["--onnx", str(random_micro_onnx), "--threads", "1", "--background", "0", "--num", "2",
                 "--batch", "2", "--steps", "2", "--repeat", "1", "--out", str(out)]) == 0

    doc = json.loads((out / "results.json").read_text())
    m = doc["machine"]
    assert m["cpus"] == os.cpu_count() and isinstance(m["cpu_flags"], list)
    assert len(m["load_average_before"]) == 3 and len(m["load_average_after"]) == 3
    runs = [r for r in doc["results"] if r["kind"] == "run"]
    assert len(runs) == 1 and runs[0]["threads"] == "1" and runs[0]["images_per_s"] > 0, runs
    assert len(runs[0]["load_before"]) == 3 and len(runs[0]["load_after"]) == 3
    assert {r["kind"] for r in doc["results"]} == {"run", "median", "fastest"}
    md = (out / "results.md").read_text()
    assert "load average before" in md and "fastest at `--threads 1`" in md


def test_load_above_the_cores_is_warned_and_recorded(capsys):
    cpus = os.cpu_count()
    assert load_warning([cpus + 0.5, 0, 0], cpus).startswith(f"load average {cpus + 0.5:.2f} exceeds the {cpus} cores")
    assert load_warning([cpus - 0.5, 9, 9], cpus) is None and load_warning(None, cpus) is None

    m = record_load({}, "before")
    assert m["cpus"] == cpus and len(m["load_average_before"]) == 3
    loaded = m["load_average_before"][0] > cpus
    assert ("load_warnings" in m) == loaded and ("warning: load average" in capsys.readouterr().err) == loaded
    assert load_text({"load_average_before": [3.0, 1, 1], "load_average_after": [1.0, 1, 1],
                      "load_warnings": ["before: load average 3.00 exceeds the 2 cores of this machine: …"]}) == \
        "load average before [3.0, 1, 1], after [1.0, 1, 1] (**warning**: load average 3.00 exceeds the 2 cores " \
        "of this machine: …)"


def test_background_processes_stop_with_the_block():
    with busy(1) as pids:
        time.sleep(0.1)
        assert len(pids) == 1 and os.path.exists(f"/proc/{pids[0]}")
    assert not os.path.exists(f"/proc/{pids[0]}")


def test_summary_names_the_fastest_count_per_condition():
    rows = [{"background": 0, "threads": t, "images_per_s": v} for t, v in ((0, 9.0), (1, 12.0), (0, 8.0), (1, 13.0))]
    rows.append({"background": 0, "threads": 2, "error": "boom"})
    s = summarise(rows)
    assert {(r["threads"], r["images_per_s"]) for r in s if r["kind"] == "median"} == {(0, 8.5), (1, 12.5)}
    assert [r["threads"] for r in s if r["kind"] == "fastest"] == [1]


def test_gpu_check_json_records_the_load_before_and_at_each_write(tmp_path):
    from argparse import Namespace

    from ddpm_deploy.verify import gpu_check

    args = Namespace(out=tmp_path, batch=4, load_before=record_load({}, "before"))
    gpu_check.write_outputs(args, {"name": "none"}, [], [])
    gpu_check.write_outputs(args, {"name": "none"}, [], [])  # a second row: the record does not grow

    m = json.loads((tmp_path / "gpu_check.json").read_text())["machine"]
    assert len(m["load_average_before"]) == 3 and len(m["load_average_after"]) == 3
    assert len(m.get("load_warnings", [])) <= 2
