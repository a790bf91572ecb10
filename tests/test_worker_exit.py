"""The reduction's worker thread at interpreter exit: the process exits cleanly, with its jobs done.

A daemon thread still inside a torch call when the interpreter finalizes is killed on its way back into Python,
and the process aborts ("terminate called without an active exception", exit status 134): seen as a flaky
crash of a DDP run's rank at exit, after training had finished. The script below puts the worker inside torch
calls (GIL released) while the main thread exits.
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import time, torch
    from simigrad_compile.distributed.collectives import Serial

    a = torch.randn(800, 800)
    def job():
        for _ in range(12):
            torch.mm(a, a)
        print("job done", flush=True)
    Serial("simigrad-test").submit(job)
    time.sleep(0.05)   # the job is inside torch.mm when the main thread exits
""")


def test_exit_waits_for_the_worker_and_does_not_abort():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert "terminate called" not in out.stderr
    assert out.stdout.strip() == "job done"
