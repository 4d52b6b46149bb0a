"""API keys -> tenants. Only sha256 hashes are held; every lookup compares in constant time."""

from __future__ import annotations

import hashlib
import hmac

from service.domain.errors import Unauthenticated

DEFAULT_TENANT = "default"


class KeyRing:
    def __init__(self, hashes: dict[str, str]):
        self._entries = list(hashes.items())  # (sha256 hex, tenant)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def tenant_for(self, presented: str | None) -> str:
        if not self.enabled:
            return DEFAULT_TENANT
        if not presented:
            raise Unauthenticated("missing API key")
        digest = hashlib.sha256(presented.encode()).hexdigest()
        tenant = None
        for stored, owner in self._entries:  # no early exit: timing does not reveal which entry matched
            if hmac.compare_digest(stored, digest):
                tenant = owner
        if tenant is None:
            raise Unauthenticated("invalid API key")
        return tenant


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return x_api_key
