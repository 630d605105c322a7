{#- Logs are kept in memory only and expire after logging.max_retention, as upstream
    and as the privacy page says. journald re-reads its config only on restart. -#}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- if chatmail.logging.journald_dropin %}

chatmail-logging-journald-config:
  file.managed:
    - name: {{ chatmail.logging.journald_dropin }}
    - makedirs: true
    - mode: "0644"
    - contents: |
        # Managed by Salt (chatmail formula).
        [Journal]
        Storage=volatile
        MaxRetentionSec={{ chatmail.logging.max_retention }}

chatmail-logging-journald-service:
  service.running:
    - name: systemd-journald
    - watch:
      - file: chatmail-logging-journald-config
{%- endif %}
