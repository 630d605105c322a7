"""Request and response bodies: every endpoint's JSON is one of these (they make /openapi.json)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Severity = Literal["critical", "warning", "info"]
CheckState = Literal["ok", "fail", "unknown"]
Overall = Literal["ok", "degraded", "down"]
RecordState = Literal["ok", "missing", "wrong"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Model):
    detail: str


#: Documented on every authenticated route (so the schema, and fuzzers, know them).
AUTH_RESPONSES: dict[int | str, dict] = {
    401: {"model": ErrorBody, "description": "Missing or unknown bearer token"},
    403: {"model": ErrorBody, "description": "Token lacks the scope, or address not allowed"},
    422: {"model": ErrorBody, "description": "Invalid request"},
}


class Health(_Model):
    status: Literal["ok", "down"]
    reason: str | None = None


class Check(_Model):
    id: str = Field(description="Stable id: service.<name>, port.<n>, tls.expiry, ...")
    severity: Severity
    state: CheckState
    summary: str = Field(description="What was found, one line")
    hint: str = Field("", description="What to do about it, one line (empty when ok)")
    since: datetime | None = Field(None, description="When the check entered this state")


class Status(_Model):
    status: Overall
    mail_domain: str
    checked_at: datetime
    checks: list[Check]


class AccountCreation(_Model):
    enabled: bool = Field(description="Whether new accounts may be created right now")
    closed_by_file: bool = Field(description="The nocreate file exists")
    reason: str | None = None
    by: str | None = Field(None, description="Token name (or 'file') that closed it")
    since: datetime | None = None
    until: datetime | None = Field(None, description="Creation re-opens automatically then")
    pinned: bool | None = Field(None, description="Pinned open/closed by the pillar")
    system_limit: str | None = Field(None, description="A system limit refusing new accounts")
    nocreate_file: str


class AccountCreationUpdate(_Model):
    enabled: bool
    reason: str = Field("", max_length=500)
    until: datetime | None = Field(
        None, description="Only when closing: re-open automatically at this time"
    )


class DnsRecord(_Model):
    name: str
    type: str
    expected: str
    found: list[str]
    state: RecordState
    required: bool
    why: str


class MtaStsPolicy(_Model):
    url: str
    state: RecordState
    found: str | None = None
    problems: list[str] = []


class DnsReport(_Model):
    mail_domain: str
    checked_at: datetime
    nameservers: list[str]
    ok: bool = Field(description="Every required record is correct")
    records: list[DnsRecord]
    mta_sts: MtaStsPolicy | None = None
    problems: list[str] = Field(description="Every problem found, required ones first")
    note: str | None = None


class ProbeResult(_Model):
    ok: bool
    started_at: datetime
    duration_s: float
    detail: str


class NewCredentials(_Model):
    email: str
    password: str
    dclogin_url: str | None = None


class AccountBlockEntry(_Model):
    reason: str
    by: str
    since: datetime
    deleted: bool = Field(description="The mailbox was deleted; the address stays blocked")


class AccountSummary(_Model):
    address: str
    last_login: datetime | None
    storage_bytes: int
    messages: int
    blocked: bool


class AccountPage(_Model):
    accounts: list[AccountSummary]
    total: int = Field(description="Accounts matching the filter")
    offset: int
    limit: int
    indexed_at: datetime | None = Field(
        None, description="When the account list was last scanned (blocks are live)"
    )


class AccountDetail(_Model):
    address: str
    exists: bool = Field(description="The mailbox exists (false: deleted, still blocked)")
    created: datetime | None
    last_login: datetime | None
    storage_bytes: int
    quota_bytes: int
    messages: int
    enforce_e2ee: bool = Field(description="Incoming cleartext is refused")
    push_token: bool = Field(description="A device registered a push notification token")
    blocked: AccountBlockEntry | None


class AccountAction(_Model):
    reason: str = Field("", max_length=500)


class QueueMessage(_Model):
    id: str
    age_s: int
    size: int | None = Field(description="Bytes; null where the MTA does not list it")
    recipient_domains: list[str]
    last_error: str | None


class QueueListing(_Model):
    messages: list[QueueMessage]


class Done(_Model):
    changed: bool
