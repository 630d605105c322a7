{#- The relay's web pages (index, info, privacy), built on the relay from Markdown into
    paths.www_root, which the web state's nginx serves.

    chatmail-www is idempotent: it rewrites only files whose bytes differ, removes files
    an earlier build made that are no longer produced, and prints Salt's stateful JSON.
    So it runs on every highstate and reports a change only when a source, the layout,
    the installed package or chatmail.ini changed; no onchanges bookkeeping to forget.

    www.source: "" = the pages shipped in the package; a path on the relay; or salt://
    (copied to www.source_dir first). www.enabled: false removes the built pages. -#}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set www = chatmail.www %}
{%- set builder = chatmail.paths.venv ~ "/bin/chatmail-www" %}
{%- set source = (www.source or "") | string | trim %}

include:
  - chatmail.chatmaild

{%- if www.enabled %}
{%-   if source.startswith("salt://") %}

chatmail-www-source:
  file.recurse:
    - name: {{ www.source_dir }}
    - source: {{ source }}
    - clean: true
    - makedirs: true
    - dir_mode: "0755"
    - file_mode: "0644"
    - require_in:
      - cmd: chatmail-www-build
{%-     set source = www.source_dir %}
{%-   endif %}

chatmail-www-build:
  cmd.run:
    - name: >-
        {{ builder }} --ini {{ chatmail.paths.ini }} --out {{ chatmail.paths.www_root }}
        {%- if source %} --src {{ source }}{% endif %} --salt-stateful
    - stateful: true
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-chatmaild-ini
{%- else %}

chatmail-www-clean:
  cmd.run:
    - name: {{ builder }} --clean --out {{ chatmail.paths.www_root }} --salt-stateful
    - stateful: true
    - onlyif: test -x {{ builder }}
    - require:
      - cmd: chatmail-chatmaild-venv
{%- endif %}
