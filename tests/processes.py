"""The environment of a process a test starts as a user would from a shell: without the torch.distributed
rendezvous variables that in-process runs of earlier tests left in os.environ (a lone run writes them; a
child that inherited them would join that rendezvous), and with the repository on PYTHONPATH."""
import os
from pathlib import Path

from launchers.base import RENDEZVOUS_ENV

ROOT = Path(__file__).resolve().parent.parent


def shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env
