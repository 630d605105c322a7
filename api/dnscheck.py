"""DNS records a chatmail relay needs, checked at the zone's authoritative servers.

One table (:func:`expected_records`) drives both the check (``GET /dns``) and the zone
file (``GET /dns/zone``, upstream's ``get_filled_zone_file`` format). Judging a record is
a pure function of what was expected and what was found; only :class:`DnsClient` talks
to the network. Authoritative servers are asked directly so a cached old answer never
hides a fix the operator just made.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from chatmaild.config import Config

from .models import DnsRecord, DnsReport, MtaStsPolicy
from .settings import DnsSettings, Settings

TTL = 3600
TXT_CHUNK = 255
MAX_POLICY_BYTES = 64 * 1024
MTA_STS_MAX_AGE = 31557600  # RFC 8461 upper bound
SRV_RECORDS = (
    ("_submission._tcp", 587, "submission (STARTTLS) for clients"),
    ("_submissions._tcp", 465, "submission over TLS for clients"),
    ("_imap._tcp", 143, "IMAP (STARTTLS) for clients"),
    ("_imaps._tcp", 993, "IMAP over TLS for clients"),
)


@dataclass(frozen=True)
class Expected:
    name: str  # absolute, with trailing dot
    rtype: str
    rdata: str  # as written in a zone file
    required: bool
    why: str


@dataclass
class Found:
    """What the authoritative servers hold for the names we ask about."""

    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def get(self, name: str, rtype: str) -> list[str]:
        return self.records.get((name.lower(), rtype), [])


# -- pure: what should be there ----------------------------------------------------------


def quote_txt(value: str) -> str:
    """``"a" "b"``: a TXT value in 255-byte strings, as a zone file needs it."""
    chunks = [value[i : i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)


def dkim_value(public_key_b64: str) -> str:
    return f"v=DKIM1;k=rsa;p={public_key_b64};s=email;t=s"


def parse_tags(value: str) -> dict[str, str]:
    """``v=DKIM1; k=rsa; p=AB CD`` -> {"v": "DKIM1", ...}; whitespace inside values dropped."""
    tags = {}
    for part in value.split(";"):
        if "=" in part:
            key, _, val = part.partition("=")
            tags[key.strip().lower()] = "".join(val.split())
    return tags


def dkim_key_from_txt(text: str) -> str | None:
    """The ``p=`` value of opendkim-genkey's ``opendkim.txt`` (strings joined)."""
    joined = "".join(re.findall(r'"([^"]*)"', text))
    return parse_tags(joined).get("p") or None


def dkim_key_from_private(pem: bytes) -> str:
    """Base64 SubjectPublicKeyInfo of a PEM private key (what ``p=`` holds)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def read_dkim_key(settings: DnsSettings) -> str | None:
    """The relay's DKIM public key, from opendkim.txt or derived from the private key."""
    try:
        key = dkim_key_from_txt(settings.dkim_txt.read_text(errors="replace"))
        if key:
            return key
    except OSError:
        pass
    if settings.dkim_private_key is None:
        return None
    try:
        return dkim_key_from_private(settings.dkim_private_key.read_bytes())
    except (OSError, ValueError, TypeError):
        return None


def expected_records(
    config: Config,
    settings: DnsSettings,
    dkim_key: str | None,
    ipv4: list[str],
    ipv6: list[str],
    sts_id: str,
) -> list[Expected]:
    """Every record, required ones first (upstream's zone order)."""
    d = f"{config.mail_domain}."
    acme = config.tls_cert_mode == "acme"
    out = []
    for address in ipv4:
        out.append(Expected(d, "A", address, True, "clients and other relays connect here"))
    for address in ipv6:
        out.append(Expected(d, "AAAA", address, True, "clients and other relays connect here"))
    out.append(Expected(d, "MX", f"10 {d}", True, "other servers deliver mail for the domain here"))
    if acme:
        out.append(
            Expected(
                f"_mta-sts.{d}",
                "TXT",
                f'"v=STSv1; id={sts_id}"',
                True,
                "announces the MTA-STS policy (TLS required for incoming mail)",
            )
        )
        out.append(Expected(f"mta-sts.{d}", "CNAME", d, True, "serves the MTA-STS policy"))
    out.append(Expected(f"www.{d}", "CNAME", d, True, "the relay's web page"))
    out.append(
        Expected(
            f"{settings.dkim_selector}._domainkey.{d}",
            "TXT",
            quote_txt(dkim_value(dkim_key or "<DKIM key unreadable by the API>")),
            True,
            "other relays verify the relay's DKIM signatures with this key",
        )
    )
    out.append(Expected(d, "TXT", '"v=spf1 a ~all"', False, "SPF: mail comes from the A record"))
    out.append(
        Expected(
            f"_dmarc.{d}",
            "TXT",
            '"v=DMARC1;p=reject;adkim=s;aspf=s"',
            False,
            "DMARC with strict DKIM alignment, as chatmail checks incoming mail",
        )
    )
    if acme:
        account = f";accounturi={settings.acme_account_uri}" if settings.acme_account_uri else ""
        out.append(
            Expected(
                d,
                "CAA",
                f'0 issue "letsencrypt.org{account}"',
                False,
                "only Let's Encrypt may issue certificates for the domain",
            )
        )
    out.append(
        Expected(f"_adsp._domainkey.{d}", "TXT", '"dkim=discardable"', False, "legacy DKIM policy")
    )
    for label, port, why in SRV_RECORDS:
        out.append(Expected(f"{label}.{d}", "SRV", f"0 1 {port} {d}", False, why))
    return out


def zone_line(record: Expected) -> str:
    return f"{record.name:<40} {TTL:<6} IN  {record.rtype:<5}  {record.rdata}"


def zone_text(records: list[Expected], note: str = "") -> str:
    lines = [f"; {note}"] if note else []
    lines.append("; Required DNS entries")
    lines += [zone_line(r) for r in records if r.required]
    lines.append("; Recommended DNS entries")
    lines += [zone_line(r) for r in records if not r.required]
    return "\n".join(lines) + "\n"


# -- pure: judging what was found --------------------------------------------------------


def _unquote_txt(rdata: str) -> str:
    """``"a" "b"`` -> ``ab``: TXT strings are joined before comparing (DKIM spans several)."""
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', rdata)) if '"' in rdata else rdata


def _same_name(a: str, b: str) -> bool:
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def judge(expected: Expected, found: list[str], dkim_key_known: bool = True) -> str:
    """``ok``, ``missing`` or ``wrong`` for one expected record."""
    rtype = expected.rtype
    if rtype in ("A", "AAAA"):
        if not found:
            return "missing"
        want = ipaddress.ip_address(expected.rdata)
        return "ok" if any(ipaddress.ip_address(f) == want for f in found) else "wrong"
    if rtype == "TXT":
        texts = [_unquote_txt(f) for f in found]
        want = _unquote_txt(expected.rdata)
        if want.startswith("v=spf1"):
            spf = [t for t in texts if t.lower().startswith("v=spf1")]
            if not spf:
                return "missing"
            if len(spf) > 1:
                return "wrong"  # two SPF records are a permanent error (RFC 7208)
            terms = spf[0].lower().split()[1:]
            mechanisms = {t.lstrip("+").split(":")[0].split("/")[0] for t in terms}
            return "ok" if mechanisms & {"a", "mx", "ip4", "ip6"} else "wrong"
        if want.startswith("v=DMARC1"):
            dmarc = [parse_tags(t) for t in texts if t.lower().startswith("v=dmarc1")]
            if not dmarc:
                return "missing"
            tags = dmarc[0]
            good = tags.get("adkim") == "s" and tags.get("p") in ("reject", "quarantine")
            return "ok" if len(dmarc) == 1 and good else "wrong"
        if want.startswith("v=DKIM1"):
            dkim = [parse_tags(t) for t in texts if t.lower().startswith("v=dkim1")]
            if not dkim:
                return "missing"
            if not dkim_key_known:
                return "ok" if any(tags.get("p") for tags in dkim) else "wrong"
            return "ok" if any(t.get("p") == parse_tags(want).get("p") for t in dkim) else "wrong"
        if want.startswith("v=STSv1"):
            sts = [parse_tags(t) for t in texts if t.startswith("v=STSv1")]
            if not sts:
                return "missing"
            return "ok" if len(sts) == 1 and sts[0].get("id") else "wrong"
        if not texts:
            return "missing"
        return "ok" if want in texts else "wrong"
    if not found:
        return "missing"
    if rtype == "CNAME":
        return "ok" if any(_same_name(f, expected.rdata) for f in found) else "wrong"
    if rtype == "MX":
        target = expected.rdata.split()[-1]
        return "ok" if any(_same_name(f.split()[-1], target) for f in found) else "wrong"
    if rtype == "SRV":
        _, _, port, target = expected.rdata.split()
        for f in found:
            parts = f.split()
            if len(parts) == 4 and parts[2] == port and _same_name(parts[3], target):
                return "ok"
        return "wrong"
    if rtype == "CAA":
        issuer = expected.rdata.split('"')[1].split(";")[0]
        issues = [f for f in found if f.split()[1:2] in (["issue"], ["issuewild"])]
        if not issues:
            return "ok"  # CAA without issue tags restricts nothing
        return "ok" if any(issuer in f for f in issues) else "wrong"
    return "ok" if expected.rdata in found else "wrong"


def parse_mta_sts_policy(text: str, mail_domain: str) -> list[str]:
    """Problems with an MTA-STS policy (RFC 8461 §3.2); empty means good."""
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            return [f"not a policy line: {line[:80]!r}"]
        fields.setdefault(key.strip(), []).append(value.strip())
    problems = []
    if fields.get("version") != ["STSv1"]:
        problems.append(f"version is {fields.get('version')}, expected STSv1")
    mode = fields.get("mode", [None])[0]
    if mode != "enforce":
        problems.append(f"mode is {mode!r}, expected 'enforce'")
    mx = fields.get("mx", [])
    if not any(_mx_matches(pattern, mail_domain) for pattern in mx):
        problems.append(f"mx {mx} does not cover {mail_domain}")
    max_age = fields.get("max_age", [""])[0]
    if not max_age.isdigit():
        problems.append(f"max_age {max_age!r} is not a number of seconds")
    elif not 86400 <= int(max_age) <= MTA_STS_MAX_AGE:
        problems.append(f"max_age {max_age} outside 86400..{MTA_STS_MAX_AGE}")
    return problems


def _mx_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host.count(".") == pattern.count(".")
    return pattern == host


# -- the network -------------------------------------------------------------------------


class DnsError(Exception):
    pass


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "53")
    return (host, int(port)) if host else (value, 53)


class DnsClient:
    def __init__(self, settings: DnsSettings):
        self.settings = settings
        if settings.resolver:
            host, port = _split_hostport(settings.resolver)
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers = [host]
            self.resolver.port = port
        else:
            self.resolver = dns.asyncresolver.Resolver()
        self.resolver.lifetime = settings.timeout_s
        self.resolver.cache = None
        self.servers: list[str] = []
        self.port = settings.authoritative_port

    async def find_authoritative(self, domain: str) -> list[str]:
        """Addresses of the zone's NS (via the recursive resolver); sets ``self.servers``."""
        try:
            zone = await dns.asyncresolver.zone_for_name(
                domain, resolver=self.resolver, lifetime=self.settings.timeout_s
            )
            ns = await self.resolver.resolve(zone, "NS")
        except dns.exception.DNSException as exc:
            raise DnsError(f"cannot find the authoritative servers of {domain}: {exc}") from None
        addresses = []
        for rr in ns:
            for rtype in ("A", "AAAA"):
                try:
                    answer = await self.resolver.resolve(rr.target, rtype)
                except dns.exception.DNSException:
                    continue
                addresses += [a.address for a in answer]
        if not addresses:
            raise DnsError(f"no address for the name servers of {zone}")
        self.servers = list(dict.fromkeys(addresses))
        return self.servers

    async def query(self, name: str, rtype: str) -> list[str]:
        """Records of exactly this type at ``name`` from the first answering server."""
        request = dns.message.make_query(name, rtype)
        request.flags &= ~dns.flags.RD  # authoritative data only, no recursion
        last: Exception | None = None
        for server in self.servers:
            try:
                response, _ = await dns.asyncquery.udp_with_fallback(
                    request, server, timeout=self.settings.timeout_s, port=self.port
                )
            except (dns.exception.DNSException, OSError) as exc:
                last = exc
                continue
            wanted = dns.rdatatype.from_text(rtype)
            qname = dns.name.from_text(name)
            return [
                rd.to_text()
                for rrset in response.answer
                if rrset.rdtype == wanted and rrset.name == qname
                for rd in rrset
            ]
        if not self.servers:
            return await self.query_recursive(name, rtype)
        raise DnsError(f"no authoritative server answered {rtype} {name}: {last}")

    async def query_recursive(self, name: str, rtype: str) -> list[str]:
        try:
            answer = await self.resolver.resolve(name, rtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise DnsError(f"{rtype} {name}: {exc}") from None
        return [rd.to_text() for rd in answer]


async def fetch_mta_sts(
    settings: DnsSettings, client: DnsClient, domain: str
) -> tuple[str, str, str]:
    """(url, content type, body) of the policy from where the resolver says mta-sts.<d> is."""
    host = f"mta-sts.{domain}"
    url = f"https://{host}/.well-known/mta-sts.txt"
    addresses = await client.query_recursive(host, "A") or await client.query_recursive(
        host, "AAAA"
    )
    if not addresses:
        raise DnsError(f"{host} has no address")
    context = ssl.create_default_context(
        cafile=str(settings.mta_sts_cafile) if settings.mta_sts_cafile else None
    )
    request = f"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                addresses[0], settings.mta_sts_port, ssl=context, server_hostname=host
            ),
            settings.timeout_s,
        )
        try:
            writer.write(request)
            raw = await asyncio.wait_for(reader.read(MAX_POLICY_BYTES), settings.timeout_s)
        finally:
            writer.close()
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise DnsError(f"cannot fetch {url}: {exc}") from None
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split()
    if len(parts) < 2 or parts[1] != "200":
        raise DnsError(f"{url} answered {status_line!r}")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode(errors="replace").partition(":")
        headers[name.strip().lower()] = value.strip()
    return url, headers.get("content-type", ""), body.decode(errors="replace")


async def _gather_found(client: DnsClient, records: list[Expected]) -> Found:
    found = Found()
    keys = list(dict.fromkeys((r.name.lower(), r.rtype) for r in records))
    answers = await asyncio.gather(
        *(client.query(name, rtype) for name, rtype in keys), return_exceptions=True
    )
    for key, answer in zip(keys, answers, strict=True):
        if isinstance(answer, Exception):
            raise answer
        found.records[key] = answer
    return found


async def _addresses(client: DnsClient, settings: DnsSettings, domain: str):
    ipv4 = [str(a) for a in settings.expected_ipv4]
    ipv6 = [str(a) for a in settings.expected_ipv6]
    found_v4 = await client.query(f"{domain}.", "A")
    found_v6 = await client.query(f"{domain}.", "AAAA")
    return (ipv4 or found_v4, ipv6 or found_v6, found_v4, found_v6)


def _sts_id(found: list[str]) -> str:
    for rdata in found:
        sts_id = parse_tags(_unquote_txt(rdata)).get("id")
        if sts_id:
            return sts_id
    return time.strftime("%Y%m%d%H%M", time.gmtime())


async def check_dns(settings: Settings, config: Config) -> DnsReport:
    """Check every record at once; every problem is listed, required ones first."""
    now = datetime.now(UTC)
    domain = config.mail_domain
    if config.ipv4_relay:
        return DnsReport(
            mail_domain=domain,
            checked_at=now,
            nameservers=[],
            ok=True,
            records=[],
            problems=[],
            note=f"{domain} is an IP address: no DNS records to check",
        )
    ds = settings.dns
    client = DnsClient(ds)
    problems: list[str] = []
    try:
        await client.find_authoritative(domain)
    except DnsError as exc:
        problems.append(f"{exc}; asked the recursive resolver instead")
    try:
        ipv4, ipv6, found_v4, found_v6 = await _addresses(client, ds, domain)
        sts_found = await client.query(f"_mta-sts.{domain}.", "TXT")
        dkim_key = read_dkim_key(ds)
        expected = expected_records(config, ds, dkim_key, ipv4, ipv6, _sts_id(sts_found))
        found = await _gather_found(client, expected)
    except DnsError as exc:
        return DnsReport(
            mail_domain=domain,
            checked_at=now,
            nameservers=client.servers,
            ok=False,
            records=[],
            problems=[*problems, str(exc)],
        )
    rows: list[DnsRecord] = []
    if not ipv4 and not ipv6:
        rows.append(
            DnsRecord(
                name=f"{domain}.",
                type="A",
                expected="this relay's public IPv4 address",
                found=[],
                state="missing",
                required=True,
                why="Missing A and/or AAAA DNS records",
            )
        )
    for record in expected:
        have = found.get(record.name, record.rtype)
        state = judge(record, have, dkim_key_known=dkim_key is not None)
        why = record.why
        if record.rtype == "TXT" and "DKIM1" in record.rdata and dkim_key is None:
            why += " (key not readable by the API: only its presence was checked)"
        rows.append(
            DnsRecord(
                name=record.name,
                type=record.rtype,
                expected=record.rdata,
                found=have,
                state=state,
                required=record.required,
                why=why,
            )
        )
    rows += await _ptr_rows(client, domain, found_v4 + found_v6)
    policy = None
    if config.tls_cert_mode == "acme":
        policy = await _check_policy(ds, client, domain)
    recommended = []
    for row in rows:
        if row.state != "ok":
            kind = "required" if row.required else "recommended"
            shown = ", ".join(row.found) if row.found else "nothing"
            line = (
                f"{kind}: {row.type} {row.name} is {row.state}: expected {row.expected}, "
                f"found {shown}"
            )
            (problems if row.required else recommended).append(line)
    if policy and policy.state != "ok":
        problems += [f"required: MTA-STS policy {policy.url}: {p}" for p in policy.problems]
    problems += recommended
    ok = all(r.state == "ok" for r in rows if r.required) and (
        policy is None or policy.state == "ok"
    )
    return DnsReport(
        mail_domain=domain,
        checked_at=now,
        nameservers=client.servers,
        ok=ok,
        records=rows,
        mta_sts=policy,
        problems=problems,
    )


async def _ptr_rows(client: DnsClient, domain: str, addresses: list[str]) -> list[DnsRecord]:
    rows = []
    for address in addresses:
        name = dns.reversename.from_address(address).to_text()
        try:
            found = await client.query_recursive(name, "PTR")
        except DnsError:
            found = []
        state = (
            "missing"
            if not found
            else ("ok" if any(_same_name(f, domain) for f in found) else "wrong")
        )
        rows.append(
            DnsRecord(
                name=name,
                type="PTR",
                expected=f"{domain}.",
                found=found,
                state=state,
                required=False,
                why="reverse DNS: some servers distrust mail from addresses without it "
                "(set it at your hosting provider)",
            )
        )
    return rows


async def _check_policy(settings: DnsSettings, client: DnsClient, domain: str) -> MtaStsPolicy:
    url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
    try:
        url, content_type, body = await fetch_mta_sts(settings, client, domain)
    except DnsError as exc:
        return MtaStsPolicy(url=url, state="missing", problems=[str(exc)])
    problems = parse_mta_sts_policy(body, domain)
    if content_type.split(";")[0].strip().lower() != "text/plain":
        problems.append(f"served as {content_type or 'no content type'!r}, must be text/plain")
    return MtaStsPolicy(
        url=url, state="wrong" if problems else "ok", found=body[:2000], problems=problems
    )


async def build_zone(settings: Settings, config: Config) -> str:
    """The zone lines to set at the DNS provider (upstream's get_filled_zone_file)."""
    ds = settings.dns
    if config.ipv4_relay:
        return f"; {config.mail_domain} is an IP address: no DNS records needed\n"
    client = DnsClient(ds)
    note = ""
    ipv4 = [str(a) for a in ds.expected_ipv4]
    ipv6 = [str(a) for a in ds.expected_ipv6]
    sts_found: list[str] = []
    try:
        await client.find_authoritative(config.mail_domain)
        ipv4, ipv6, _, _ = await _addresses(client, ds, config.mail_domain)
        sts_found = await client.query(f"_mta-sts.{config.mail_domain}.", "TXT")
    except DnsError as exc:
        note = f"DNS lookups failed ({exc}); A/AAAA taken from the API settings only"
    if not ipv4 and not ipv6:
        note = (note + "; " if note else "") + "add A and/or AAAA records for this relay"
    dkim_key = read_dkim_key(ds)
    records = expected_records(config, ds, dkim_key, ipv4, ipv6, _sts_id(sts_found))
    return zone_text(records, note)
