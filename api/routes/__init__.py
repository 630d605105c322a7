"""One router per resource: health, status, dns, account_creation, metrics, probe, new."""
