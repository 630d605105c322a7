{#- The API's service: a sandboxed systemd unit (see files/chatmail-api.service.jinja), or
    an rc.d script under rcctl. It restarts when its settings, tokens, chatmail.ini or
    code change. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/api/common.jinja" import systemd, pinned, pillar_tokens with context %}
{%- from "chatmail/files/limits.jinja" import login_class with context %}
{%- set api = chatmail.api %}
{%- set venv = chatmail.paths.venv %}

include:
  - chatmail.chatmaild
  - chatmail.checks
  - chatmail.api.tokens
  - chatmail.api.settings
  - chatmail.api.account-creation
{%- if systemd %}

chatmail-api-unit:
  file.managed:
    - name: {{ chatmail.paths.systemd_units }}/chatmail-api.service
    - source: salt://chatmail/api/files/chatmail-api.service.jinja
    - template: jinja
    - mode: "0644"
    - check_cmd: {{ chatmail.paths.check_config }} unit chatmail-api.service
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-checks-script

chatmail-api-units-reload:
  module.run:
    - service.systemctl_reload: []
    - onchanges:
      - file: chatmail-api-unit
{%- else %}

chatmail-api-unit:
  file.managed:
    - name: {{ chatmail.init_files.rcctl.dir }}/chatmail_api
    - source: {{ chatmail.init_files.rcctl.template }}
    - template: jinja
    - context:
        description: "chatmail control API"
        exec_start: {{ venv }}/bin/chatmail-api --settings {{ api.settings_file }} --tokens-file {{ api.tokens_file }}
        run_as: {{ chatmail.users.api }}
        run_as_group: {{ chatmail.users.api_group }}
    - mode: "{{ chatmail.init_files.rcctl.mode }}"
    - check_cmd: sh -n
    - require:
      - cmd: chatmail-chatmaild-venv
{{ login_class("chatmail-api-login-class", "chatmail_api", "chatmail-api") }}
{%- endif %}

chatmail-api-service:
  service.running:
    - name: {{ "chatmail-api" if systemd else "chatmail_api" }}
    - enable: True
    - require:
      - file: chatmail-api-account-creation-dir
      - file: chatmail-chatmaild-counters
{%- if not pinned %}
      - file: chatmail-api-nocreate-link
{%- endif %}
    - watch:
      - file: chatmail-api-unit
{%- if systemd %}
      - module: chatmail-api-units-reload
{%- else %}
      - file: chatmail-api-login-class
{%- endif %}
      - file: chatmail-api-settings
      - {{ "file" if pillar_tokens else "cmd" }}: chatmail-api-tokens
      - file: chatmail-chatmaild-ini
      - cmd: chatmail-chatmaild-venv
