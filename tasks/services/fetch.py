"""Fetching pages from upstream HTTP sources, safely.

The sources are URLs typed by staff, so the fetcher must not become a way to
reach what lives next to the workers (SSRF): the database, the broker, a cloud
metadata service handing out credentials. `Fetcher.get` therefore:

- allows only `http` and `https`;
- resolves the host name itself and checks EVERY address it resolves to:
  loopback, private (RFC 1918, unique-local), shared (100.64/10), link-local,
  multicast, reserved, unspecified and other non-global addresses are refused,
  and so are IPv6 addresses embedding such an IPv4 address (::ffff:a.b.c.d,
  6to4, Teredo, NAT64), unless the host is listed in DATA_SYNC_ALLOWED_HOSTS;
- never lets anyone in to a cloud metadata service (169.254.169.254,
  fd00:ec2::254, metadata.google.internal, ...), allowed host or not: no data
  source lives there, credentials do;
- connects to the address it checked, not to whatever a second DNS lookup
  says. The check lives in the connection layer: a custom httpcore network
  backend (`GuardedNetworkBackend`) receives the host name httpx wants to
  reach, resolves and checks it, and opens the TCP connection to the checked
  IP. httpx still builds the request from the URL, so the Host header is the
  host name, and httpcore still passes the host name as TLS server_hostname,
  so SNI and certificate verification are against the name, not the IP. A DNS
  rebinding answer (public address for the check, 127.0.0.1 for the connect)
  has no second lookup to exploit. Every connection the client opens goes
  through this backend, so no code path can skip the check;
- follows redirects itself (at most DATA_SYNC_MAX_REDIRECTS), each hop going
  through the same checks; ignores proxy environment variables (a proxy would
  make the connection, unchecked);
- bounds time (connect and read timeouts, plus a deadline for the whole page)
  and size: the body is streamed and reading stops at
  DATA_SYNC_MAX_RESPONSE_BYTES (decompressed bytes, so a gzip bomb stops too).

Errors are `TransientFetchError` (network, timeouts, 408, 429, 5xx: worth
retrying; a 429 or 503 with `Retry-After` carries the seconds asked for in
`retry_after`) or `PermanentFetchError` (refused address or scheme, other 4xx,
too large: retrying cannot help). URLs in messages have their query string and
credentials removed, since tokens often travel there.
"""

from __future__ import annotations

import email.utils
import ipaddress
import math
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpcore
import httpx
from django.conf import settings

USER_AGENT = "jobs-data-sync/1.0"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Returns the IP addresses (as strings) a host name resolves to.
Resolver = Callable[[str, int], list[str]]

METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean...
        "fd00:ec2::254",  # AWS over IPv6
        "169.254.170.2",  # AWS ECS task credentials
        "100.100.100.200",  # Alibaba Cloud
    )
)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# A `Retry-After` asking for longer than this is taken as this: a typo or a hostile server cannot
# park a sync for days (the retry policy caps what it waits anyway).
RETRY_AFTER_MAX_SECONDS = 3600.0


class FetchError(Exception):
    """A page could not be fetched."""


class PermanentFetchError(FetchError):
    """Trying again cannot help: a refused address, a 4xx answer, a body over the cap."""


class TransientFetchError(FetchError):
    """The network or the server failed; a later attempt may work.

    `retry_after`: the seconds the server's `Retry-After` asked for (429, 503), else None."""

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class RefusedURL(PermanentFetchError):
    """The URL's scheme or address is not allowed (SSRF guard)."""


class ResponseTooLarge(PermanentFetchError):
    """The body is larger than DATA_SYNC_MAX_RESPONSE_BYTES."""


# --- the address policy -------------------------------------------------------


def normalize_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def parse_allowed_hosts(entries: Iterable[str]) -> frozenset[tuple[str, int | None]]:
    """`["api.internal", "127.0.0.1:8080", "[::1]:8080"]` -> {(host, port or None)}."""
    allowed: set[tuple[str, int | None]] = set()
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry.startswith("["):  # [v6] or [v6]:port
            host, _, rest = entry[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        elif entry.count(":") == 1:  # host:port
            host, port = entry.split(":")
        else:  # a name, an IPv4 address or a bare IPv6 address
            host, port = entry, ""
        if port and not port.isdigit():
            raise ValueError(f"DATA_SYNC_ALLOWED_HOSTS entry {raw!r} has a port that is not a number")
        allowed.add((normalize_host(host), int(port) if port else None))
    return frozenset(allowed)


def refusal_reason(address: IPAddress) -> str | None:
    """Why connecting to `address` is refused, or None when it is a public address."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = refusal_reason(embedded)
            if reason:
                return f"{reason} ({embedded}) wrapped in IPv6"
    for attribute, words in (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    ):
        if getattr(address, attribute):
            return words
    if not address.is_global:
        return "not a public address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class FetchPolicy:
    """What may be fetched, and how long and how much; `from_settings()` reads DATA_SYNC_*."""

    allowed_hosts: frozenset[tuple[str, int | None]] = frozenset()
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    page_timeout: float = 120.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    # DNS is outside the test machine's world; tests pass a fake resolver here.
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_settings(cls, **overrides: Any) -> FetchPolicy:
        values: dict[str, Any] = {
            "allowed_hosts": parse_allowed_hosts(settings.DATA_SYNC_ALLOWED_HOSTS),
            "connect_timeout": settings.DATA_SYNC_CONNECT_TIMEOUT,
            "read_timeout": settings.DATA_SYNC_READ_TIMEOUT,
            "page_timeout": settings.DATA_SYNC_PAGE_TIMEOUT,
            "max_bytes": settings.DATA_SYNC_MAX_RESPONSE_BYTES,
            "max_redirects": settings.DATA_SYNC_MAX_REDIRECTS,
        }
        values.update(overrides)
        return cls(**values)

    def allows(self, host: str, port: int) -> bool:
        return (host, None) in self.allowed_hosts or (host, port) in self.allowed_hosts


def checked_addresses(host: str, port: int, policy: FetchPolicy) -> list[str]:
    """The addresses to connect to for host:port, every one of them checked; raises RefusedURL.

    Raises TransientFetchError when the name does not resolve (DNS may be down).
    """
    name = normalize_host(host)
    shown = f"{name}:{port}"
    if name in METADATA_HOSTS:
        raise RefusedURL(f"refused to connect to {shown}: it is a cloud metadata service")
    literal = _ip_literal(name)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = policy.resolver(name, port)
        except (OSError, UnicodeError) as exc:
            raise TransientFetchError(f"could not resolve {name}: {exc}") from exc
        if not addresses:
            raise TransientFetchError(f"could not resolve {name}: no addresses")
    allowed = policy.allows(name, port)
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        reason = refusal_reason(address)
        if reason is None or (allowed and address not in METADATA_ADDRESSES):
            continue
        where = f"{address}" if literal is not None else f"{name}, which resolves to {address}"
        hint = (
            ""
            if address in METADATA_ADDRESSES
            else f"; if this host is meant to be reachable, add '{_allowed_entry(name, port)}' "
            "to DATA_SYNC_ALLOWED_HOSTS"
        )
        raise RefusedURL(f"refused to connect to {where} (port {port}): {reason}{hint}")
    return addresses


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _allowed_entry(name: str, port: int) -> str:
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def check_url(url: str, policy: FetchPolicy | None = None) -> list[str]:
    """Checks a URL as the fetcher would (scheme, then every address); returns the addresses.

    Used by the admin to refuse a source before it is saved. Raises RefusedURL,
    or TransientFetchError when the host does not resolve.
    """
    policy = policy or FetchPolicy.from_settings()
    parsed = _parse_url(url)
    return checked_addresses(parsed.host, _port(parsed), policy)


# --- the connection layer -------------------------------------------------------


class GuardedNetworkBackend(httpcore.NetworkBackend):
    """Opens every TCP connection to an address that passed `checked_addresses`."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = checked_addresses(host, port, self._policy)
        error: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise RefusedURL("unix sockets are never fetched")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport, with its connection pool built on `GuardedNetworkBackend`.

    httpx offers no argument for the network backend, so the pool its
    constructor made is replaced by one that uses ours (same settings, no proxy).
    """

    def __init__(self, policy: FetchPolicy, limits: httpx.Limits) -> None:
        super().__init__(trust_env=False, limits=limits)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedNetworkBackend(policy),
        )


# --- fetching -------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedPage:
    url: str  # after redirects: relative `next` links are resolved against it
    status: int
    content_type: str
    body: bytes


def redact_url(url: str | httpx.URL) -> str:
    """The URL without credentials, query or fragment: safe for logs and error messages."""
    try:
        parsed = httpx.URL(str(url))
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    shown = f"{parsed.scheme}://{parsed.netloc.decode('ascii', 'replace')}{parsed.path}"
    return shown + ("?…" if parsed.query else "")


def _parse_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise RefusedURL(f"{url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise RefusedURL(
            f"{redact_url(parsed)} uses the scheme {parsed.scheme or '(none)'!r}; "
            "only http and https are fetched"
        )
    if not parsed.host:
        raise RefusedURL(f"{redact_url(parsed)} has no host")
    return parsed


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


class Fetcher:
    """An HTTP client for one sync: keeps connections alive between pages. Use as a context manager."""

    def __init__(self, policy: FetchPolicy | None = None) -> None:
        self.policy = policy or FetchPolicy.from_settings()
        limits = httpx.Limits(max_connections=4, max_keepalive_connections=2, keepalive_expiry=30)
        self._client = httpx.Client(
            transport=GuardedTransport(self.policy, limits),
            timeout=httpx.Timeout(
                connect=self.policy.connect_timeout,
                read=self.policy.read_timeout,
                write=self.policy.read_timeout,
                pool=self.policy.connect_timeout,
            ),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json, text/csv;q=0.9, */*;q=0.5"},
        )

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def get(self, url: str) -> FetchedPage:
        """GET `url`, following redirects; raises TransientFetchError or PermanentFetchError."""
        deadline = time.monotonic() + self.policy.page_timeout
        target = _parse_url(url)
        for _hop in range(self.policy.max_redirects + 1):
            if time.monotonic() > deadline:
                raise TransientFetchError(
                    f"GET {redact_url(url)} took longer than DATA_SYNC_PAGE_TIMEOUT "
                    f"({self.policy.page_timeout:g} s)"
                )
            try:
                with self._client.stream("GET", target) as response:
                    if response.has_redirect_location:
                        target = _parse_url(str(target.join(response.headers["location"])))
                        continue
                    _raise_for_status(response, target)
                    body = self._read_capped(response, target, deadline)
                    content_type = response.headers.get("content-type", "")
                    return FetchedPage(str(target), response.status_code, content_type, body)
            except httpx.TimeoutException as exc:
                raise TransientFetchError(
                    f"GET {redact_url(target)} timed out ({type(exc).__name__}); "
                    "timeouts: DATA_SYNC_CONNECT_TIMEOUT, DATA_SYNC_READ_TIMEOUT"
                ) from exc
            except httpx.DecodingError as exc:
                raise PermanentFetchError(
                    f"GET {redact_url(target)}: the body cannot be decoded: {exc}"
                ) from exc
            except httpx.UnsupportedProtocol as exc:
                raise RefusedURL(f"GET {redact_url(target)}: {exc}") from exc
            except httpx.TransportError as exc:  # connection refused or reset, protocol errors
                raise TransientFetchError(
                    f"GET {redact_url(target)} failed: {type(exc).__name__}: {exc}"
                ) from exc
        raise RefusedURL(
            f"GET {redact_url(url)}: more than {self.policy.max_redirects} redirects "
            "(DATA_SYNC_MAX_REDIRECTS)"
        )

    def _read_capped(self, response: httpx.Response, url: httpx.URL, deadline: float) -> bytes:
        cap = self.policy.max_bytes
        too_large = (
            f"GET {redact_url(url)}: the response is larger than DATA_SYNC_MAX_RESPONSE_BYTES ({cap} bytes); "
            "page the source more finely or raise the setting"
        )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            raise ResponseTooLarge(too_large)
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > cap:
                raise ResponseTooLarge(too_large)
            if time.monotonic() > deadline:
                raise TransientFetchError(
                    f"GET {redact_url(url)} took longer than DATA_SYNC_PAGE_TIMEOUT "
                    f"({self.policy.page_timeout:g} s)"
                )
        return bytes(body)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for: delta-seconds ("120") or an HTTP-date
    ("Wed, 21 Oct 2026 07:28:00 GMT"); None when absent or unreadable. A date in the past is 0;
    anything over RETRY_AFTER_MAX_SECONDS is capped there."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isdigit():
        seconds = float(int(text[:12]))  # a thousand-digit number is still just "very long"
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000" or no zone: HTTP-dates are GMT
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), RETRY_AFTER_MAX_SECONDS)


def _raise_for_status(response: httpx.Response, url: httpx.URL) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    described = f"GET {redact_url(url)} answered {status} {response.reason_phrase}".rstrip()
    if status in (429, 503):
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        if retry_after is not None:
            described += f" (Retry-After: {retry_after:g} s)"
            raise TransientFetchError(described, retry_after=retry_after)
    if status in (408, 429) or status >= 500:
        raise TransientFetchError(described)
    raise PermanentFetchError(described)


def fetch(url: str, policy: FetchPolicy | None = None) -> FetchedPage:
    """One page with a client of its own (a sync keeps one `Fetcher` for all its pages)."""
    with Fetcher(policy) as fetcher:
        return fetcher.get(url)
