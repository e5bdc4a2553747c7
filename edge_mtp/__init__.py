"""edge-mtp: Gemma 4 + MTP assistant -> phone-ready bundles, validated and benchmarked."""

from .util.errors import EdgeMtpError


def load(path, backend=None, accelerator="cpu"):
    """Open a bundle for streaming generation: `edge_mtp.load("model.litertlm").generate("Hello")`."""
    from .runtime.api import load as _load

    return _load(path, backend=backend, accelerator=accelerator)


__all__ = ["EdgeMtpError", "load"]
