"""Prometheus exposition: one custom collector on the API's own registry.

Everything is read from snapshots the API already holds (last status run, last account
scan, last probe) plus the daemons' small counters files, so a scrape costs the same with
a thousand accounts or a million. Label values are fixed vocabularies or check ids;
anything that looks like an address is dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from chatmaild.counters import read_counters

if TYPE_CHECKING:
    from .runtime import Runtime

#: counter file metric -> (exported name without _total, help, allowed label names)
COUNTERS = {
    "accounts_created_total": ("chatmail_accounts_created", "Accounts created at first login", ()),
    "registrations_rejected_total": (
        "chatmail_registrations_rejected",
        "New accounts refused, by reason",
        ("reason",),
    ),
    "mail_filtered_total": (
        "chatmail_mail_filtered",
        "Messages filtered by filtermail",
        ("direction", "encrypted", "result"),
    ),
    "notifications_sent_total": (
        "chatmail_notifications_sent",
        "Push notifications delivered to the notification service",
        (),
    ),
    "notifications_failed_total": (
        "chatmail_notifications_failed",
        "Push notifications that failed",
        (),
    ),
    "logins_total": ("chatmail_logins", "Successful logins", ()),
    # chatmail-logcounter: upstream's mtail counters, from the journal
    "delivered_mail_total": (
        "chatmail_delivered_mail",
        "Messages delivered into a mailbox (Dovecot LMTP)",
        (),
    ),
    "quota_exceeded_total": (
        "chatmail_quota_exceeded",
        "Deliveries refused because the mailbox is full",
        (),
    ),
    "dkim_signed_total": ("chatmail_dkim_signed", "Outgoing messages DKIM-signed", ()),
    "mailer_daemon_mail_total": (
        "chatmail_mailer_daemon_mail",
        "Incoming delivery reports (mailer-daemon) let through",
        (),
    ),
    "postfix_noqueue_total": (
        "chatmail_postfix_noqueue",
        "SMTP commands Postfix refused before queueing (NOQUEUE)",
        (),
    ),
    "outbound_deliveries_total": (
        "chatmail_outbound_deliveries",
        "Deliveries to other relays by chatmail-mxtransport, by channel (https, smtp)",
        ("channel", "result"),
    ),
    "mxdeliv_received_total": (
        "chatmail_mxdeliv_received",
        "POST /mxdeliv requests from other relays, by result",
        ("result",),
    ),
}


def _safe(value: str) -> bool:
    return "@" not in value and len(value) <= 64


class RelayCollector:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def collect(self) -> list[Metric]:
        rt = self.runtime
        metrics: list[Metric] = []
        snapshot = rt.last_status
        facts = snapshot.facts if snapshot else None

        build = GaugeMetricFamily(
            "chatmail_build_info", "Deployed revision (/etc/chatmail-version)", labels=["version"]
        )
        build.add_metric([(facts.version if facts and facts.version else "unknown")[:64]], 1)
        metrics.append(build)

        if facts and facts.registration_open is not None:
            metrics.append(
                GaugeMetricFamily(
                    "chatmail_registration_open",
                    "1 if new accounts can be created now",
                    value=1 if facts.registration_open else 0,
                )
            )
        if facts and facts.tls_not_after is not None:
            metrics.append(
                GaugeMetricFamily(
                    "chatmail_tls_cert_not_after_timestamp_seconds",
                    "Expiry of the relay's TLS certificate",
                    value=facts.tls_not_after,
                )
            )
        if facts and facts.queue_depth:
            queue = GaugeMetricFamily(
                "postfix_showq_queue_depth", "Messages in the mail queue", labels=["queue"]
            )
            for name, depth in sorted(facts.queue_depth.items()):
                queue.add_metric([name], depth)
            metrics.append(queue)

        if snapshot:
            check_ok = GaugeMetricFamily(
                "chatmail_check_ok",
                "1 if the status check passes (unknown counts as 0)",
                labels=["check", "severity"],
            )
            for check in snapshot.results:
                check_ok.add_metric([check.id, check.severity], 1 if check.state == "ok" else 0)
            metrics.append(check_ok)

        stats = rt.account_stats
        if stats is not None:
            accounts = GaugeMetricFamily("chatmail_accounts", "Accounts", labels=["kind"])
            for kind, count in stats.accounts.items():
                accounts.add_metric([kind], count)
            active = GaugeMetricFamily(
                "chatmail_accounts_active", "Accounts logged in within N days", labels=["days"]
            )
            for days, count in stats.active.items():
                active.add_metric([str(days)], count)
            storage = GaugeMetricFamily(
                "chatmail_storage_bytes", "Bytes stored in mailboxes", labels=["kind"]
            )
            for kind, size in stats.storage.items():
                storage.add_metric([kind], size)
            scanned = GaugeMetricFamily(
                "chatmail_account_scan_timestamp_seconds",
                "When accounts and storage were last counted",
                value=stats.scanned_at,
            )
            metrics.extend([accounts, active, storage, scanned])

        probe = rt.checker.probe_result
        if probe is not None:
            metrics.append(
                GaugeMetricFamily(
                    "chatmail_probe_success",
                    "1 if the last end-to-end probe delivered its message",
                    value=1 if probe.ok else 0,
                )
            )
            metrics.append(
                GaugeMetricFamily(
                    "chatmail_probe_duration_seconds",
                    "Duration of the last end-to-end probe",
                    value=probe.duration_s,
                )
            )

        metrics.extend(self._counters())
        return metrics

    def _counters(self) -> list[Metric]:
        values = read_counters(self.runtime.config.counters_dir)
        out = []
        for source, (name, help_text, label_names) in COUNTERS.items():
            family = CounterMetricFamily(name, help_text, labels=list(label_names))
            sums: dict[tuple[str, ...], float] = {}
            for labels, value in values.get(source, {}).items():
                given = dict(labels)
                key = tuple(given.get(label, "") for label in label_names)
                if all(_safe(v) for v in key):
                    sums[key] = sums.get(key, 0) + value
            if not label_names and not sums:
                sums[()] = 0
            for key, value in sorted(sums.items()):
                family.add_metric(list(key), value)
            out.append(family)
        return out


def make_registry(runtime: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(runtime))
    return registry
