"""Loaded by every Python process of a sanitizer run (.ci/sanitize puts this directory on PYTHONPATH).

Python processes need the ASan runtime preloaded to load the sanitized
extensions; other programs the tests start (postgres, initdb, psql, pgbench)
must not get it: an uninstrumented postgres does not start under it. So
LD_PRELOAD is dropped from the environment of every subprocess that does not
run a Python interpreter.
"""

import os
import subprocess

_popen_init = subprocess.Popen.__init__


def _runs_python(args, executable) -> bool:
    program = executable or (args if isinstance(args, (str, bytes, os.PathLike)) else args[0])
    if isinstance(program, bytes):
        program = program.decode()
    name = os.path.basename(str(program).split()[0]) if program else ""
    return name.startswith("python")


def _popen_without_preload(self, args, *rest, **kwargs):
    if "LD_PRELOAD" in (kwargs.get("env") or os.environ) and not _runs_python(args, kwargs.get("executable")):
        env = dict(kwargs.get("env") or os.environ)
        env.pop("LD_PRELOAD", None)
        kwargs["env"] = env
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _popen_without_preload
