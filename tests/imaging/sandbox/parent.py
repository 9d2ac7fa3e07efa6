"""A stand-in for the router in the sandbox denial tests: it holds a secret in its environment and a
state file, runs one attack through the real runner, and prints what came back as JSON.

It is a process of its own so that an attack that reached its parent (a kill, a ptrace) ends this
stand-in, not the test run. ``python parent.py ATTACK TARGET POLICY_JSON``.
"""

import json
import sys
from pathlib import Path

from serve.errors import MrisegError
from serve.imaging.sandbox import SandboxedDecoder, SandboxPolicy


def main() -> None:
    attack, target, policy = sys.argv[1], sys.argv[2], SandboxPolicy.from_mapping(json.loads(sys.argv[3]))
    if attack == "decode":  # no attack: the real child decodes the target, as the router would
        decoder = SandboxedDecoder(policy)
    else:
        decoder = SandboxedDecoder(policy, entry=(str(Path(__file__).with_name("attack_child.py")), attack))
    try:
        volume = decoder.decode(target, max_voxels=1 << 20)
        print(json.dumps({"status": 200, "shape": list(volume.shape)}))
    except MrisegError as e:
        print(json.dumps({"status": e.status, "message": e.message}))


if __name__ == "__main__":
    main()
