{#- DKIM signing key (generated once with opendkim-genkey, then kept: its public half is
    in DNS) and, for Postfix, the OpenDKIM milter. OpenDKIM is restarted on config changes:
    it reads the key tables at start, and Postfix retries (milter_default_action=tempfail)
    the few messages that meet the short gap. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set k = chatmail.dkim %}
{%- set d = chatmail.mail_domain %}
{%- set u = chatmail.users %}

{%- if k.enabled %}

include:
  - chatmail.packages

chatmail-dkim-key-dir:
  file.directory:
    - name: {{ k.key_dir }}
    - user: {{ u.opendkim }}
    - group: {{ u.opendkim_group }}
    - mode: "0750"
    - require:
      - pkg: chatmail-packages

chatmail-dkim-key:
  cmd.run:
    - name: >-
        opendkim-genkey -D {{ k.key_dir }} -d {{ d }} -s {{ k.selector }} &&
        chown {{ u.opendkim }}:{{ u.opendkim_group }} {{ k.key_dir }}/{{ k.selector }}.private {{ k.key_dir }}/{{ k.selector }}.txt
    - umask: "077"
    - creates: {{ k.key_dir }}/{{ k.selector }}.private
    - require:
      - file: chatmail-dkim-key-dir

chatmail-dkim-key-table:
  file.managed:
    - name: {{ k.key_dir }}/KeyTable
    - contents: "{{ k.selector }}._domainkey.{{ d }} {{ d }}:{{ k.selector }}:{{ k.key_dir }}/{{ k.selector }}.private"
    - user: {{ u.opendkim }}
    - group: {{ u.opendkim_group }}
    - mode: "0640"
    - require:
      - file: chatmail-dkim-key-dir

chatmail-dkim-signing-table:
  file.managed:
    - name: {{ k.key_dir }}/SigningTable
    - contents: "*@{{ d }} {{ k.selector }}._domainkey.{{ d }}"
    - user: {{ u.opendkim }}
    - group: {{ u.opendkim_group }}
    - mode: "0640"
    - require:
      - file: chatmail-dkim-key-dir

{%- if k.signer == "opendkim" %}

chatmail-dkim-socket-dir:
  file.directory:
    - name: {{ k.socket_dir }}
    - user: {{ u.opendkim }}
    - group: {{ u.opendkim_group }}
    - mode: "0750"
    - require:
      - pkg: chatmail-packages

{#- Postfix reaches the milter socket through the opendkim group. #}
chatmail-dkim-postfix-group:
  group.present:
    - name: {{ u.opendkim_group }}
    - addusers:
      - {{ u.postfix }}
    - require:
      - pkg: chatmail-packages

chatmail-dkim-config:
  file.managed:
    - name: {{ k.config }}
    - source: salt://chatmail/dkim/files/opendkim.conf.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: opendkim -n -x
    - require:
      - pkg: chatmail-packages
      - cmd: chatmail-dkim-key
      - file: chatmail-dkim-key-table
      - file: chatmail-dkim-signing-table

chatmail-dkim-dropin:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/{{ chatmail.service.opendkim }}.service.d/10-chatmail.conf
    - makedirs: True
    - contents: |
        # Managed by Salt (chatmail formula): come back after a crash, and restart daily
        # to mend OpenDKIM's slow memory growth.
        [Service]
        Restart=always
        RestartSec=30
        RuntimeMaxSec=1d
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-dkim-dropin

chatmail-dkim-service:
  service.running:
    - name: {{ chatmail.service.opendkim }}
    - enable: True
    - watch:
      - file: chatmail-dkim-config
      - file: chatmail-dkim-key-table
      - file: chatmail-dkim-signing-table
      - cmd: chatmail-dkim-key
      - module: chatmail-dkim-dropin
    - require:
      - file: chatmail-dkim-socket-dir
      - group: chatmail-dkim-postfix-group
{%- endif %}
{%- endif %}
