"""mistralfs: a Mistral AI account's files as a FUSE drive."""

__version__ = "0.1.0"
