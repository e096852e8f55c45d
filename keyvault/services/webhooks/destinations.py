"""Where a webhook may be delivered: public addresses only, unless the operator allows
private networks (``--allow-private-network``).

A webhook URL chosen by whoever may add webhooks must not make keyvault POST into places
only keyvault can reach: loopback, link-local (the cloud metadata service at
169.254.169.254), private ranges, unspecified (``0``), or any of these spelled otherwise
(``2130706433``, ``[::ffff:127.0.0.1]``). The URL is checked when the webhook is added
(every address its host resolves to) and again at each delivery, on the address actually
connected to (DNS can change, and a second lookup could be answered differently).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from keyvault.errors import InvalidInput

ALLOW_HINT = "give a receiver on a public address, or allow private networks explicitly (--allow-private-network)"


def is_public(address: str) -> bool:
    """True if ``address`` (an IP literal) is a public unicast address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0: the scope goes
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolved_addresses(host: str) -> list[str]:
    """Every address ``host`` resolves to (an IP literal, in any spelling, is itself)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidInput(
            f"the webhook host {host!r} does not resolve ({exc})",
            hint="check the URL's host name (it must resolve when the webhook is added)",
        ) from None
    return sorted({str(info[4][0]) for info in infos})


def check_destination(url: str, *, allow_private_network: bool) -> None:
    """``InvalidInput`` if the URL's host resolves to any non-public address (unless allowed)."""
    if allow_private_network:
        return
    host = urlsplit(url).hostname or ""
    private = [a for a in resolved_addresses(host) if not is_public(a)]
    if private:
        raise InvalidInput(
            f"the webhook host {host!r} resolves to a loopback, link-local, private or "
            f"reserved address ({', '.join(private[:4])})",
            hint=ALLOW_HINT,
        )
