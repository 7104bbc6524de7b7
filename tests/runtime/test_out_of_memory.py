"""Out of memory in ONNX Runtime (issue 24): a batch that does not fit is one `error:` line naming the batch to try in
``ddpm-run sample``, and an ``OutOfMemoryError`` (a DDPMError) naming it as the API's argument in ``Sampler``.

Real failures, not mocks: each case runs in a subprocess whose address space is capped (RLIMIT_AS) a few hundred MiB
above what it has mapped once imported, so ONNX Runtime's arena really fails to allocate for a batch of 100,000
8×8 images (hundreds of MiB per activation) while a small batch still runs; the machine is never short of memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

HEADROOM_MIB = 400
CAP = textwrap.dedent(f"""
    import re, resource
    import numpy, onnxruntime
    import ddpm_deploy.runtime.api, ddpm_deploy.verify.cli
    vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + {HEADROOM_MIB} * 2**20, resource.RLIM_INFINITY))
""")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")


def run_capped(body: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDPM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CAP + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_api_raises_out_of_memory_naming_the_batch_and_stays_usable(random_micro_onnx):
    r = run_capped(f"""
        from ddpm_deploy import Sampler, DDPMError
        from ddpm_deploy.runtime.errors import OutOfMemoryError
        with Sampler.from_onnx({str(random_micro_onnx)!r}, threads=1, batch=100_000) as s:
            try:
                s(100_000, steps=2)
            except OutOfMemoryError as e:
                assert isinstance(e, DDPMError) and e.batch == 100_000 and e.suggested_batch == 50_000, vars(e)
                print("MESSAGE", e)
            else:
                raise SystemExit("no OutOfMemoryError")
            print("AFTER", s(3, steps=2, batch=3).shape)   # the failed batch left nothing in the loop
    """)

    assert r.returncode == 0, r.stderr[-3000:]
    message = r.stdout.split("MESSAGE ", 1)[1].splitlines()[0]
    assert "ONNX Runtime ran out of memory on a batch of 100000 images" in message
    assert "Failed to allocate memory" in message and message.endswith("try a smaller batch: batch=50000")
    assert "--batch" not in message
    assert "AFTER (3, 8, 8, 1)" in r.stdout


def test_cli_prints_one_error_line_with_the_batch_to_try(random_micro_onnx, tmp_path):
    out = tmp_path / "out"
    r = run_capped(f"""
        import sys
        from ddpm_deploy.verify.cli import main
        main(["sample", "--onnx", {str(random_micro_onnx)!r}, "--num", "100000", "--batch", "100000", "--steps", "2",
              "--threads", "1", "--no-pngs", "--out", {str(out)!r}])
    """)

    assert r.returncode == 2, r.stdout + r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr  # ONNX Runtime's own log line silenced
    assert "ONNX Runtime ran out of memory on a batch of 100000 images" in lines[0]
    assert lines[0].endswith("try a smaller batch: --batch 50000") and "Traceback" not in r.stderr
    assert not out.exists()  # nothing was finished: no folder left behind


def test_out_of_memory_after_finished_batches_keeps_them_and_resumes_at_the_smaller_batch(random_micro_onnx, tmp_path):
    """The job keeps its finished batches; the command it prints to continue names the smaller batch."""
    out = tmp_path / "out"
    r = run_capped(f"""
        import numpy as np
        from ddpm_deploy.runtime.backends.base import open_runner
        from ddpm_deploy.runtime.errors import OutOfMemoryError, cli_style
        from ddpm_deploy.runtime.output import sample_job
        from ddpm_deploy.runtime.sampling.config import plan_for
        from ddpm_deploy.runtime.sampling.open import open_loop

        class Growing:  # a loop whose second batch is far larger: the real runner then fails to allocate
            def __init__(self, loop):
                self.loop, self.kind, self.calls = loop, loop.kind, 0
            def new_timings(self):
                return self.loop.new_timings()
            def sample(self, plan, seed, idx, callback=None):
                self.calls += 1
                if self.calls == 2:
                    idx = np.arange(100_000)
                return self.loop.sample(plan, seed, idx, callback=callback)

        with open_runner({str(random_micro_onnx)!r}, "cpu", threads=1) as runner, \\
                open_loop(runner, runner.sample_shape, max_batch=100_000) as loop, cli_style():
            plan = plan_for(runner.card.diffusion, "ddpm", 2)
            try:
                sample_job(runner, Growing(loop), plan, runner.card, {str(random_micro_onnx)!r}, {str(out)!r}, 0, 0,
                           8, 4, write_pngs=False,
                           resume_hint=lambda e: f"ddpm-run sample --batch {{getattr(e, 'suggested_batch', None) or 4}} --resume")
            except OutOfMemoryError as e:
                print("MESSAGE", e)
    """)

    assert r.returncode == 0, r.stderr[-3000:]
    message = r.stdout.split("MESSAGE ", 1)[1].splitlines()[0]
    assert "ran out of memory on a batch of 100000 images" in message
    assert "4 of 8 images done and kept" in message and message.endswith("ddpm-run sample --batch 50000 --resume")
    assert (out / "run.json").is_file()
