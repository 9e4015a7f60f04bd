"""What ``import compress`` sets in the environment before Paddle loads (see compress/__init__.py)."""
import os
import subprocess
import sys

import compress

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRINT = "import compress, os; print(repr(os.environ.get('MKL_DEBUG_CPU_TYPE')), os.environ.get('KMP_BLOCKTIME'))"


def fresh_import(**env):
    """``import compress`` in a new interpreter whose environment lacks both variables, plus ``env``; returns
    what it printed: the repr of MKL_DEBUG_CPU_TYPE and KMP_BLOCKTIME."""
    base = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", PRINT], cwd=ROOT, env={**base, **env}, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def test_mkl_code_path_is_chosen_for_amd_cpus_only():
    vendor = compress._cpu_vendor()
    assert vendor  # an x86 Linux host names its vendor in /proc/cpuinfo
    expected = "'5'" if vendor == "AuthenticAMD" else "None"
    assert fresh_import() == [expected, "10"]


def test_the_callers_settings_are_kept():
    assert fresh_import(MKL_DEBUG_CPU_TYPE="", KMP_BLOCKTIME="200") == ["''", "200"]
    assert fresh_import(MKL_DEBUG_CPU_TYPE="2")[0] == "'2'"
