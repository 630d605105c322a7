{#- api.json: what the API adds to chatmail.ini (where it listens, who may call it, what it
    checks), rendered from the map; and the public half of the DKIM key for GET /dns
    (the key directory is the signer's only). #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/api/common.jinja" import systemd, smtpd_queue, queue_snapshot, stats_file, index_file, accounts_socket, queue_socket with context %}
{%- set api = chatmail.api %}
{%- set paths = chatmail.paths %}
{%- set separator = chatmail.init_files[chatmail.init].name_separator %}

include:
  - chatmail.api.tokens
{%- if chatmail.dkim.enabled %}
  - chatmail.dkim
{%- endif %}

{%- set services = [chatmail.service.postfix if chatmail.mta == "postfix" else chatmail.service.opensmtpd,
                    chatmail.service.dovecot, chatmail.service[chatmail.web.server], chatmail.service.unbound] %}
{%- if chatmail.dkim.enabled and chatmail.dkim.signer == "opendkim" %}
{%-   do services.append(chatmail.service.opendkim) %}
{%- endif %}
{%- for daemon in ["doveauth", "chatmail-metadata", "lastlogin", "filtermail", "filtermail-incoming"] if chatmail.daemons[daemon] %}
{%-   do services.append(daemon) %}
{%- endfor %}
{%- set service_specs = [] %}
{%- for name in services %}
{%-   do service_specs.append({"name": name | replace("-", separator)}) %}
{%- endfor %}
{#- calls, not mail: a TURN outage is a warning #}
{%- if chatmail.turn.enabled %}
{%-   do service_specs.extend([{"name": chatmail.service.turn, "severity": "warning"},
                               {"name": "chatmail-turn-credentials.socket", "severity": "warning"}]) %}
{%- endif %}
{%- set settings = {
      "chatmail_ini": paths.ini,
      "listen": api.listen,
      "port": api.port,
      "state_dir": "/var/lib/chatmail-api",
      "allow": api.allow,
      "public_health": api.public_health,
      "account_creation_pin": api.account_creation_pin,
      "version_file": paths.version_file,
      "tls_cert": chatmail.tls.cert,
      "service_manager": "systemd" if systemd else "rcctl",
      "mta": chatmail.mta,
      "services": service_specs,
      "turn_port": chatmail.turn.port if chatmail.turn.enabled else none,
      "queue_command": ["postqueue", "-j"] if chatmail.mta == "postfix" else ["smtpctl", "show", "queue"],
      "queue_snapshot": queue_snapshot if smtpd_queue else none,
      "account_stats_file": stats_file,
      "account_index_file": index_file,
      "accounts_socket": accounts_socket,
      "queue_socket": queue_socket,
      "account_scan_interval_s": 60,
      "dns": {"dkim_selector": chatmail.dkim.selector, "dkim_txt": api.dkim_public},
      "probe": {"enabled": true, "interval_s": api.probe_interval,
                "submission_port": chatmail.ports.submission, "imap_port": chatmail.ports.imaps},
      "dovecot": {"packages": chatmail.dovecot.packages,
                  "version_command": chatmail.dovecot.version_command,
                  "upstream_version": chatmail.dovecot.upstream.version},
    } %}

chatmail-api-settings:
  file.serialize:
    - name: {{ api.settings_file }}
    - dataset: {{ settings | json }}
    - serializer: json
    - user: root
    - mode: "0644"
    - require:
      - file: chatmail-api-config-dir
{%- if chatmail.dkim.enabled %}
{%-   set dkim_txt = chatmail.dkim.key_dir ~ "/" ~ chatmail.dkim.selector ~ ".txt" %}

chatmail-api-dkim-public:
  cmd.run:
    - name: install -m 0644 -o 0 -g 0 {{ dkim_txt }} {{ api.dkim_public }}
    - unless: cmp -s {{ dkim_txt }} {{ api.dkim_public }}
    - require:
      - cmd: chatmail-dkim-key
      - file: chatmail-api-config-dir
{%- endif %}
