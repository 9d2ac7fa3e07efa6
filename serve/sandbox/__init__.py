"""Decoding untrusted bytes in a confined child process (``decode`` step of the data flow).

:mod:`~serve.sandbox.runner` starts the child and validates its reply,
:mod:`~serve.sandbox.child` is what runs in it, :mod:`~serve.sandbox.policy`
says what the child may use, :mod:`~serve.sandbox.reply` is the fixed reply
format, and :mod:`~serve.sandbox.seccomp` and :mod:`~serve.sandbox.landlock`
are two of its layers.
"""

from serve.sandbox.policy import LAYERS, SandboxPolicy
from serve.sandbox.runner import SandboxedDecoder, SandboxUnavailableError, decode_untrusted

__all__ = ["LAYERS", "SandboxPolicy", "SandboxedDecoder", "SandboxUnavailableError", "decode_untrusted"]
