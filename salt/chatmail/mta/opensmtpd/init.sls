{#- OpenSMTPD (mta: opensmtpd): ports 25/587/465, filtermail's rules as smtpd filters
    (chatmail-smtpd-filter), DKIM signing (filter-dkimsign) and LMTP to Dovecot. smtpd has
    no reload: any change to smtpd.conf, the doas rule, the relay's code or chatmail.ini
    restarts it (queued mail survives in the spool). smtpd.conf is checked with
    `smtpd -n -f` before it goes live. -#}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set o = chatmail.opensmtpd %}
{%- if not o.supported %}
{{- raise("chatmail: mta opensmtpd needs OpenSMTPD 7.6+ and filter-dkimsign (OpenBSD 7.6+, Debian 13+); this release's are older: use mta postfix") }}
{%- endif %}
{%- set table = chatmail.paths.venv ~ "/bin/chatmail-smtpd-table" %}

include:
  - chatmail.packages
  - chatmail.tls
  - chatmail.chatmaild
{%- if chatmail.dkim.enabled %}
  - chatmail.dkim
{%- endif %}

{#- smtpd's lookup process runs unprivileged and starts the account table itself; the
    table writes mailboxes, so this rule lets that one command (with exactly these
    arguments) run as the vmail user. The operator's other doas rules stay untouched.
    Neither Debian's opendoas nor OpenBSD ships a doas.conf: it is created first (root
    only: doas refuses a writable one), so the block has a file to go into. #}
chatmail-mta-doas-mode:
  file.managed:
    - name: {{ o.doas_conf }}
    - replace: False
    - user: root
    - mode: "0600"
    - require:
      - pkg: chatmail-packages

chatmail-mta-doas:
  file.blockreplace:
    - name: {{ o.doas_conf }}
    - marker_start: "# chatmail: account table for OpenSMTPD (managed by Salt) -- start"
    - marker_end: "# chatmail: account table for OpenSMTPD (managed by Salt) -- end"
    - content: |
        permit nopass {{ o.user }} as {{ chatmail.users.vmail }} cmd {{ table }} args --services credentials,mailaddrmap,mailaddr {{ chatmail.paths.ini }}
    - append_if_not_found: True
    - require:
      - file: chatmail-mta-doas-mode

{#- smtpd's server name (bounces come from MAILER-DAEMON@<it>, signed for the domain). #}
chatmail-mta-mailname:
  file.managed:
    - name: {{ o.mailname }}
    - contents: {{ chatmail.mail_domain | json }}
    - mode: "0644"

chatmail-mta-table:
  file.managed:
    - name: {{ o.libexec }}/table-chatmail
    - source: salt://chatmail/mta/opensmtpd/files/table-chatmail.jinja
    - template: jinja
    - mode: "0755"
    - check_cmd: sh -n
    - require:
      - pkg: chatmail-packages

chatmail-mta-config:
  file.managed:
    - name: {{ o.config }}
    - source: salt://chatmail/mta/opensmtpd/files/smtpd.conf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: smtpd -n -f
    - require:
      - pkg: chatmail-packages
      - sls: chatmail.tls
{%- if chatmail.dkim.enabled %}
      - sls: chatmail.dkim
{%- endif %}

{%- if chatmail.init == "systemd" %}

chatmail-mta-restart-dropin:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/{{ chatmail.service.opensmtpd }}.service.d/10-chatmail-restart.conf
    - makedirs: True
    - contents: |
        # Managed by Salt (chatmail formula): smtpd exits when one of its filters dies
        # (kill -9 of chatmail-smtpd-filter stopped all mail until a manual restart).
        [Service]
        Restart=always
        RestartSec=2
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-mta-restart-dropin
{%- endif %}

chatmail-mta-service:
  service.running:
    - name: {{ chatmail.service.opensmtpd }}
    - enable: True
    - watch:
{%- if chatmail.init == "systemd" %}
      - module: chatmail-mta-restart-dropin
{%- endif %}
      - file: chatmail-mta-config
      {#- smtpd runs the filters and the table: new code or settings need a restart #}
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-chatmaild-ini
      - file: chatmail-mta-doas
      - file: chatmail-mta-table
      - file: chatmail-mta-mailname
