"""The courier (the ClientApp the coordinator ships) stays light: no torch, Opacus or MONAI in the
process Flower starts for every message, nor pydicom's code dictionary (the server checks class codes)."""

import subprocess
import sys


def test_the_courier_imports_no_ml_stack():
    code = "import sys, client.client_app; print(sorted({'torch', 'opacus', 'monai', 'pydicom', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['numpy']"  # numpy decodes the arrays; nothing heavier
