"""Decoding untrusted bytes in a confined child process (``decode`` step of the data flow).

:mod:`~serve.imaging.sandbox.runner` starts the child and validates its reply,
:mod:`~serve.imaging.sandbox.child` is what runs in it, :mod:`~serve.imaging.sandbox.policy`
says what the child may use, :mod:`~serve.imaging.sandbox.reply` is the fixed reply
format, and :mod:`~serve.imaging.sandbox.seccomp` and :mod:`~serve.imaging.sandbox.landlock`
are two of its layers.
"""

from serve.imaging.sandbox.policy import LAYERS, SandboxPolicy
from serve.imaging.sandbox.runner import SandboxedDecoder, SandboxUnavailableError, decode_untrusted

__all__ = ["LAYERS", "SandboxPolicy", "SandboxedDecoder", "SandboxUnavailableError", "decode_untrusted"]
