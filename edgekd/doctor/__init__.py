"""`edgekd doctor`: what this machine offers edgekd, and (`--smoke`) whether each path really runs here.

Library code returns data (sections of named values, JSON-ready); cli.py prints it. machine.py gathers
the facts and works without torch; smoke.py runs a tiny job of every path, each in its own process.
"""

from edgekd.doctor.machine import NOT_HERE, machine_report

__all__ = ["NOT_HERE", "machine_report"]
