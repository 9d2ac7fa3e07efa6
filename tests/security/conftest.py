"""One ``mriseg up --sites a,b`` for tests/security/ (the issue #34 findings).

The stack is started as a user starts it: the ``mriseg up`` command in its own
process group, ``RAY_AUTH_MODE`` unset, its own HOME and cache. Only the
intake's lease is shortened (``--config``: a copy of deployments/local.yaml),
so its sweep of held pushes (every lease / 2) comes round within the tests'
patience. The attacker holds site a's API key and S3 keys; site b is the
victim, whose jobs must still succeed after each attack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.stack import free_port
from tests.security.upstack import LEASE_S, UpStack, _stop, _weed_ports


@pytest.fixture(scope="package")
def up_two_sites(_shared_stack_owner, tmp_path_factory):
    """``mriseg up --sites a,b`` running, as :class:`UpStack`."""
    from serve.cluster.up import DEFAULT_CONFIG, LocalStack, wait_ready

    _shared_stack_owner.stop()  # one Ray cluster at a time on a small machine
    tmp = tmp_path_factory.mktemp("up-two-sites")
    raw = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    raw["applications"][0]["args"]["events"] = {"lease_s": LEASE_S}
    (tmp / "local.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                            "MRISEG_RECORD_KEY_FILE")}
    env.update(HOME=str(tmp / "home"), MRISEG_CACHE=str(tmp / "cache"), RAY_USAGE_STATS_ENABLED="0")
    port, log = free_port(), tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mriseg")), "up", "--port", str(port),
                                 "--sites", "a,b", "--config", str(tmp / "local.yaml")],
                                env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout=400)
        state_file = tmp / "cache" / "up" / "stack.json"
        for _ in range(120):  # the state, then the banner, come just after the stack answers /readyz
            if state_file.exists() and "Ctrl-C stops the stack" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        stack = LocalStack(**json.loads(state_file.read_text()))
        up = UpStack(stack, state_file, log, tmp / "home", tmp, _weed_ports(stack.s3_pid))
        server = next(i for i in json.loads((up.weed_dir / "s3.json").read_text())["identities"]
                      if "Admin" in i["actions"])["credentials"][0]
        up.server_s3 = {**stack.s3, "access_key_id": server["accessKey"], "secret_access_key": server["secretKey"]}
        yield up
    finally:
        _stop(proc)


