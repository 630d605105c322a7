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

{%-   set build = builder ~ " --ini " ~ chatmail.paths.ini ~ " --out " ~ chatmail.paths.www_root
          ~ (" --src " ~ source if source else "") ~ " --salt-stateful" %}

chatmail-www-build:
  cmd.run:
    - name: {{ build }}
    # test=True runs the dry run: a fleet's dry run shows pending pages only when there are.
    - stateful:
      - test_name: {{ build }} --dry-run
    - require:
      - cmd: chatmail-chatmaild-venv
      - file: chatmail-chatmaild-ini
{%- else %}

{%-   set clean = builder ~ " --clean --out " ~ chatmail.paths.www_root ~ " --salt-stateful" %}

chatmail-www-clean:
  cmd.run:
    - name: {{ clean }}
    - stateful:
      - test_name: {{ clean }} --dry-run
    - onlyif: test -x {{ builder }}
    - require:
      - cmd: chatmail-chatmaild-venv
{%- endif %}
