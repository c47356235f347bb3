"""Who is asking: an authenticated caller and its role, as the service rules see it.

viewer < operator < admin. The HTTP layer (api/auth.py) turns a bearer token
into a Caller; p2pnn.service decides with it and knows nothing of HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("viewer", "operator", "admin")


@dataclass(frozen=True)
class Caller:
    sub: str
    role: str

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


ANONYMOUS_ADMIN = Caller(sub="insecure", role="admin")  # every caller of an --insecure node
