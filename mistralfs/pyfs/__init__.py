"""`mistral://PURPOSE/NAME` for fsspec: pandas, Dask and the rest without a mount.

Registered with fsspec through the `fsspec.specs` entry point, so that
`fsspec.filesystem("mistral")` and `pd.read_json("mistral://batch/x.jsonl")` find it
once mistralfs is installed with its `fsspec` extra. See docs/PYTHON.md.
"""

try:
    import anyio.from_thread
    import fsspec  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        f"mistral:// needs fsspec and anyio ({exc.name} is missing): "
        "pip install 'mistralfs[fsspec]'"
    ) from exc
if not hasattr(anyio.from_thread.BlockingPortal, "call_async"):  # pragma: no cover
    raise ImportError("mistral:// needs anyio 4.16 or later: pip install 'mistralfs[fsspec]'")

from mistralfs.pyfs.errors import KeyRefused, ServiceFailed, ServiceRefused
from mistralfs.pyfs.filesystem import MistralFileSystem

__all__ = ["KeyRefused", "MistralFileSystem", "ServiceFailed", "ServiceRefused"]
