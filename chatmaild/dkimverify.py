"""DKIM verification of incoming mail with strict alignment (like DMARC ``adkim=s``).

A message passes if one DKIM-Signature whose ``d=`` equals the ``From:`` domain
(case-insensitive) verifies; only the first few such signatures are tried. Signatures of
other domains are not even looked up. Keys come from DNS TXT records, fetched
asynchronously through the resolver chatmail.ini names (``dns_resolver``: empty for the
system resolver, ``IP`` or ``IP:PORT``), with a bounded LRU cache; when no signature
verifies, the keys are fetched again (a cached key may have been rotated) and
verification is retried only if a key changed. dkimpy does the cryptography in a worker
thread (hashing a large body must not stall the event loop). DNS trouble gives a
temporary reply so the sender retries.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import dkim
import dkim.util
import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError

log = logging.getLogger(__name__)

NO_SIGNATURE = "554 5.7.1 No DKIM signature found"
NO_VALID_SIGNATURE = "554 5.7.1 No valid DKIM signature found"
DNS_FAILURE = "451 4.7.5 Temporary DNS failure looking up the DKIM key"

DNS_TIMEOUT_S = 30.0
CACHE_SIZE = 1000
# Each signature tried costs a key lookup and a hash of the whole body; real mail carries
# one or two aligned ones. Later ones are ignored, so piling them up buys no work.
MAX_ALIGNED_SIGNATURES = 5
MIN_TTL_S, MAX_TTL_S, NEGATIVE_TTL_S = 60, 3600, 60
_HEADER_END = re.compile(rb"\r?\n\r?\n")


class DNSTemporaryError(Exception):
    """The key could not be looked up now (timeout, SERVFAIL); retrying may help."""


def parse_resolver_address(value: str) -> tuple[str, int] | None:
    """``""`` -> None (system resolver); ``IP``, ``IP:PORT``, ``[IPv6]:PORT``, ``IPv6``."""
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = int(port_text)
    else:
        host, port = value, 53
    if not host or not 0 < port < 65536:
        raise ValueError(f"dns_resolver: not IP or IP:PORT: {value!r}")
    return host, port


class TxtLookup:
    """Cached asynchronous TXT lookups."""

    def __init__(
        self, resolver_address: str, cache_size: int = CACHE_SIZE, timeout: float = DNS_TIMEOUT_S
    ):
        server = parse_resolver_address(resolver_address)
        if server is None:
            self.resolver = dns.asyncresolver.Resolver()
        else:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [server[0]]
            self.resolver.port = server[1]
        self.resolver.lifetime = timeout
        self.resolver.timeout = min(5.0, timeout)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, bytes | None]] = OrderedDict()

    async def lookup(self, name: str) -> bytes | None:
        """The TXT data at ``name`` (strings joined), None if there is none."""
        name = name.lower().rstrip(".") + "."
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(name)
            return cached[1]
        try:
            answer = await self.resolver.resolve(
                name, dns.rdatatype.TXT, search=False, raise_on_no_answer=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            value, ttl = None, NEGATIVE_TTL_S
        except (dns.exception.DNSException, OSError) as exc:
            raise DNSTemporaryError(f"{name}: {exc}") from None
        else:
            records = [b"".join(rdata.strings) for rdata in answer.rrset or ()]
            dkim_records = [r for r in records if r.lstrip().startswith(b"v=DKIM1")]
            value = (dkim_records or records or [None])[0]
            ttl = answer.rrset.ttl if answer.rrset is not None else NEGATIVE_TTL_S
            ttl = min(max(ttl, MIN_TTL_S), MAX_TTL_S)
        self._cache[name] = (now + ttl, value)
        self._cache.move_to_end(name)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def invalidate(self, name: str) -> None:
        self._cache.pop(name.lower().rstrip(".") + ".", None)


@dataclass(frozen=True)
class Signature:
    index: int  # position among the message's DKIM-Signature headers (dkimpy's idx)
    domain: str
    key_name: str  # <selector>._domainkey.<domain>
    length: int | None = None  # l=: the body bytes signed, None for all of them
    canonicalization: bytes = b"simple/simple"  # c=


def covers_body(signature: Signature, body: bytes) -> bool:
    """Whether the signature's ``l=`` (if any) reaches the end of the canonical body.

    With ``l=`` a signature stays valid when text is appended to the body (RFC 6376
    §8.2): anyone could add cleartext to a signed mail. Such a signature is refused
    unless it covers everything.
    """
    if signature.length is None or signature.length >= len(body):
        return True  # canonicalization never makes the body longer
    try:
        policy = CanonicalizationPolicy.from_c_value(signature.canonicalization)
    except InvalidCanonicalizationPolicyError:
        return False
    return signature.length >= len(policy.canonicalize_body(body))


def aligned_signatures(signature_headers: list[str], from_domain: str) -> list[Signature]:
    """The first :data:`MAX_ALIGNED_SIGNATURES` signatures whose ``d=`` is the From domain;
    unparsable ones are skipped."""
    result = []
    for index, value in enumerate(signature_headers):
        if len(result) == MAX_ALIGNED_SIGNATURES:
            break
        try:
            tags = dkim.util.parse_tag_value(value.encode("utf-8"))
            domain = tags[b"d"].decode("ascii").strip()
            selector = tags[b"s"].decode("ascii").strip()
            length = int(tags[b"l"]) if b"l" in tags else None
        except (dkim.util.InvalidTagValueList, KeyError, UnicodeError, ValueError):
            continue
        if domain.lower() == from_domain.lower() and selector:
            key_name = f"{selector}._domainkey.{domain}"
            c_value = tags.get(b"c", b"simple/simple")
            result.append(Signature(index, domain, key_name, length, c_value))
    return result


def split_for_dkimpy(message: bytes | bytearray) -> tuple[bytes, bytes]:
    """The header section (with the empty line ending it) and the body, line breaks CRLF,
    as dkimpy's parser divides a message."""
    view = memoryview(message)
    if message[:1] == b"\n" or message[:2] == b"\r\n":
        header_end, body_start = 0, 1 if message[:1] == b"\n" else 2
    else:
        match = _HEADER_END.search(message)
        if match is None:  # all header (mailcheck allows at most MAX_HEADER_BYTES)
            return bytes(message) + (
                b"\r\n" if message.endswith(b"\n") or not message else b"\r\n\r\n"
            ), b""
        header_end, body_start = match.start(), match.end()
    header = bytes(view[:header_end]) + (b"\r\n\r\n" if header_end else b"\r\n")
    body = bytes(view[body_start:])
    if body.count(b"\n") != body.count(b"\r\n"):
        body = body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return header, body


def _verify_signatures(
    message: bytes | bytearray, signatures: list[Signature], keys: dict[str, bytes | None]
) -> Signature | None:
    """The first signature that verifies with the prefetched keys (runs in a thread)."""

    def dnsfunc(name: bytes, timeout: float = 0) -> bytes | None:
        return keys.get(name.decode("ascii", "replace").lower().rstrip("."))

    quiet = logging.getLogger("chatmaild.dkimverify.dkimpy")
    header, body = split_for_dkimpy(message)
    try:
        verifier = dkim.DKIM(header, logger=quiet, minkey=1024)
    except (dkim.DKIMException, IndexError) as exc:  # IndexError: a folded first line
        log.info("DKIM: unreadable message: %s", exc)
        return None
    # dkimpy splits a whole message into a list of lines (~30x its size in memory for a
    # body of short lines); it is given the header section alone, and the body it would
    # have made from it (every line break CRLF) is put where it keeps it, ``body``.
    verifier.body = body
    for signature in signatures:
        if not covers_body(signature, verifier.body):
            log.info("DKIM: signature of %s signs only part of the body (l=)", signature.domain)
            continue
        try:
            if verifier.verify(idx=signature.index, dnsfunc=dnsfunc):
                return signature
        except dkim.DKIMException as exc:
            log.info("DKIM: signature of %s: %s", signature.domain, exc)
    return None


class DKIMVerifier:
    def __init__(self, txt: TxtLookup):
        self.txt = txt

    async def check(
        self, message: bytes | bytearray, signature_headers: list[str], from_domain: str
    ) -> str | None:
        """None if an aligned signature verifies, else the SMTP reply to give."""
        if not signature_headers:
            return NO_SIGNATURE
        signatures = aligned_signatures(signature_headers, from_domain)
        if not signatures:
            return NO_VALID_SIGNATURE
        names = sorted({s.key_name.lower() for s in signatures})
        try:
            keys = await self._lookup_keys(names)
            if await asyncio.to_thread(_verify_signatures, message, signatures, keys):
                return None
            # Maybe a cached key was rotated: fetch again, and retry only if a key changed.
            for name in names:
                self.txt.invalidate(name)
            fresh = await self._lookup_keys(names)
        except DNSTemporaryError as exc:
            log.warning("DKIM key lookup failed: %s", exc)
            return DNS_FAILURE
        if fresh != keys and await asyncio.to_thread(
            _verify_signatures, message, signatures, fresh
        ):
            return None
        return NO_VALID_SIGNATURE

    async def _lookup_keys(self, names: list[str]) -> dict[str, bytes | None]:
        values = await asyncio.gather(*(self.txt.lookup(name) for name in names))
        return dict(zip(names, values))
