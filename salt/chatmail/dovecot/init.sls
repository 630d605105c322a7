{#- Dovecot: IMAP 143/993, LMTP for Postfix, SASL for Postfix, quota, METADATA and push.
    One of two templates by chatmail.dovecot.syntax (2.3 or 2.4). Every file is checked
    with doveconf before it goes live, and a change restarts Dovecot: a reload keeps
    running imap processes on the old settings, and hibernated IDLE sessions survive
    a restart by reconnecting. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set dir = chatmail.dovecot.config_dir %}
{%- set syntax = chatmail.dovecot.syntax %}
{%- if syntax not in ["2.3", "2.4"] %}
{{- raise("chatmail: dovecot:syntax must be 2.3 or 2.4, not " ~ syntax) }}
{%- endif %}

include:
  - chatmail.packages
  - chatmail.tls
  - chatmail.users

{%- if syntax == "2.4" %}

chatmail-dovecot-lua-socket:
  pkg.installed:
    - pkgs: {{ chatmail.dovecot.lua_socket_pkgs | json }}

chatmail-dovecot-auth-lua:
  file.managed:
    - name: {{ dir }}/auth-doveauth.lua
    - source: salt://chatmail/dovecot/files/auth-doveauth.lua
    - mode: "0644"
    - require:
      - pkg: chatmail-packages
      - pkg: chatmail-dovecot-lua-socket
    - require_in:
      - file: chatmail-dovecot-config
    - watch_in:
      - service: chatmail-dovecot-service
{%- else %}

chatmail-dovecot-auth-dict:
  file.managed:
    - name: {{ dir }}/auth-dict.conf.ext
    - source: salt://chatmail/dovecot/files/auth-dict.conf.ext
    - mode: "0644"
    - require:
      - pkg: chatmail-packages
    - require_in:
      - file: chatmail-dovecot-config
    - watch_in:
      - service: chatmail-dovecot-service
{%- endif %}

chatmail-dovecot-push-lua:
  file.managed:
    - name: {{ dir }}/push_notification.lua
    - source: salt://chatmail/dovecot/files/push_notification.lua
    - mode: "0644"
    - require:
      - pkg: chatmail-packages

chatmail-dovecot-config:
  file.managed:
    - name: {{ dir }}/dovecot.conf
    - source: salt://chatmail/dovecot/files/dovecot-{{ syntax }}.conf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: doveconf -n -c
    - require:
      - pkg: chatmail-packages
      - sls: chatmail.tls
      - user: chatmail-users-vmail

{%- if chatmail.init == "systemd" %}

chatmail-dovecot-restart-dropin:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/{{ chatmail.service.dovecot }}.service.d/10-chatmail-restart.conf
    - makedirs: True
    - contents: |
        # Managed by Salt (chatmail formula): Dovecot comes back after a crash.
        [Service]
        Restart=always
        RestartSec=30
        # Dovecot 2.4 (Debian 13) can take systemd's whole 90 s to stop after mail traffic:
        # no IMAP for that long on every restart. Maildir writes are atomic renames, so
        # what is left after 15 s is killed.
        TimeoutStopSec=15
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-dovecot-restart-dropin
{%- endif %}

chatmail-dovecot-service:
  service.running:
    - name: {{ chatmail.service.dovecot }}
    - enable: True
    - watch:
      - file: chatmail-dovecot-config
      - file: chatmail-dovecot-push-lua
{%- if chatmail.dovecot.pin_file %}
      - {{ "pkg" if chatmail.dovecot.packages == "upstream" else "cmd" }}: chatmail-dovecot-packages
{%- endif %}
{%- if chatmail.init == "systemd" %}
      - module: chatmail-dovecot-restart-dropin
{%- endif %}
