{#- The highstate proves itself: once everything else is applied, the end-to-end probe
    (submission -> filter -> delivery -> IMAP, chatmail-selfcheck) must get a message
    through, or this state fails naming the step. It waits for the services this apply
    restarted and retries within a bound, so a healthy relay passes on its first apply
    too. It runs as the API user: the probe account's credentials are the API's. No
    change is ever reported (Salt's stateful protocol); test=True only announces it. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- set check = chatmail.paths.venv ~ "/bin/chatmail-selfcheck --settings " ~ chatmail.api.settings_file
                 ~ " --within " ~ chatmail.api.selfcheck_within %}

include:
  - chatmail.api

chatmail-selfcheck-probe:
  cmd.run:
    - name: {{ check }}
    - runas: {{ chatmail.users.api }}
    - stateful:
      - test_name: {{ check }} --dry-run
    - order: last
    - require:
      - service: chatmail-api-service
