{#- Tokens never sit in api.json: api.tokens_file (root, 0600) holds the pillar's tokens
    or, if the pillar has none, tokens generated here once; systemd hands the file to the
    service (LoadCredential) and the API reads it from $CREDENTIALS_DIRECTORY. Without
    systemd the file is readable by the API's group instead. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/api/common.jinja" import systemd, pillar_tokens with context %}
{%- set api = chatmail.api %}

include:
  - chatmail.users
  - chatmail.chatmaild

chatmail-api-config-dir:
  file.directory:
    - name: {{ salt["file.dirname"](api.settings_file) }}
    - user: root
    - mode: "0755"
    - makedirs: True
{%- if pillar_tokens %}

chatmail-api-tokens:
  file.serialize:
    - name: {{ api.tokens_file }}
    - dataset: {{ {"monitor": api.tokens.monitor or {}, "admin": api.tokens.admin or {}} | json }}
    - serializer: json
    - user: root
{%-   if not systemd %}
    - group: {{ chatmail.users.api_group }}
{%-   endif %}
    - mode: "{{ "0600" if systemd else "0640" }}"
    - require:
      - file: chatmail-api-config-dir
{%- else %}

chatmail-api-tokens:
  cmd.run:
    - name: >-
        {{ chatmail.paths.venv }}/bin/python -c 'import json, secrets;
        print(json.dumps({scope: {scope: secrets.token_urlsafe(32)} for scope in ("monitor", "admin")}))'
        > {{ api.tokens_file }}
    - umask: "077"
    - creates: {{ api.tokens_file }}
    - require:
      - file: chatmail-api-config-dir
      - cmd: chatmail-chatmaild-venv
{%-   if not systemd %}

chatmail-api-tokens-group:
  file.managed:
    - name: {{ api.tokens_file }}
    - replace: False
    - user: root
    - group: {{ chatmail.users.api_group }}
    - mode: "0640"
    - require:
      - cmd: chatmail-api-tokens
{%-   endif %}
{%- endif %}
