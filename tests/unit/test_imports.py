"""`import lorafit` stays light: no GPU kernels, no Triton (a `lorafit score` or `lorafit diagnose` pays for
neither). Run in a fresh interpreter: this test process has imported everything already."""
import subprocess
import sys


def test_import_lorafit_does_not_load_kernels_or_triton():
    code = ("import sys, lorafit; bad = sorted(m for m in sys.modules if m.startswith('lorafit.kernels') "
            "or m == 'triton' or m.startswith('triton.')); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_packing_lives_with_the_data():
    from lorafit.data.packing import pack_batch, plan_packs
    from lorafit.kernels import pack_batch as reexported

    assert reexported is pack_batch and callable(plan_packs)
