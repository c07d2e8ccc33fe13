"""Storage backends behind one interface: :class:`Storage`."""

from __future__ import annotations

from longdl.config import Settings
from longdl.storage.base import (
    ObjectInfo,
    Partial,
    SignedUrl,
    Storage,
    ZipMember,
    ZipProgress,
    ZipWritten,
    commit_or_undo,
    content_disposition,
    validate_key,
)
from longdl.storage.local import LocalStorage, load_or_create_secret


def from_settings(settings: Settings) -> Storage:
    """The backend ``settings.storage_backend`` names, not yet opened."""
    if settings.storage_backend == "s3":
        # Imported here so the local backend never pays for loading botocore.
        from longdl.storage.s3 import S3Storage

        backend: Storage = S3Storage.from_settings(settings)
        return backend
    secret = (
        settings.signing_secret.encode()
        if settings.signing_secret
        else load_or_create_secret(settings.data_dir / "signing.key")
    )
    return LocalStorage(settings.storage_dir, secret)


__all__ = [
    "LocalStorage",
    "ObjectInfo",
    "Partial",
    "SignedUrl",
    "Storage",
    "ZipMember",
    "ZipProgress",
    "ZipWritten",
    "commit_or_undo",
    "content_disposition",
    "from_settings",
    "validate_key",
]
