{#- Daily expiry: old messages, large old messages, inactive accounts, quota trim.
    A scheduled job (files/schedule.jinja): a timer where a run missed while the machine
    was off happens at boot, or a cron job of the vmail user. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/files/schedule.jinja" import scheduled_job with context %}
{%- set paths = chatmail.paths %}

include:
  - chatmail.chatmaild
  - chatmail.checks
{{ scheduled_job("chatmail-expiry", {
     "unit": "chatmail-expire",
     "description": "chatmail expire: remove old mail and inactive accounts",
     "command": paths.venv ~ "/bin/chatmail-expire " ~ paths.ini ~ " --remove",
     "user": chatmail.users.vmail,
     "on_calendar": chatmail.expiry.on_calendar,
     "source": "salt://chatmail/chatmaild/files/daemon.service.jinja",
     "context": {"type": "oneshot", "restart": false, "timer": true, "runtime_dir": "",
                 "read_write_paths": [paths.mailboxes, paths.counters],
                 "protect_home": "no", "wants_network": false},
     "require": [{"file": "chatmail-chatmaild-ini"}],
   }) }}
