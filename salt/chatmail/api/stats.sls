{#- Account counts and storage for /metrics: the API cannot read mailboxes, so a
    scheduled job running as vmail (every api.stats_interval) writes them into a small
    file in a vmail:<api group> 2750 directory. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/files/schedule.jinja" import scheduled_job with context %}
{%- from "chatmail/api/common.jinja" import stats_file, index_file with context %}
{%- set api = chatmail.api %}

include:
  - chatmail.users
  - chatmail.chatmaild
  - chatmail.checks

chatmail-api-stats-dir:
  file.directory:
    - name: {{ api.stats_dir }}
    - user: {{ chatmail.users.vmail }}
    - group: {{ chatmail.users.api_group }}
    - mode: "2750"
    - makedirs: True
    - require:
      - user: chatmail-users-vmail
      - group: chatmail-users-api-group
{{ scheduled_job("chatmail-api-stats", {
     "unit": "chatmail-account-stats",
     "description": "chatmail account statistics for the control API's /metrics",
     "command": chatmail.paths.venv ~ "/bin/chatmail-accountstats " ~ chatmail.paths.ini ~ " " ~ stats_file ~ " --index " ~ index_file,
     "user": chatmail.users.vmail,
     "every": api.stats_interval,
     "source": "salt://chatmail/chatmaild/files/daemon.service.jinja",
     "context": {"type": "oneshot", "restart": false, "timer": true, "runtime_dir": "",
                 "read_write_paths": [api.stats_dir], "protect_home": "read-only",
                 "wants_network": false},
     "require": [{"file": "chatmail-api-stats-dir"}],
   }) }}
