"""mistralfs: a Mistral AI account's files as a FUSE drive."""

__version__ = "0.1.0"

# The service's own address: what the mount, the client and the fsspec side default to.
DEFAULT_SERVER_URL = "https://api.mistral.ai"
